"""BatchNorm's statistics seam per group of consecutive samples: the virtual batches of ghost batch norm.

The batch is cut along axis 0 of the kernels' array into groups of ``size`` entries (samples of the
(N, C, S) planar array; rows of the (M, C) channels-last array, ``size`` = samples · positions per
sample), the last group possibly smaller. The sums run the first passes of the fused BatchNorm kernels
(:mod:`.planar`, :mod:`.columns`) on each group in turn, in one call: each group is a contiguous slice,
so every value is read where it lies, with no copy and no Python loop over the groups. The writing passes
work out every group's per-channel constants first, then make one parallel pass over the data as the
fused kernels' writing passes do, each run or row with its group's constants (a fused kernel called per
group cost about 0.5 ms more per group, 16 groups of (4096, 1024) took 1.6x one call). The per-value
maps are :mod:`.runs`' own.

Per group ``g`` the arrays are indexed ``[g]``: ``shifts`` (G, C), ``packed`` (G, 4, C) float64 partial
moments (n, s, d, M2), ``merged`` (G, 4, C) float64 statistics (N, K, D, σ²), ``stats`` (G, 4, C) saved
statistics (shift, mean_shifted, var, rstd), ``sums`` and ``totals`` (G, 2, C) float64 gradient sums
(Σ dy', Σ dy' · x̂). ``per_entry`` is the number of values of one channel in one entry of axis 0 (S for the
planar array, 1 for rows): a group's count is its entries times ``per_entry``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels.numba import stream
from normlab.kernels.numba.channel import channel_constants, grad_constants, pack_grad_sums, pack_moments
from normlab.kernels.numba.columns import rows_grad_sums, rows_sums
from normlab.kernels.numba.planar import planar_grad_sums, planar_sums
from normlab.kernels.numba.primitives import FLAGS, NONE, PARALLEL, block_range
from normlab.kernels.numba.runs import grad_values, run_affine, stream_affine, stream_grad


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
def _group_factors(merged, weight, bias, eps, stats):
    """Every group's statistics written to ``stats[g]`` from its merged ones, and its affine factors
    a = γ · rstd, b = β − mean_shifted · a ((G, 2, C), :func:`~.channel.channel_constants`)."""
    groups, c = merged.shape[0], merged.shape[2]
    coef = np.empty((groups, 2, c), stats.dtype)
    none = np.empty(0, stats.dtype)
    for g in range(groups):
        channel_constants(merged[g:g + 1, :2], merged[g], weight, bias, eps, True, 0.0, stats[g], none, none, 0.0, 1.0,
                          False, coef[g, 0], coef[g, 1])
    return coef


@njit(**PARALLEL)
def planar_group_apply(x, weight, bias, eps, stats, y, merged, size, parts, streaming):
    """``y`` of every group normalized with its merged statistics: the factors per group, then one pass
    over the N·C runs as :func:`~.planar.planar_affine` makes it, each run with its group's factors."""
    n, c, s = x.shape
    coef = _group_factors(merged, weight, bias, eps, stats)
    rows = n * c
    xr, yr = x.reshape(rows, s), y.reshape(rows, s)
    blocks = parts.shape[0]
    for k in prange(blocks):
        lo, hi = block_range(k, rows, blocks)
        for row in range(lo, hi):
            g, ch = (row // c) // size, row % c
            if streaming:
                stream_affine(xr[row], yr[row], xr[row], stats[g, 0, ch], coef[g, 0, ch], coef[g, 1, ch], NONE)
            else:
                run_affine(xr[row], yr[row], xr[row], stats[g, 0, ch], coef[g, 0, ch], coef[g, 1, ch], NONE)
        if streaming:
            stream.fence()


@njit(**PARALLEL)
def rows_group_apply(x, weight, bias, eps, stats, y, merged, size, parts, streaming):
    """:func:`planar_group_apply` on channels-last rows, each row with its group's factors
    (:func:`~.columns.rows_affine`)."""
    m = x.shape[0]
    coef = _group_factors(merged, weight, bias, eps, stats)
    blocks = parts.shape[0]
    for k in prange(blocks):
        lo, hi = block_range(k, m, blocks)
        for i in range(lo, hi):
            g = i // size
            if streaming:
                stream_affine(x[i], y[i], x[i], stats[g, 0], coef[g, 0], coef[g, 1], NONE)
            else:
                run_affine(x[i], y[i], x[i], stats[g, 0], coef[g, 0], coef[g, 1], NONE)
        if streaming:
            stream.fence()


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
def _group_grad_factors(weight, stats, totals, counts):
    """Every group's constants (d, c, k1, k2) of dx = (dy − c) · k1 + ((x − shift) − d) · k2, (G, 4, C), from
    its totals over ``counts[g]`` values per channel (:func:`~.channel.grad_constants`)."""
    groups, c = totals.shape[0], totals.shape[2]
    coef = np.empty((groups, 4, c), stats.dtype)
    none = np.empty(0, stats.dtype)
    for g in range(groups):
        grad_constants(totals[g:g + 1], totals[g], weight, stats[g, 1], stats[g, 3], True, counts[g], none, none,
                       coef[g, 0], coef[g, 1], coef[g, 2], coef[g, 3])
    return coef


@njit(**PARALLEL)
def planar_group_grad(x, dy, weight, stats, totals, counts, size, dx, parts, streaming):
    """``dx`` of every group from its totals over ``counts[g]`` values per channel: the constants per group,
    then one pass over the N·C runs as :func:`~.planar.planar_grad_affine` makes it."""
    n, c, s = x.shape
    coef = _group_grad_factors(weight, stats, totals, counts)
    rows = n * c
    xr, dyr, dxr = x.reshape(rows, s), dy.reshape(rows, s), dx.reshape(rows, s)
    blocks = parts.shape[0]
    for k in prange(blocks):
        lo, hi = block_range(k, rows, blocks)
        for row in range(lo, hi):
            g, ch = (row // c) // size, row % c
            sh, d, cm, k1, k2 = stats[g, 0, ch], coef[g, 0, ch], coef[g, 1, ch], coef[g, 2, ch], coef[g, 3, ch]
            if streaming:
                stream_grad(xr[row], dyr[row], xr[row], dxr[row], dxr[row], sh, d, cm, k1, k2, NONE)
            else:
                grad_values(xr[row], dyr[row], xr[row], dxr[row], dxr[row], sh, d, cm, k1, k2, NONE, 0, s)
        if streaming:
            stream.fence()


@njit(**PARALLEL)
def rows_group_grad(x, dy, weight, stats, totals, counts, size, dx, parts, streaming):
    """:func:`planar_group_grad` on channels-last rows (:func:`~.columns.rows_grad_affine`)."""
    m, c = x.shape
    coef = _group_grad_factors(weight, stats, totals, counts)
    blocks = parts.shape[0]
    for k in prange(blocks):
        lo, hi = block_range(k, m, blocks)
        for i in range(lo, hi):
            g = i // size
            if streaming:
                stream_grad(x[i], dy[i], x[i], dx[i], dx[i], stats[g, 0], coef[g, 0], coef[g, 1], coef[g, 2],
                            coef[g, 3], NONE)
            else:
                grad_values(x[i], dy[i], x[i], dx[i], dx[i], stats[g, 0], coef[g, 0], coef[g, 1], coef[g, 2],
                            coef[g, 3], NONE, 0, c)
        if streaming:
            stream.fence()
