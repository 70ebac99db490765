"""The per-call cost of a small BatchNorm2d training call, this tree against a git revision and torch.nn, in one
process (benchmarks/README.md, "Cuts made in Python"). The revision is exported as ``normlab_base`` by
:func:`ab.export`; the three layers are called in turn (the order reversed every other call), each call timed
on its own, and the medians printed with the ratios new/old and torch.nn/new:

    PYTHONPATH=src python benchmarks/per_call_ab.py main "[2, 8, 4, 4]" channels_last [calls]

The figures include the module call, and for forward+backward the ``sum().backward()``: what a user's
training step pays per layer on a tensor too small for the kernel to matter.
"""
import json, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ab import BASE, export  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(export(sys.argv[1])))
old_nn = __import__(f"{BASE}.nn", fromlist=["nn"])
import normlab.nn as new_nn  # noqa: E402

shape = tuple(json.loads(sys.argv[2])) if len(sys.argv) > 2 else (2, 8, 4, 4)
fmt = torch.channels_last if len(sys.argv) <= 3 or sys.argv[3] == "channels_last" else torch.contiguous_format
calls = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
torch.manual_seed(0)
x0 = torch.randn(shape).contiguous(memory_format=fmt)
layers = {"old": old_nn.BatchNorm2d(shape[1]), "new": new_nn.BatchNorm2d(shape[1]),
          "torch.nn": torch.nn.BatchNorm2d(shape[1])}
inputs = {k: x0.clone().requires_grad_() for k in layers}


def forward(k):
    return lambda: layers[k](inputs[k])


def forward_backward(k):
    def call():
        inputs[k].grad = None
        for p in layers[k].parameters():
            p.grad = None
        layers[k](inputs[k]).sum().backward()
    return call


print(f"# {tuple(shape)} {'channels_last' if fmt is torch.channels_last else 'contiguous'}, 1 thread, median of "
      f"{calls} calls per side, old = {sys.argv[1]}")
for mode, make in (("train forward", forward), ("train forward+backward", forward_backward)):
    fns = {k: make(k) for k in layers}
    for f in fns.values():
        for _ in range(50):
            f()
    times = {k: [] for k in fns}
    for i in range(calls):
        for k in (list(fns) if i % 2 else list(fns)[::-1]):
            t = time.perf_counter_ns()
            fns[k]()
            times[k].append(time.perf_counter_ns() - t)
    med = {k: statistics.median(v) / 1e3 for k, v in times.items()}
    print(f"{mode:23s} " + "  ".join(f"{k} {v:6.1f} us" for k, v in med.items())
          + f"  new/old {med['new'] / med['old']:.3f}  torch.nn/new {med['torch.nn'] / med['new']:.3f}")
