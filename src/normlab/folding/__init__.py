"""Fold a whole model's BN layers into its convolutions for inference: :func:`fold`.

In eval mode BN is a per-channel affine map, so next to a convolution or linear layer it can be merged
into that layer's weights and bias (the algebra, and when folding a BN into the layer *after* it is exact,
are in :mod:`normlab.folding.affine`). torch offers this one conv/BN pair at a time; :func:`fold` does the
whole model, on the graph torch.fx traces (:mod:`.graph`) or, where the model does not trace, by module
patterns (:mod:`.modules`), and reports what it folded, what it could not, and why.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from normlab.folding import graph, modules
from normlab.folding.affine import EvalAffine

__all__ = ["fold", "FoldReport", "EvalAffine"]

#: A float64 fold is exact up to rounding; an output further than this (relative to the output's size)
#: from the original means the folded model computes something else.
EXACT_RTOL = 1e-9


@dataclass
class FoldReport:
    """What :func:`fold` did.

    Attributes:
        method: ``"torch.fx"`` or ``"module patterns"`` (the model did not trace: ``trace_error`` says why).
        folded: ``(bn, layer, "after" | "before")``: the BN folded into the layer before or after it.
        unfolded: ``(bn, reason)``: BN layers replaced by their affine map (or left as they are).
        max_diff_float64, max_diff_float32: largest absolute output difference between the folded and the
            original eval model, both in that dtype, on the example inputs (``None`` without them).
        output_scale: the largest absolute output of the original model (for the differences' scale).
    """

    method: str
    folded: list[tuple[str, str, str]] = field(default_factory=list)
    unfolded: list[tuple[str, str]] = field(default_factory=list)
    trace_error: str | None = None
    max_diff_float64: float | None = None
    max_diff_float32: float | None = None
    output_scale: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s) via {self.method}"
                 + (f" (torch.fx: {self.trace_error})" if self.trace_error else "")]
        lines += [f"  {bn} -> {layer} ({'BN after the layer' if where == 'after' else 'BN before the layer'})"
                  for bn, layer, where in self.folded]
        if self.unfolded:
            lines.append(f"not folded: {len(self.unfolded)}")
            lines += [f"  {bn}: {reason}" for bn, reason in self.unfolded]
        if self.max_diff_float64 is not None:
            lines.append(f"largest output difference: {self.max_diff_float64:.3g} in float64, "
                         f"{self.max_diff_float32:.3g} in float32 (outputs up to {self.output_scale:.3g})")
        return "\n".join(lines)


def _fold_copy(model: nn.Module, example_inputs: tuple | None, pairs: bool):
    """Fold a deep copy of ``model``: ``(folded model, report without differences)``."""
    work = copy.deepcopy(model)
    try:
        gm = graph.trace(work)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, RuntimeError, ...)
        confirmed = modules.confirmed_pairs(work, example_inputs) if pairs and example_inputs is not None else None
        out, folded, unfolded = modules.fold_modules(work, confirmed)
        return out.eval(), FoldReport("module patterns", folded, unfolded, trace_error=f"{type(exc).__name__}: {exc}")
    out, folded, unfolded = graph.fold_graph(gm, example_inputs)
    return out.eval(), FoldReport("torch.fx", folded, unfolded)


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, inputs: tuple, dtype: torch.dtype) -> tuple[float, float]:
    cast = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    ya = [t for t in tree_leaves(a(*cast)) if isinstance(t, torch.Tensor)]
    yb = [t for t in tree_leaves(b(*cast)) if isinstance(t, torch.Tensor)]
    diff = max(((p.double() - q.double()).abs().max().item() for p, q in zip(ya, yb) if p.numel()), default=0.0)
    scale = max((p.double().abs().max().item() for p in ya if p.numel()), default=0.0)
    return diff, scale


def _check_eval(model: nn.Module) -> None:
    training = [name or type(m).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold: the model is in training mode ({', '.join(training[:3])}{' ...' if len(training) > 3 else ''}), "
            f"where BatchNorm normalizes with each batch's statistics and cannot be folded. Call model.eval() "
            f"first: folding computes the eval-mode model."
        )


def fold(model: nn.Module, example_inputs=None) -> tuple[nn.Module, FoldReport]:
    """A new eval-mode model computing ``model``'s eval-mode output with its BN layers folded into the
    adjacent convolutions and linear layers; ``model`` itself is untouched.

    Folded: a BN (torch.nn's, normlab's, SyncBatchNorm, frozen) after a Conv1d/2d/3d (any stride,
    padding, dilation, groups, padding_mode, bias or not), ConvTranspose1d/2d/3d or Linear whose output
    nothing else reads; and a BN before a Conv or Linear where that is exact (the Conv pads nothing, or
    pads by copying values: see :mod:`normlab.folding.affine`). The weights are computed in float64 and
    stored in the layer's dtype. A BN that cannot be folded (a ReLU between, a layer output read twice, a
    shared layer, ...) becomes its eval-mode affine map (:class:`EvalAffine`) and is listed with the
    reason; a BN whose eval output is not affine (no running statistics) stays as it is.

    The model is traced with torch.fx; where it does not trace, Sequential chains and named attribute
    pairs (``conv1``/``bn1``) are folded instead (see :mod:`normlab.folding.modules`).

    Args:
        model: a model in eval mode (``model.eval()``); a module in training mode is refused (ValueError).
        example_inputs: a tensor or a tuple of positional inputs. With them the report gives the largest
            output difference from the original in float64 and float32 (a warning is issued if the float64
            fold is off by more than rounding), and Linear/BatchNorm1d pairs are checked to be 2-D.

    Returns ``(folded_model, report)``; ``print(report)`` says what was folded and what not, and why.

    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    >>> folded, report = normlab.fold(model, torch.randn(2, 3, 8, 8))
    >>> report.folded
    [('1', '0', 'after')]
    """
    _check_eval(model)
    inputs = None
    if example_inputs is not None:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    folded, report = _fold_copy(model, inputs, pairs=True)
    if inputs is None:
        return folded, report
    diffs = {}
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(model).to(dtype)
        cast = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        candidate, _ = _fold_copy(original, cast, pairs=True)
        diffs[dtype] = _max_diff(original, candidate, inputs, dtype)
    diff64, scale = diffs[torch.float64]
    if report.method == "module patterns" and diff64 > EXACT_RTOL * max(scale, 1.0):
        # a confirmed named pair may still have a layer output read elsewhere: refold without them
        folded, report = _fold_copy(model, inputs, pairs=False)
        original = copy.deepcopy(model).to(torch.float64)
        diffs[torch.float64] = _max_diff(original, _fold_copy(original, None, pairs=False)[0], inputs, torch.float64)
        original = copy.deepcopy(model).to(torch.float32)
        diffs[torch.float32] = _max_diff(original, _fold_copy(original, None, pairs=False)[0], inputs, torch.float32)
        report.unfolded.append(("(named pairs)", "folding the conv/bn attribute pairs changed the output; "
                                                 "they were left unfolded"))
        diff64, scale = diffs[torch.float64]
    report.max_diff_float64, report.output_scale = diff64, scale
    report.max_diff_float32 = diffs[torch.float32][0]
    if diff64 > EXACT_RTOL * max(scale, 1.0):
        warnings.warn(f"fold: the folded model's float64 output differs from the original's by {diff64:.3g} "
                      f"(outputs up to {scale:.3g}); it does not compute the same function.", stacklevel=2)
    return folded, report
