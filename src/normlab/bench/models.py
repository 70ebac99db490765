"""End-to-end timings: whole training steps of models built from torch.nn and from normlab's layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import normlab.nn
from normlab.bench.timing import DEFAULT_STEP_REPEATS, DEFAULT_WARMUP, _time_case, device_name

__all__ = ["format_step", "train_step"]


class _StepTrial:
    """One SGD step of a model on a fixed batch: forward, cross-entropy, backward, update."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor):
        self.name, self.model, self.x, self.target = name, model, x, target
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        self.optimizer.step()
        return loss


def train_step(
    batch: int = 64,
    repeats: int = DEFAULT_STEP_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Time one SGD training step of :func:`normlab.demo.small_cnn` built from ``normlab.nn`` (as a drop-in
    replacement, and with ``fused=True``: BatchNormReLU2d for each BatchNorm2d + ReLU) and from ``torch.nn``
    (same initial weights, same batch of ``batch`` 1x28x28 images), interleaved.

    Returns a record with ``op`` ``"small_cnn"``, ``mode`` ``"train_step"``, ``normlab_ms``, ``fused_ms`` and
    ``torch_ms`` (medians), ``ratio`` (torch ms / normlab ms) and ``ratio_fused`` (torch ms / fused ms),
    besides the fields a case record has.
    """
    from normlab.demo import small_cnn

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    torch.manual_seed(seed)
    ours = small_cnn(normlab.nn).to(device)
    fused = small_cnn(normlab.nn, fused=True).to(device)
    theirs = small_cnn(torch.nn).to(device)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():  # same weights: the fused variant's parameters and buffers come in the same order
        for a, b in zip([*fused.parameters(), *fused.buffers()], [*ours.parameters(), *ours.buffers()]):
            a.copy_(b)
    trials = [_StepTrial("normlab", ours, x, target), _StepTrial("fused", fused, x, target),
              _StepTrial("torch", theirs, x, target)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        medians = _time_case(trials, warmup, repeats, device)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {
        "op": "small_cnn", "module": "small_cnn train step", "shape": [batch, 1, 28, 28], "layout": "contiguous",
        "mode": "train_step", "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "repeats": repeats, "warmup": warmup, "threads": used,
        "status": "ok", "normlab_ms": medians["normlab"], "fused_ms": medians["fused"],
        "torch_ms": medians["torch"], "ratio": medians["torch"] / medians["normlab"],
        "ratio_fused": medians["torch"] / medians["fused"],
    }


def format_step(record: dict[str, Any]) -> str:
    """The end-to-end line printed under the table."""
    batch = record["shape"][0]
    return (f"End to end, one SGD step of normlab.demo.small_cnn (batch {batch} of 1x28x28, median of "
            f"{record['repeats']}): torch.nn {record['torch_ms']:.2f} ms; normlab drop-in layers "
            f"{record['normlab_ms']:.2f} ms, torch/normlab {record['ratio']:.2f}x; with BatchNormReLU2d in place "
            f"of BatchNorm2d + ReLU {record['fused_ms']:.2f} ms, {record['ratio_fused']:.2f}x")
