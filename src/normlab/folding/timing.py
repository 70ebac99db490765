"""Eval-mode speed of a model against its folded copy, measured in the same run, interleaved."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Speedup", "eval_speedup"]


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
def eval_speedup(original: nn.Module, folded: nn.Module, inputs: tuple, repeats: int = 15,
                 sample_ms: float = 20.0) -> Speedup:
    """Time ``original`` and ``folded`` alternately, ``repeats`` samples each (a sample: the mean over as
    many calls as fill about ``sample_ms``), after a warm-up of each; return the medians."""
    for m in (original, folded):
        m(*inputs)
    one = max(_sample(original, inputs, 1), 1e-3)
    calls = max(1, int(sample_ms / one))
    a, b = [], []
    for _ in range(repeats):
        a.append(_sample(original, inputs, calls))
        b.append(_sample(folded, inputs, calls))
    return Speedup(statistics.median(a), statistics.median(b), repeats)
