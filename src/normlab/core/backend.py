"""The contract every backend of the engine implements.

The engine (:mod:`normlab.core.engine`) computes a normalization with torch operations, or hands the
work to a *backend*: an object that computes the same forward and closed-form backward with its own
kernels (numba on CPU tensors, Triton on CUDA tensors; both live in the ``kernels`` package, above the
core). Core never chooses one: the caller (:mod:`normlab.functional`, which asks the kernels' dispatch)
passes the backend object to the engine's functions, or ``None`` for the torch engine.

A backend returns what :func:`~normlab.core.engine.forward_torch` and
:func:`~normlab.core.engine.backward_torch` return, with the same precision guarantees
(:mod:`normlab.core.conventions`): every backend saves the same statistics, so a backward may run on
another backend than its forward (the torch engine's, when a graph is requested).
"""

from __future__ import annotations

import functools
import inspect
from typing import Protocol, runtime_checkable

import torch

from normlab.core.plan import Plan

__all__ = ["Backend", "Statistics", "seam_takes"]

Statistics = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor]
"""``(y, shift, mean_shifted, var, rstd)``: the output and the statistics a forward saves."""


@runtime_checkable
class Backend(Protocol):
    """What the engine asks of a backend.

    Two capabilities are optional, and asked for with ``getattr``:

    * ``updates_running(x, plan, running_mean, running_var) -> bool``: whether :meth:`forward`, given
      ``running=(running_mean, running_var, momentum)``, updates them itself in the pass that computes
      the batch's statistics (else the engine updates them afterwards);
    * ``empty_like(t) -> Tensor``: an uninitialized dense tensor like ``t`` in the backend's recycled
      memory, for callers that assemble one output from several results (ghost and masked batch norm).

    Every kernel backend also has BatchNorm's statistics seam (the steps of :mod:`normlab.core.stats`, with
    a caller's combine between them; a ``ValueError`` for other plans), giving its fused path's results
    with one place and the identity combine; callers find it with :func:`normlab.core.stats.seam_of`
    (SyncBatchNorm's combine is its process group):

    * ``partial_moments(x, plan)``: this place's ``(n, s, d, M2)`` per channel, (1, 4, C) float64 on
      ``x``'s device, as :func:`normlab.core.stats.partial_moments` packs them (n = 0 for an empty ``x``);
    * ``apply_moments(x, weight, bias, merged, plan, eps, residual=None, relu=False, running=None)``:
      :meth:`forward`'s results from ``merged`` = :func:`~normlab.core.stats.merge_moments`' (N, K, D, σ²),
      ``running`` updated with them (count N);
    * ``partial_grad_sums(dy, x, shift, mean_shifted, rstd, plan, y=None)``: this place's
      ``(Σ dy', Σ dy'·x̂)`` per channel, (2, C) float64 (∂L/∂β and ∂L/∂γ, not multiplied by γ; dy' masked
      by ``y > 0`` after a fused ReLU);
    * ``apply_grad(dy, x, weight, shift, mean_shifted, rstd, totals, count, plan, y=None, residual=False)``:
      dx from the combined sums over ``count`` values per channel (with ``y``: ``(dx, dres)``).

    Two optional keywords of all four, asked for with :func:`seam_takes`: ``mask=`` (a bool tensor, one
    entry per position of a channel: statistics over the True ones, outputs and gradients 0 at the others;
    masked BatchNorm) and ``group_size=`` (samples: every step per group of that many consecutive samples,
    results with a leading group axis, ``count`` one per group; ghost BatchNorm).
    """

    name: str
    """The name ``NORMLAB_BACKEND`` selects it by."""

    def unsupported(self, x: torch.Tensor, plan: Plan) -> str | None:
        """Why this backend cannot normalize ``x`` with ``plan`` (device, dtype, axes), or ``None``."""

    def fuses(self, plan: Plan) -> bool:
        """Whether :meth:`forward` can fuse ``relu(y + residual)`` into its pass for ``plan``."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                fixed_mean: torch.Tensor | None, fixed_var: torch.Tensor | None, plan: Plan, eps: float,
                residual: torch.Tensor | None = None, relu: bool = False) -> Statistics:
        """``(y, shift, mean_shifted, var, rstd)``: ``y`` in ``x``'s shape, dtype and memory format; the
        statistics in the accumulation dtype, flat (one value per statistic) or in ``plan.stat_shape``,
        with μ = shift + mean_shifted (``mean_shifted`` is ``None`` for fixed statistics, where ``shift``
        is the fixed mean). ``relu`` (and ``residual``): ``relu(y + residual)`` where :meth:`fuses`."""

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor,
                 mean_shifted: torch.Tensor | None, rstd: torch.Tensor, plan: Plan, batch_stats: bool,
                 need: tuple[bool, bool, bool], y: torch.Tensor | None = None, residual: bool = False):
        """``(dx, dγ, dβ)`` (``None`` where ``need`` says so): dx in ``x``'s shape, dtype and memory
        format, dγ and dβ flat in the accumulation dtype. ``y`` (the output of a fused ReLU, whose mask
        the gradient takes) adds a fourth result, the residual's gradient (``residual``: one was added)."""


def seam_takes(backend, keyword: str) -> bool:
    """Whether ``backend`` (``None``: the torch engine, which has no seam methods) has the statistics seam
    and its ``partial_moments`` takes ``keyword`` (``"mask"``, ``"group_size"``): the optional capabilities
    listed in :class:`Backend`."""
    method = getattr(backend, "partial_moments", None)
    return method is not None and keyword in _keywords(method)


@functools.lru_cache(maxsize=64)
def _keywords(method) -> frozenset[str]:
    """The parameter names of a bound method (cached: asked at every layer call)."""
    return frozenset(inspect.signature(method).parameters)
