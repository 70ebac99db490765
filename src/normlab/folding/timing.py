"""Eval-mode speed of a model against its folded copy, measured in the same run, interleaved."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Speedup", "eval_speedup", "interleaved_ms"]


@dataclass
class Speedup:
    """Median milliseconds per forward of the original and the folded model, and their ratio."""

    original_ms: float
    folded_ms: float
    repeats: int

    @property
    def ratio(self) -> float:
        return self.original_ms / self.folded_ms

    def __str__(self) -> str:
        return (f"{self.ratio:.2f}x (original {self.original_ms:.3g} ms, folded {self.folded_ms:.3g} ms per "
                f"forward; medians of {self.repeats} interleaved samples)")


def _sample(model: nn.Module, inputs: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(*inputs)
    return (time.perf_counter() - start) * 1e3 / calls


@torch.no_grad()
def interleaved_ms(models: dict[str, nn.Module], inputs: tuple, repeats: int = 15,
                   sample_ms: float = 20.0) -> dict[str, float]:
    """Median milliseconds per forward of each model, timed in turn, ``repeats`` samples each (a sample:
    the mean over as many calls as fill about ``sample_ms`` for the first model), after a warm-up.

    Denormal floats are flushed to zero while timing (and the setting put back to torch's default after):
    a model that produces tiny activations (e.g. a copy without its BN layers) would otherwise be timed on
    the CPU's slow path for them."""
    torch.set_flush_denormal(True)
    try:
        return _interleaved(models, inputs, repeats, sample_ms)
    finally:
        torch.set_flush_denormal(False)


def _interleaved(models, inputs, repeats, sample_ms):
    for m in models.values():
        m(*inputs)
    one = max(_sample(next(iter(models.values())), inputs, 1), 1e-3)
    calls = max(1, int(sample_ms / one))
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            samples[name].append(_sample(m, inputs, calls))
    return {name: statistics.median(v) for name, v in samples.items()}


def eval_speedup(original: nn.Module, folded: nn.Module, inputs: tuple, repeats: int = 15,
                 sample_ms: float = 20.0) -> Speedup:
    """Time ``original`` and ``folded`` alternately (:func:`interleaved_ms`); return the medians."""
    ms = interleaved_ms({"original": original, "folded": folded}, inputs, repeats, sample_ms)
    return Speedup(ms["original"], ms["folded"], repeats)
