"""SyncBatchNorm over a gloo group of processes on 127.0.0.1: the torch engine's partial and apply steps
against the numba kernels' statistics seam (what ``NORMLAB_BACKEND=auto`` takes on CPU), training
forward+backward, interleaved in one run.

Each process (rank) normalizes its own batch of the shape given; every sample is the mean time of one
training step (forward, backward with a fixed ``dy``) over ``--calls`` calls, with the backend switched
between samples (torch, numba, then numba, torch, ...), both ranks in step (a barrier before each
sample); a sample's time is the slower rank's (the all-gather and all-reduce wait for it anyway). The
table gives the medians and the ratio ``torch ms / numba ms`` (above 1: the seam is faster). Before
timing, each case checks that both paths give the same output and input gradient.

    PYTHONPATH=src python3 benchmarks/sync_seam.py --nproc 2 --repeats 11
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normlab.nn import SyncBatchNorm

CASES = {  # per-rank input shape, channels_last
    "(32, 64, 28, 28) NCHW": ((32, 64, 28, 28), False),
    "(32, 64, 28, 28) channels_last": ((32, 64, 28, 28), True),
    "(16, 256, 14, 14) NCHW": ((16, 256, 14, 14), False),
    "(8, 512, 7, 7) NCHW": ((8, 512, 7, 7), False),
    "(1024, 1024) (N, C)": ((1024, 1024), False),
}
BACKENDS = ("torch", "numba")


def _step(layer, x, dy):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).backward(dy)


def _sample(layer, x, dy, calls):
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        _step(layer, x, dy)
    took = torch.tensor([(time.perf_counter() - start) / calls])
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def _case(shape, channels_last, repeats, calls, rank):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(shape, generator=gen) * 2 + 5
    dy = torch.randn(shape, generator=gen)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    layer = SyncBatchNorm(shape[1], timeout=120)
    results = {}
    for backend in BACKENDS:  # warm-up (numba compiles or loads its cache) and the agreement check
        os.environ["NORMLAB_BACKEND"] = backend
        x.grad = None
        y = layer(x)
        y.backward(dy)
        results[backend] = (y.detach(), x.grad.clone())
    for a, b in zip(results["torch"], results["numba"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    times = {backend: [] for backend in BACKENDS}
    for r in range(repeats):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            os.environ["NORMLAB_BACKEND"] = backend
            times[backend].append(_sample(layer, x, dy, calls))
    return {backend: statistics.median(t) * 1e3 for backend, t in times.items()}


def _worker(rank, world, port, repeats, calls, threads):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for name, (shape, channels_last) in CASES.items():
            ms = _case(shape, channels_last, repeats, calls, rank)
            if rank == 0:
                print(f"{name:34s} {ms['torch']:9.3f} {ms['numba']:9.3f} {ms['torch'] / ms['numba']:7.2f}",
                      flush=True)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--calls", type=int, default=5, help="training steps per sample")
    p.add_argument("--threads", type=int, default=1, help="torch (and numba) threads per process")
    args = p.parse_args()
    print(f"SyncBatchNorm, {args.nproc} gloo processes on 127.0.0.1, {args.threads} thread(s) each, float32, "
          f"train forward+backward per rank; median of {args.repeats} samples of {args.calls} steps, interleaved")
    print(f"{'per-rank input':34s} {'torch ms':>9s} {'numba ms':>9s} {'ratio':>7s}")
    mp.start_processes(_worker, args=(args.nproc, _free_port(), args.repeats, args.calls, args.threads),
                       nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
