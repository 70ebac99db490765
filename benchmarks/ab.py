"""A/B of this tree's normlab against a git revision's, in one process (see benchmarks/README.md, "A/B against
a git revision").

The revision's ``src/normlab`` is exported into a cache folder as a package named ``normlab_base`` (every
``normlab`` import rewritten textually), so that both versions load side by side. For each of the
benchmark's cases (:mod:`normlab.bench.cases`: BatchNorm, GroupNorm, LayerNorm, the fused BatchNormReLU2d;
the modes, shapes and layouts of ``normlab bench``) it

* checks that the two versions give bit-identical outputs, input and parameter gradients and running
  statistics after one call on the same module state and data (``torch.equal``), and
* times them alternating call by call (old, new, then new, old, ...), each call after dropping the
  previous one's gradients, and reports the median of each side over ``--repeats`` calls and the ratio
  new/old (above 1: the new tree is slower). ``--rounds R`` runs the timing R times and reports the
  median of the R ratios and their range.

    PYTHONPATH=src python benchmarks/ab.py main                       # the full suite against main
    PYTHONPATH=src python benchmarks/ab.py HEAD~3 --quick --rounds 1  # small shapes, a smoke run
    PYTHONPATH=src python benchmarks/ab.py main --filter LayerNorm --repeats 51 --rounds 3 --json ab.json

The export is kept (``--cache``, default ``$TMPDIR/normlab-ab/<commit>``) so that numba's on-disk kernel
cache in it survives between runs; the first run of a revision compiles its kernels.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import normlab.nn
from normlab._io import write_atomic
from normlab.bench.cases import _MEMORY_FORMATS, MODES, Case, default_cases, quick_cases, select
from normlab.bench.timing import _random_state

BASE = "normlab_base"
"""The package name the revision's normlab is imported under."""

_IMPORT = re.compile(r"\bnormlab(?=[.\s,;)'\"]|$)", re.MULTILINE)


def _rename(text: str) -> str:
    """``text`` with every reference to the ``normlab`` package (``import normlab``, ``normlab.x``, the
    string ``"normlab.x"``) renamed to :data:`BASE`; ``NORMLAB_*`` environment names and ``normlab-x``
    words are left alone."""
    return _IMPORT.sub(BASE, text)


def export(rev: str, cache: Path | None = None) -> Path:
    """The folder holding revision ``rev``'s ``src/normlab`` as the package :data:`BASE` (exported once per
    commit; written to a temporary folder, then renamed, so an interrupted export is never used)."""
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    root = cache or Path(tempfile.gettempdir()) / "normlab-ab" / commit
    if (root / BASE / "__init__.py").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{commit[:12]}-"))
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "src/normlab"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
        package = work / BASE
        (work / "src" / "normlab").rename(package)
        shutil.rmtree(work / "src")
        for path in package.rglob("*.py"):
            path.write_text(_rename(path.read_text()))
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return root


class _Side:
    """One version set up for one case: its module (built from ``layers``), its copy of the input, the step."""

    def __init__(self, layers, case: Case, state: dict, x: torch.Tensor, grad_out: torch.Tensor):
        self.mode = MODES[case.mode]
        self.module = case.make(layers)
        self.module.load_state_dict(state)
        self.module.train(self.mode.train)
        self.x = x.detach().clone().requires_grad_(self.mode.backward)
        self.grad_out = grad_out

    def call(self) -> torch.Tensor:
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(self.mode.grad):
            y = self.module(self.x)
            if self.mode.backward:
                y.backward(self.grad_out)
        return y

    def timed(self) -> float:
        """Milliseconds of one :meth:`call` (the gradients it drops first not timed)."""
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.set_grad_enabled(self.mode.grad):
            y = self.module(self.x)
            if self.mode.backward:
                y.backward(self.grad_out)
        return (time.perf_counter() - start) * 1e3

    def answers(self) -> dict[str, torch.Tensor]:
        """After one call: the output, the gradients and the module's buffers (running statistics)."""
        out = {"output": self.call().detach()}
        if self.mode.backward:
            out["grad_input"] = self.x.grad
            out.update({f"grad_{n}": p.grad for n, p in self.module.named_parameters() if p.grad is not None})
        out.update({n: b for n, b in self.module.named_buffers()})
        return out


