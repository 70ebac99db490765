"""The numba backend's statistics seam per group of consecutive samples (``group_size=``): the launch side of
:mod:`.groups`' kernels, called by :class:`~normlab.kernels.numba.backend.NumbaBackend`'s seam methods.

Results and statistics carry a leading group axis: partial moments (G, 4, C), per-group statistics (G, C),
gradient sums (G, 2, C), one count per group.
"""

from __future__ import annotations

import numpy as np
import torch

from normlab.core.plan import Plan
from normlab.kernels.layout import CHANNEL_PLANES
from normlab.kernels.numba import buffers
from normlab.kernels.numba.backend import _Launch, _numpy, _param, _parts, _streams, _sync_threads

__all__ = ["apply", "grad", "grad_sums", "moments"]


def _no_fused_relu(y: torch.Tensor | None) -> None:
    """Refuse the mask of a fused ReLU, which the group kernels do not apply."""
    if y is not None:
        raise ValueError("the numba backend's statistics seam per group takes no fused ReLU")


def _group_layout(launch: _Launch, plan: Plan, group_size: int) -> tuple[int, int, int, tuple]:
    """``(G, size, per_entry, kernels)`` of a seam call per group (:mod:`.groups`): the groups, a group's
    entries of the kernels' axis 0, one entry's values per channel, and the family's group kernels."""
    from normlab.kernels.numba import groups

    n = plan.input_shape[0]
    count = -(-n // group_size)
    if launch.family == CHANNEL_PLANES:
        kernels = (groups.planar_group_moments, groups.planar_group_apply, groups.planar_group_grad_sums,
                   groups.planar_group_grad)
        return count, group_size, launch.shape.spatial, kernels
    kernels = (groups.rows_group_moments, groups.rows_group_apply, groups.rows_group_grad_sums,
               groups.rows_group_grad)
    return count, group_size * launch.shape.spatial, 1, kernels


def _group_stats(launch: _Launch, groups: int, shift, mean_shifted, rstd) -> np.ndarray:
    """Saved per-group statistics as the (G, 4, C) array the group kernels index (``var`` unset)."""
    stats = np.empty((groups, 4, launch.param_count), launch.np_dtype)
    for row, t in ((0, shift), (1, mean_shifted), (3, rstd)):
        stats[:, row] = _numpy(t.to(launch.acc)).reshape(groups, launch.param_count)
    return stats


def moments(launch: _Launch, x, plan: Plan, group_size: int) -> torch.Tensor:
    """The backend's ``partial_moments`` per group: (G, 4, C)."""
    groups, size, per_entry, kernels = _group_layout(launch, plan, int(group_size))
    packed = torch.zeros(groups, 4, launch.param_count, dtype=torch.float64)
    xa = launch.prepare(x)
    shifts = np.empty((groups, launch.param_count), launch.np_dtype)
    kernels[0](launch.array(xa), size, per_entry, shifts, _parts(_sync_threads(xa.numel()), launch), packed.numpy())
    return packed


def apply(launch: _Launch, x, weight, bias, merged, plan: Plan, eps: float, group_size: int):
    """The backend's ``apply_moments`` per group: ``(y, shift, mean_shifted, var, rstd)``, statistics (G, C)."""
    groups, size, _, kernels = _group_layout(launch, plan, int(group_size))
    c = launch.param_count
    packed = np.stack([torch.as_tensor(t).to(torch.float64).reshape(groups, c).numpy() for t in merged], axis=1)
    xa = launch.prepare(x)
    y = buffers.empty_like(xa)
    stats = np.empty((groups, 4, c), launch.np_dtype)
    w, b = _param(weight, c, launch.acc, 1.0), _param(bias, c, launch.acc, 0.0)
    kernels[1](launch.array(xa), w, b, eps, stats, launch.array(y), np.ascontiguousarray(packed), size,
               _parts(_sync_threads(xa.numel()), launch), _streams(y))
    shift, mean_shifted, var, rstd = torch.from_numpy(stats).unbind(1)
    return launch.finish(y, x), shift, mean_shifted, var, rstd


def grad_sums(launch: _Launch, dy, x, shift, mean_shifted, rstd, plan: Plan, group_size: int, y=None):
    """The backend's ``partial_grad_sums`` per group: (G, 2, C)."""
    _no_fused_relu(y)
    groups, size, _, kernels = _group_layout(launch, plan, int(group_size))
    sums = torch.zeros(groups, 2, launch.param_count, dtype=torch.float64)
    xa, dya = launch.prepare(x), launch.prepare(dy)
    stats = _group_stats(launch, groups, shift, mean_shifted, rstd)
    kernels[2](launch.array(xa), launch.array(dya), stats, size, _parts(_sync_threads(xa.numel()), launch),
               sums.numpy())
    return sums


def grad(launch: _Launch, dy, x, weight, shift, mean_shifted, rstd, totals, count, plan: Plan, group_size: int,
         y=None):
    """The backend's ``apply_grad`` per group: dx from each group's ``totals`` over its ``count`` values."""
    _no_fused_relu(y)
    groups, size, _, kernels = _group_layout(launch, plan, int(group_size))
    xa, dya = launch.prepare(x), launch.prepare(dy)
    dx = buffers.empty_like(xa)
    stats = _group_stats(launch, groups, shift, mean_shifted, rstd)
    counts = torch.as_tensor(count, dtype=torch.float64).expand(groups).contiguous().numpy()
    kernels[3](launch.array(xa), launch.array(dya), _param(weight, launch.param_count, launch.acc, 1.0), stats,
               totals.to(torch.float64).contiguous().numpy(), counts, size, launch.array(dx),
               _parts(_sync_threads(xa.numel()), launch), _streams(dx))
    return launch.finish(dx, x)
