"""What ``normlab bench`` prints: the header and aligned table of case records, the end-to-end lines, and
``--render`` of records saved earlier with ``--json``."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from normlab.bench.cases import MODES
from normlab.bench.models import format_step
from normlab.bench.timing import COMPILE, IMPLEMENTATIONS, SAMPLE_MS, Implementation, ratio_key

__all__ = ["Column", "MODEL_COLUMNS", "columns", "format_models", "format_table", "header", "render", "report"]


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: its header, how to render a record, and whether it is right-aligned."""

    header: str
    render: Callable[[dict[str, Any]], str]
    right: bool = True


def _ms(name: str) -> Callable[[dict[str, Any]], str]:
    def render(r: dict[str, Any]) -> str:
        if r.get(f"{name}_error"):
            return "failed"
        return "-" if r.get(f"{name}_ms") is None else f"{r[f'{name}_ms']:.3f}"

    return render


def _number(key: str, fmt: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: "-" if r.get(key) is None else format(r[key], fmt)


def _ratio(key: str) -> Callable[[dict[str, Any]], str]:
    def render(r: dict[str, Any]) -> str:
        if r["status"] != "ok":
            return f"!! MISMATCH ({', '.join(r['mismatch'])}: {r['mismatch_in']}, err {r['max_err']:.3g}x tol)"
        return "-" if r.get(key) is None else f"{r[key]:.2f}x"

    return render


def columns(implementations: Sequence[Implementation] = IMPLEMENTATIONS) -> list[Column]:
    """The table's columns: the case, each implementation's median ms, the subject's GB/s, the copy's
    GB/s, each implementation's % of it, then each peer's ratio."""
    subject = implementations[0].name
    return [
        Column("module", lambda r: r["module"], right=False),
        Column("shape", lambda r: "x".join(map(str, r["shape"])), right=False),
        Column("layout", lambda r: r["layout"], right=False),
        Column("mode", lambda r: MODES[r["mode"]].label, right=False),
        *(Column(f"{impl.name} ms", _ms(impl.name)) for impl in implementations),
        Column(f"{subject} GB/s", _number(f"{subject}_gbps", ".1f")),
        Column("copy GB/s", _number("copy_gbps", ".1f")),
        *(Column(f"{impl.name} %copy", _number(f"{impl.name}_pct_copy", ".0f")) for impl in implementations),
        *(
            Column(f"{impl.name}/{subject}", _ratio(ratio_key(impl.name, implementations)), right=False)
            for impl in implementations[1:]
        ),
    ]



def header(records: Sequence[dict[str, Any]], implementations: Sequence[Implementation] = IMPLEMENTATIONS) -> str:
    """The lines above the table: what ran, where, and how to read the ratio."""
    subject, ref = implementations[0].name, implementations[1].name
    first = records[0] if records else {"threads": torch.get_num_threads(), "device": "cpu",
                                        "repeats": 0, "warmup": 0}
    where = first["device"] if not first.get("device_name") else f"{first['device']} ({first['device_name']})"
    return "\n".join([
        f"normlab bench: {subject} vs {', '.join(i.name for i in implementations[1:])}, float32, "
        f"{where}, torch {first.get('torch', torch.__version__)}, {first['threads']} threads",
        f"Each case: median of {first['repeats']} timed samples after {first['warmup']} warmup(s), a sample "
        f"being the mean time per call over as many calls as fill {SAMPLE_MS:.0f} ms; implementations "
        f"interleaved, order alternating.",
        f"{ref}/{subject} = {ref} ms / {subject} ms (\"ratio\" in --json): > 1 means {subject} is faster, "
        f"< 1 means {ref} is faster.",
        f"Answers are checked against {ref} first; a case where {subject} disagrees reads MISMATCH and is not "
        f"timed (a further peer that disagrees is left out of that case's timing and named under the table).",
        "GB/s: bytes a normalization must move (fwd: read x, write y; fwd+bwd: also read x and dy, write dx) "
        "per second; %copy: that over the GB/s of y.copy_(x) (2 x the input's bytes), timed in the same run.",
    ])


def format_table(
    records: Sequence[dict[str, Any]], implementations: Sequence[Implementation] = IMPLEMENTATIONS
) -> str:
    """The header and an aligned table of ``records`` (as returned by :func:`run_cases`)."""
    cols = columns(implementations)
    cells = [[c.header for c in cols]] + [[c.render(r) for c in cols] for r in records]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]

    def line(row: list[str]) -> str:
        return "  ".join(
            (s.rjust(w) if c.right else s.ljust(w)) for s, w, c in zip(row, widths, cols)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    failures = sorted({f"{i.name} failed: {r[f'{i.name}_error']}" for r in records for i in implementations
                       if r.get(f"{i.name}_error")})
    return "\n".join([header(records, implementations), "", line(cells[0]), rule, *map(line, cells[1:]), *failures])


def report(records: Sequence[dict[str, Any]], implementations: Sequence[Implementation],
           steps: Sequence[dict[str, Any]] = ()) -> str:
    """What ``normlab bench`` prints: the table of ``records`` (if any), then each CNN step's line."""
    parts = [format_table(records, implementations)] if records else []
    return "\n\n".join(parts + [format_step(step) for step in steps])


def render(path: str) -> int:
    """Print the table (and the CNN line) of the records ``normlab bench --json`` saved in ``path``, as the
    run that measured them would have printed it; 2 if the file cannot be read as such records."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except OSError as exc:
        print(f"normlab bench: --render {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        print(f"normlab bench: --render {path}: not JSON ({exc}); it takes what normlab bench --json printed",
              file=sys.stderr)
        return 2
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "op" in r for r in records):
        print(f"normlab bench: --render {path}: expected the non-empty list of records that normlab bench --json "
              f"prints", file=sys.stderr)
        return 2
    cases = [r for r in records if r["op"] != "small_cnn"]
    steps = [r for r in records if r["op"] == "small_cnn"]
    compiled = any("compile_ms" in r or "compile_error" in r for r in cases)
    try:
        if all(r["op"] == "model" for r in records):  # normlab bench --models --json
            print(format_models(records))
            return 0
        print(report(cases, (*IMPLEMENTATIONS, COMPILE) if compiled else IMPLEMENTATIONS, steps))
    except (KeyError, TypeError) as exc:
        print(f"normlab bench: --render {path}: a record lacks a field the table needs ({exc}); was it written "
              f"by normlab bench --json?", file=sys.stderr)
        return 2
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _model_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


MODEL_COLUMNS: tuple[Column, ...] = (
    Column("model", lambda r: r["label"], right=False),
    Column("input", lambda r: "x".join(map(str, r["shape"])), right=False),
    Column("layout", lambda r: r["layout"], right=False),
    Column("thr", lambda r: str(r["threads"])),
    Column("mode", lambda r: r["mode"], right=False),
    Column("torch ms", lambda r: _model_ms(r["torch_ms"])),
    Column("normlab ms", lambda r: _model_ms(r["normlab_ms"])),
    Column("fused ms", lambda r: _model_ms(r["fused_ms"])),
    Column("drop-in", lambda r: _x(r["ratio"]) if r["status"] == "ok" else f"MISMATCH ({r['max_err']:.3g}x tol)"),
    Column("fused", lambda r: _x(r["ratio_fused"])),
    Column("norm", lambda r: _pct(r["norm_share"])),
    Column("limit", lambda r: _x(r["limit"])),
    Column("+relu", lambda r: _pct(None if r["limit_fused"] is None else r["norm_share"] + r["relu_share"])),
    Column("limit fused", lambda r: _x(r["limit_fused"])),
)
"""The columns of ``normlab bench --models``."""


def format_models(records: Sequence[dict[str, Any]]) -> str:
    """The header and table of ``normlab bench --models`` records."""
    first = records[0] if records else {"threads": 1, "repeats": 0, "warmup": 0, "device_name": "", "torch": ""}
    head = "\n".join([
        f"normlab bench --models: whole steps, torch.nn vs normlab (drop-in: normlab.nn.convert(model); fused: "
        f"convert(model, fuse=True)), float32, cpu ({first['device_name']}), torch {first['torch']}",
        f"Each row: median of {first['repeats']} timed samples after {first['warmup']} warmup(s), the three "
        f"models interleaved; train = forward, cross-entropy, backward, SGD step; eval = no-grad forward.",
        "drop-in, fused: torch ms / normlab ms (> 1: normlab faster). norm, +relu: share of torch.nn's time in "
        "normalization (and ReLU) by torch.profiler; limit = 1 / (1 - share): the speed-up if it cost nothing.",
    ])
    cells = [[c.header for c in MODEL_COLUMNS]] + [[c.render(r) for c in MODEL_COLUMNS] for r in records]
    widths = [max(len(row[i]) for row in cells) for i in range(len(MODEL_COLUMNS))]

    def line(row: list[str]) -> str:
        return "  ".join(s.rjust(w) if c.right else s.ljust(w) for s, w, c in zip(row, widths, MODEL_COLUMNS)).rstrip()

    return "\n".join([head, "", line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
