r"""Batch renormalization layers (Ioffe 2017), drop-in where ``torch.nn.BatchNorm1d/2d/3d`` stand.

In training,

.. math::
    r = \mathrm{clip}\Big(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\Big),\quad
    d = \mathrm{clip}\Big(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\Big),\quad
    y = \gamma \Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta

with the batch's μ_B, σ_B = sqrt(σ²_B + eps) and the running μ, σ = sqrt(running_var + eps); r and d are
constants in the backward (derivation in :mod:`normlab.core.renorm`). The running statistics are updated
with the batch's as in BatchNorm. Eval mode normalizes with the running statistics, as BatchNorm does.

The limits follow the paper's schedule, by training step t (``num_batches_tracked``, BatchNorm's own
persisted counter, so the schedule survives a checkpoint and a torch.nn BatchNorm state_dict loads into
it and continues from its count): plain BatchNorm (r_max = 1, d_max = 0) for t < ``warmup_steps``, then
r_max rises linearly to its final value at ``r_max_steps`` and d_max to its final value at
``d_max_steps``. The defaults are the paper's: 5k, 40k and 25k steps. ``warmup_steps=0, r_max_steps=0,
d_max_steps=0`` applies the final limits from the first step.

A training call that may not update the running statistics (a checkpointed segment's recomputation, or
a later call inside :class:`normlab.update_once`, :mod:`normlab.nn.once`) takes r and d against the
running statistics and step that the step's updating call started from, and updates nothing: the
recomputation gives the first run's output exactly, and the schedule advances once per step. The update
itself is guarded and follows ``convention`` as BatchNorm's (:mod:`normlab.core.guard`).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from normlab import functional as F
from normlab.core import checks
from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.conventions import DEFAULT, given
from normlab.nn.layouts import LAYOUTS, variant_doc
from normlab.nn.once import may_update

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _ramp(step: int, start: int, end: int, final: float, initial: float) -> float:
    """``initial`` before ``start``, ``final`` from ``end`` on, linear in between."""
    if step < start:
        return initial
    if step >= end:
        return final
    return initial + (final - initial) * (step - start) / (end - start)


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = DEFAULT, momentum: float | None = DEFAULT,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
                 r_max_steps: int = 40000, d_max_steps: int = 25000, device=None, dtype=None, *,
                 convention: str = "torch", guard_stats: bool | None = None) -> None:
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps
        super().__init__(num_features, affine=affine, track_running_stats=True, device=device, dtype=dtype,
                         convention=convention, guard_stats=guard_stats, **given(eps=eps, momentum=momentum))
        self._step_start: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def _check_config(self) -> None:
        super()._check_config()
        name = type(self).__name__
        checks.check_renorm_limits(self.r_max, self.d_max, name)
        steps = (self.warmup_steps, self.r_max_steps, self.d_max_steps)
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in steps) or (
            self.r_max_steps < self.warmup_steps or self.d_max_steps < self.warmup_steps
        ):
            raise ValueError(
                f"{name}: warmup_steps, r_max_steps and d_max_steps must be integers >= 0 with r_max_steps and "
                f"d_max_steps >= warmup_steps (the limits relax after the warm-up), got {steps}."
            )

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at ``step`` (default: the layer's ``num_batches_tracked``)."""
        t = int(self.num_batches_tracked) if step is None else step
        w = self.warmup_steps
        return (_ramp(t, w, self.r_max_steps, float(self.r_max), 1.0),
                _ramp(t, w, self.d_max_steps, float(self.d_max), 0.0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._normalize(input)
        self._check_config()
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__}: batch renormalization needs the running statistics "
                             f"(track_running_stats=True).")
        name = type(self).__name__
        checks.check_floating(input, name)
        checks.check_ndim(input, name, self._ranks, self._layout)
        checks.check_channels(input, self.num_features, name)
        # Not on a checkpointed segment's recomputation, nor after the first call inside update_once: those
        # renormalize against the running statistics and step that the step's updating call started from.
        updating = may_update(self)
        if updating or getattr(self, "_step_start", None) is None:
            self._step_start = (self.running_mean.detach().clone(), self.running_var.detach().clone(),
                                int(self.num_batches_tracked))
        running_mean, running_var, step = self._step_start
        r_max, d_max = self.limits(step)
        skipped = getattr(self, "num_batches_skipped", 0)
        y = F._batch_renorm(name, input, running_mean if not updating else self.running_mean,
                            running_var if not updating else self.running_var, self.weight, self.bias, True,
                            self._update_factor() if updating else 0.0, self.eps, r_max, d_max, update=updating,
                            **self._guarded_update())
        if updating and self.num_batches_skipped == skipped:
            self._count_batch(input)
        return y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}")


_WHAT, _FAMILY, _MODULE = "Batch renormalization", "BatchRenorm", "normlab.nn.renorm"


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    __doc__ = variant_doc(_WHAT, _FAMILY, _MODULE, "1d", """
num_features: C. eps, momentum, affine, guard_stats, convention: as in :class:`~normlab.nn.BatchNorm1d` (the
    running statistics are always tracked: r and d need them).
r_max: final clip of r (>= 1). Default 3.
d_max: final clip of d (>= 0). Default 5.
warmup_steps: training steps of plain BatchNorm. Default 5000.
r_max_steps, d_max_steps: steps at which r_max and d_max reach their final values. Defaults 40000, 25000.""", """
>>> bn = nn.BatchRenorm1d(100, warmup_steps=0, r_max_steps=0, d_max_steps=0)
>>> y = bn(torch.randn(4, 100))""")
    _ranks, _layout, _ = LAYOUTS["1d"]


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    __doc__ = variant_doc(_WHAT, _FAMILY, _MODULE, "2d", example="""
>>> bn = nn.BatchRenorm2d(16)
>>> y = bn(torch.randn(4, 16, 8, 8))""")
    _ranks, _layout, _ = LAYOUTS["2d"]


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    __doc__ = variant_doc(_WHAT, _FAMILY, _MODULE, "3d")
    _ranks, _layout, _ = LAYOUTS["3d"]
