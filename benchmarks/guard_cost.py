"""What guarded running statistics cost on the numba path: a BatchNorm2d training forward.

Two comparisons, each interleaved in one process (A, B, A, B, ...; the ratio of medians is printed):

* kernel: the BatchNorm forward kernel of ``--rev`` (a git revision from before the guard, read with
  ``git show``) against today's with ``guarded=True``, on the same arrays, updating running statistics;
* layer: ``normlab.nn.BatchNorm2d`` in training, ``guard_stats=True`` against ``guard_stats=False``.

    PYTHONPATH=src python3 benchmarks/guard_cost.py --rev ff4ed73
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import normlab.nn as nl
from normlab.kernels.numba import planar, stream

SHAPES = [(8, 16, 8, 8), (32, 64, 28, 28), (64, 256, 14, 14), (32, 512, 7, 7)]


def _old_kernels(rev: str):
    """The kernels module of git revision ``rev``, compiled into a temporary directory."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:src/normlab/kernels/cpu.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="normlab-guard-")) / "cpu_before.py"
    path.write_text(text)
    # A revision's single kernels module imported its streaming stores as normlab.kernels.stream.
    sys.modules.setdefault("normlab.kernels.stream", stream)
    spec = importlib.util.spec_from_file_location("cpu_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interleaved(a, b, repeat: int) -> tuple[float, float]:
    """Median seconds of ``a()`` and ``b()`` called alternately ``repeat`` times each (after a warm-up)."""
    for _ in range(3):
        a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        for f, t in ((a, ta), (b, tb)):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def kernel_case(old, shape, repeat):
    n, c, h, w = shape
    x = np.random.default_rng(0).standard_normal((n, c, h * w)).astype(np.float32)
    y = np.empty_like(x)
    wt, bs = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    threads = torch.get_num_threads()
    parts = np.empty((max(1, min(threads, n * c)), 2, c))
    stats = np.empty((4, c), np.float32)
    unbias = n * h * w / (n * h * w - 1)
    args = (x, wt, bs, 1e-5, True, stats, y, x, 0, rm, rv, 0.1, unbias, parts, False)
    return _interleaved(lambda: old.bn_planar_forward(*args), lambda: planar.bn_planar_forward(*args, True), repeat)


def layer_case(shape, repeat):
    x = torch.randn(shape)
    on, off = nl.BatchNorm2d(shape[1], guard_stats=True), nl.BatchNorm2d(shape[1], guard_stats=False)
    return _interleaved(lambda: off(x), lambda: on(x), repeat)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="git revision whose kernel is the 'before' (omit: layer comparison only)")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    old = _old_kernels(args.rev) if args.rev else None
    print(f"{'shape':>20} {'compare':>28} {'A µs':>9} {'B µs':>9} {'B/A':>6}")
    for shape in SHAPES:
        if old is not None:
            a, b = kernel_case(old, shape, args.repeat)
            print(f"{str(shape):>20} {'kernel: before / guarded':>28} {a * 1e6:9.1f} {b * 1e6:9.1f} {b / a:6.3f}")
        a, b = layer_case(shape, args.repeat)
        print(f"{str(shape):>20} {'layer: guard off / on':>28} {a * 1e6:9.1f} {b * 1e6:9.1f} {b / a:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