def _setup(case: Case, old_layers, seed: int) -> tuple[_Side, _Side]:
    gen = torch.Generator().manual_seed(seed)
    fmt = _MEMORY_FORMATS[case.layout]
    x = (2.0 * torch.randn(case.shape, generator=gen) + 0.5).contiguous(memory_format=fmt)
    grad_out = torch.randn(case.shape, generator=gen).contiguous(memory_format=fmt)
    state = _random_state(case.make(torch.nn), gen)
    return _Side(old_layers, case, state, x, grad_out), _Side(normlab.nn, case, state, x, grad_out)


def identical(case: Case, old_layers, seed: int) -> list[str]:
    """The answers (:meth:`_Side.answers`) in which the two versions differ on ``case``, by name."""
    old, new = _setup(case, old_layers, seed)
    a, b = old.answers(), new.answers()
    return sorted(k for k in a.keys() | b.keys()
                  if k not in a or k not in b or not torch.equal(a[k], b[k]) or a[k].stride() != b[k].stride())


def time_case(case: Case, old_layers, seed: int, repeats: int, warmup: int) -> tuple[float, float]:
    """Median milliseconds per call ``(old, new)``, the two alternating call by call, the order reversed on
    every other pair."""
    old, new = _setup(case, old_layers, seed)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(warmup + repeats):
        pair = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
        for name, side in pair:
            ms = side.timed()
            if r >= warmup:
                times[name].append(ms)
    return statistics.median(times["old"]), statistics.median(times["new"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare this tree against (e.g. main, HEAD~3, a commit)")
    parser.add_argument("--quick", action="store_true", help="the benchmark's small shapes")
    parser.add_argument("--filter", action="append", help="only cases whose key contains this (repeatable)")
    parser.add_argument("--repeats", type=int, default=31, help="timed calls per side per round (default 31)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per side first (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the ratio is their median (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-timing", action="store_true", help="the bit-identity check only")
    parser.add_argument("--cache", type=Path, default=None, help="where to export the revision")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this file")
    args = parser.parse_args(argv)

    root = export(args.rev, args.cache)
    sys.path.insert(0, str(root))
    old_layers = importlib.import_module(f"{BASE}.nn")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = select(quick_cases() if args.quick else default_cases(), args.filter)
    print(f"# {BASE} = {args.rev} ({root.name[:12]}) from {root}; new = {Path(normlab.__file__).parent}; "
          f"threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"# medians of {args.repeats} calls per side, alternating call by call; "
          f"{args.rounds} round(s), ratio = median over rounds (range)", flush=True)
    print("| case | identical | old ms | new ms | new/old | range |\n|---|---|---:|---:|---:|---|", flush=True)
    records = []
    for i, case in enumerate(cases):
        seed = 1000 + i
        try:
            differs = identical(case, old_layers, seed)
        except AttributeError as exc:  # a layer the revision lacks
            print(f"| {case.key} | {exc} | | | | |", flush=True)
            continue
        rec = {"case": case.key, "identical": not differs, "differs": differs}
        if not args.no_timing:
            rounds = [time_case(case, old_layers, seed, args.repeats, args.warmup) for _ in range(args.rounds)]
            ratios = [n / o for o, n in rounds]
            rec.update(old_ms=statistics.median(o for o, _ in rounds), new_ms=statistics.median(n for _, n in rounds),
                       ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        records.append(rec)
        same = "yes" if not differs else "no: " + ", ".join(differs)
        if args.no_timing:
            print(f"| {case.key} | {same} | | | | |", flush=True)
        else:
            print(f"| {case.key} | {same} | {rec['old_ms']:.3f} | {rec['new_ms']:.3f} | {rec['ratio']:.3f} | "
                  f"{rec['ratio_min']:.3f}–{rec['ratio_max']:.3f} |", flush=True)
    if args.json is not None:
        write_atomic(args.json, json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
