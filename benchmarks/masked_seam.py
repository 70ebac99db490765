"""Masked BatchNorm: the statistics seam (masked partial moments → merge → apply, the path normlab takes)
against the gathered rows (valid positions gathered, BatchNorm on them, placed back), each interleaved in
one process (A, B, A, B, ...; the ratio of medians is printed), training forward and forward+backward, on
each backend (``NORMLAB_BACKEND`` the same for both; the gather path is called directly):

* on the torch engine: the seam's torch operations vs the engine's BatchNorm on the gathered rows;
* on the numba kernels: their masked seam vs their fused BatchNorm on the gathered rows.

    PYTHONPATH=src python3 benchmarks/masked_seam.py --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import normlab.functional as F
from normlab.bench.variants import bench_mask
from normlab.core import masked

CASES = {"(32, 128, 256) (N, L, C)": ((32, 128, 256), -1), "(64, 196, 768) (N, L, C)": ((64, 196, 768), -1),
         "(32, 256, 128) (N, C, L)": ((32, 256, 128), 1)}


def _gathered(x, mask, channel_dim, w, b, rm, rv):
    index = masked.positions(mask)
    rows = masked.gather_valid(x, index, channel_dim)
    y = F.batch_norm(rows, rm, rv, w, b, training=True)
    return masked.scatter_valid(y, index, x, channel_dim)


def _seam(x, mask, channel_dim, w, b, rm, rv):
    return F._masked_batch_norm("bench", x, mask, channel_dim, rm, rv, w, b, True, 0.1, 1e-5)


def _time(fn, backend):
    os.environ["NORMLAB_BACKEND"] = backend
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, (shape, channel_dim) in CASES.items():
        gen = torch.Generator().manual_seed(0)
        c = shape[channel_dim]
        x = torch.randn(shape, generator=gen)
        mask = bench_mask((shape[0], shape[1] if channel_dim == -1 else shape[2]))
        dy = torch.randn(shape, generator=gen)
        w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        xg = x.clone().requires_grad_(True)
        for peer_backend in ("torch", "numba"):
            for mode in ("forward", "forward+backward"):
                def run(impl, mode=mode):
                    if mode == "forward":
                        return torch.no_grad()(lambda: impl(x, mask, channel_dim, w, b, rm, rv))
                    return lambda: impl(xg, mask, channel_dim, w, b, rm, rv).backward(dy)
                seam = (run(_seam), peer_backend)
                gathered = (run(_gathered), peer_backend)
                for fn, backend in (seam, gathered):  # warm-up (numba compiles on first use)
                    _time(fn, backend)
                times = {"seam": [], "gathered": []}
                for i in range(args.repeats):
                    order = (("seam", seam), ("gathered", gathered))
                    for key, (fn, backend) in (order if i % 2 == 0 else order[::-1]):
                        times[key].append(_time(fn, backend))
                s, g = statistics.median(times["seam"]), statistics.median(times["gathered"])
                print(f"{name:26} {peer_backend:5} {mode:16} seam {s * 1e3:8.2f} ms   gathered {g * 1e3:8.2f} ms   "
                      f"seam/gathered {s / g:.2f}", flush=True)


if __name__ == "__main__":
    main()
