"""BatchNorm's statistics seam per group of consecutive samples: the virtual batches of ghost batch norm.

The batch is cut along axis 0 of the kernels' array into groups of ``size`` entries (samples of the
(N, C, S) planar array; rows of the (M, C) channels-last array, ``size`` = samples · positions per
sample), the last group possibly smaller. Each function runs the fused BatchNorm kernels of its family
(:mod:`.planar`, :mod:`.columns`) on every group in turn, in one call: each group is a contiguous slice,
so every value is read where it lies, with no copy and no Python loop over the groups. The per-value
work is the fused kernels' own; only the loop over groups is here.

Per group ``g`` the arrays are indexed ``[g]``: ``shifts`` (G, C), ``packed`` (G, 4, C) float64 partial
moments (n, s, d, M2), ``merged`` (G, 4, C) float64 statistics (N, K, D, σ²), ``stats`` (G, 4, C) saved
statistics (shift, mean_shifted, var, rstd), ``sums`` and ``totals`` (G, 2, C) float64 gradient sums
(Σ dy', Σ dy' · x̂). ``per_entry`` is the number of values of one channel in one entry of axis 0 (S for the
planar array, 1 for rows): a group's count is its entries times ``per_entry``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from normlab.kernels.numba.channel import pack_grad_sums, pack_moments
from normlab.kernels.numba.columns import bn_rows_backward, bn_rows_forward, rows_grad_sums, rows_sums
from normlab.kernels.numba.planar import bn_planar_backward, bn_planar_forward, planar_grad_sums, planar_sums
from normlab.kernels.numba.primitives import FLAGS, NONE


@njit(inline="always", **FLAGS)
def _bounds(g, size, n):
    """Entries [lo, hi) of group ``g``."""
    lo = g * size
    return lo, min(n, lo + size)


@njit(**FLAGS)
def planar_group_moments(x, size, per_entry, shifts, parts, packed):
    """Each group's partial moments about its first value (:func:`~.planar.planar_sums`, packed)."""
    for g in range(packed.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        planar_sums(x[lo:hi], shifts[g], parts)
        pack_moments(parts, shifts[g], np.float64((hi - lo) * per_entry), packed[g])


@njit(**FLAGS)
def rows_group_moments(x, size, per_entry, shifts, parts, packed):
    """:func:`planar_group_moments` on channels-last rows (:func:`~.columns.rows_sums`)."""
    for g in range(packed.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        rows_sums(x[lo:hi], shifts[g], parts)
        pack_moments(parts, shifts[g], np.float64((hi - lo) * per_entry), packed[g])


@njit(**FLAGS)
def planar_group_apply(x, weight, bias, eps, stats, y, merged, size, parts, streaming):
    """``y`` of every group normalized with its merged statistics (:func:`~.planar.bn_planar_forward`)."""
    none = np.empty(0, stats.dtype)
    for g in range(merged.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        bn_planar_forward(x[lo:hi], weight, bias, eps, True, stats[g], y[lo:hi], x[lo:hi], NONE, none, none, 0.0,
                          1.0, parts, streaming, False, merged[g])


@njit(**FLAGS)
def rows_group_apply(x, weight, bias, eps, stats, y, merged, size, parts, streaming):
    """:func:`planar_group_apply` on channels-last rows (:func:`~.columns.bn_rows_forward`)."""
    none = np.empty(0, stats.dtype)
    for g in range(merged.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        bn_rows_forward(x[lo:hi], weight, bias, eps, True, stats[g], y[lo:hi], x[lo:hi], NONE, none, none, 0.0,
                        1.0, parts, streaming, False, merged[g])


@njit(**FLAGS)
def planar_group_grad_sums(x, dy, stats, size, parts, sums):
    """Each group's Σ dy and Σ dy · x̂ (:func:`~.planar.planar_grad_sums`, packed)."""
    for g in range(sums.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        planar_grad_sums(x[lo:hi], dy[lo:hi], x[lo:hi], stats[g, 0], NONE, parts)
        pack_grad_sums(parts, stats[g, 1], stats[g, 3], sums[g])


@njit(**FLAGS)
def rows_group_grad_sums(x, dy, stats, size, parts, sums):
    """:func:`planar_group_grad_sums` on channels-last rows (:func:`~.columns.rows_grad_sums`)."""
    for g in range(sums.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        rows_grad_sums(x[lo:hi], dy[lo:hi], x[lo:hi], stats[g, 0], NONE, parts)
        pack_grad_sums(parts, stats[g, 1], stats[g, 3], sums[g])


@njit(**FLAGS)
def planar_group_grad(x, dy, weight, stats, totals, counts, size, dx, parts, streaming):
    """``dx`` of every group from its totals over ``counts[g]`` values per channel
    (:func:`~.planar.bn_planar_backward`)."""
    none = np.empty(0, stats.dtype)
    for g in range(totals.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        bn_planar_backward(x[lo:hi], dy[lo:hi], x[lo:hi], weight, stats[g, 0], stats[g, 1], stats[g, 3], True, True,
                           NONE, dx[lo:hi], dx[lo:hi], none, none, parts, streaming, totals[g], counts[g])


@njit(**FLAGS)
def rows_group_grad(x, dy, weight, stats, totals, counts, size, dx, parts, streaming):
    """:func:`planar_group_grad` on channels-last rows (:func:`~.columns.bn_rows_backward`)."""
    none = np.empty(0, stats.dtype)
    for g in range(totals.shape[0]):
        lo, hi = _bounds(g, size, x.shape[0])
        bn_rows_backward(x[lo:hi], dy[lo:hi], x[lo:hi], weight, stats[g, 0], stats[g, 1], stats[g, 3], True, True,
                         NONE, dx[lo:hi], dx[lo:hi], none, none, parts, streaming, totals[g], counts[g])
