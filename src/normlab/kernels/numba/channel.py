"""BatchNorm's per-channel step between its passes, shared by both layouts (:mod:`.planar`, :mod:`.columns`).

Forward: the block partial sums of each channel combined into its statistics, the running statistics
updated, and the affine factors a = γ · rstd and b = β − mean_shifted · a. Backward: dβ, dγ and the
constants of the closed form. The statistics seam of the backend (partial moments → combine → apply)
enters here too: :func:`partial_moments` packs a place's moments, :func:`merged_constants` turns merged
ones into the same statistics and factors the fused kernels compute.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from normlab.kernels.numba.primitives import (
    FLAGS, closed_form, combine_parts, grad_factors, inverse_std, save_mean, shifted_moments, statistic,
    xhat_grad_sum,
)


@njit(inline="always", **FLAGS)
def update_running(k, mu, v, rm, rv, momentum, unbias):
    """running ← (1 − momentum) · running + momentum · statistic for channel ``k``: the mean ``mu`` and
    the unbiased variance v · m/(m − 1) (``unbias``), in float64, rounded once."""
    rm[k] = (1.0 - momentum) * np.float64(rm[k]) + momentum * mu
    rv[k] = (1.0 - momentum) * np.float64(rv[k]) + momentum * (v * unbias)


@njit(inline="always", **FLAGS)
def finite_statistic(mu, v, rm, unbias):
    """Whether the batch mean ``mu`` and unbiased variance v · ``unbias``, rounded to the running
    statistics' dtype, are both finite (:mod:`normlab.core.guard`)."""
    return np.isfinite(rm.dtype.type(mu)) and np.isfinite(rm.dtype.type(v * unbias))


def given(sums, c):
    """``sums`` (the seam's merged moments or combined gradient sums), or an empty (0, c) float64 array
    for ``None``: the kernels then compute their own."""
    raise NotImplementedError("numba only")


@overload(given, inline="always")
def _given_overload(sums, c):
    if sums is None or isinstance(sums, (types.NoneType, types.Omitted)):
        return lambda sums, c: np.empty((0, c))
    return lambda sums, c: sums


@njit(inline="always", **FLAGS)
def channel_statistic(ch, parts, merged, eps, train, count, shift, mean_shifted, var, rstd):
    """(mean_shifted, rstd) of channel ``ch`` in float64, its statistics written (:func:`statistic`):
    from merged moments where ``merged`` ((4, C): N, K, D, σ² as :func:`normlab.core.stats.merge_moments`
    gives them) is not empty, else from the block partials ``parts`` (training) or the fixed statistics."""
    if merged.shape[0]:
        v = merged[3, ch]
        r = inverse_std(v, eps)
        rstd[ch] = r
        return save_mean(ch, shift.dtype.type(merged[1, ch]), merged[2, ch], v, shift, mean_shifted, var), r
    s1, s2 = combine_parts(parts, ch) if train else (0.0, 0.0)
    return statistic(ch, shift[ch], s1, s2, count, eps, train, shift, mean_shifted, var, rstd)


@njit(inline="always", **FLAGS)
def channel_constants(parts, merged, weight, bias, eps, train, count, stats, running_mean, running_var, momentum,
                      unbias, guarded, a, b):
    """The BatchNorm forward's per-channel step between its two passes: each channel's statistics
    (:func:`channel_statistic`), the running statistics updated where they are given, and the affine
    map's factors a = γ · rstd and b = β − mean_shifted · a written to ``a`` and ``b`` in their dtype.

    Returns whether the update was skipped: ``guarded`` and some channel's batch statistics not finite
    (:func:`finite_statistic`), in which case no channel is updated."""
    shift, mean_shifted, var, rstd = stats[0], stats[1], stats[2], stats[3]
    c = a.shape[0]
    update = train and running_mean.shape[0] > 0
    mus = np.empty(c if update else 0)
    finite = True
    for ch in range(c):
        d, r = channel_statistic(ch, parts, merged, eps, train, count, shift, mean_shifted, var, rstd)
        if update:
            mu = np.float64(shift[ch]) + d
            mus[ch] = mu
            finite = finite and finite_statistic(mu, np.float64(var[ch]), running_mean, unbias)
        ak = np.float64(weight[ch]) * r
        a[ch] = ak
        b[ch] = np.float64(bias[ch]) - d * ak
    if not update or (guarded and not finite):
        return update
    for ch in range(c):
        update_running(ch, mus[ch], np.float64(var[ch]), running_mean, running_var, momentum, unbias)
    return False


@njit(inline="always", **FLAGS)
def channel_factors(parts, merged, weight, bias, eps, train, count, stats, running_mean, running_var, momentum,
                    unbias, guarded):
    """:func:`channel_constants` into new arrays: ``(skipped, a, b)``, ``a`` and ``b`` in the statistics'
    dtype (the input's)."""
    c = stats.shape[1]
    a = np.empty(c, stats.dtype)
    b = np.empty(c, stats.dtype)
    skipped = channel_constants(parts, merged, weight, bias, eps, train, count, stats, running_mean, running_var,
                                momentum, unbias, guarded, a, b)
    return skipped, a, b


@njit(inline="always", **FLAGS)
def grad_constants(parts, totals, weight, mean_shifted, rstd, train, count, dw, db, d, cm, k1, k2):
    """The BatchNorm backward's per-channel step between its two passes: dβ and dγ from the block partials
    ``parts`` combined, and the constants of dx = (dy' − c) · k1 + ((x − shift) − d) · k2 written to
    ``d``, ``cm``, ``k1`` and ``k2`` in their dtype: from those sums (:func:`closed_form`), or, where
    ``totals`` ((2, C): Σ dy' and Σ dy' · x̂ over the whole batch) is not empty, from the totals
    (:func:`grad_factors`)."""
    for ch in range(d.shape[0]):
        dk = np.float64(mean_shifted[ch]) if train else 0.0
        gam, r = np.float64(weight[ch]), np.float64(rstd[ch])
        if totals.shape[0]:
            ck, k1k, k2k = grad_factors(gam, r, totals[0, ch], totals[1, ch], count, train)
        else:
            s1, s2 = combine_parts(parts, ch)
            dgamma, ck, k1k, k2k = closed_form(gam, r, dk, s1, s2, count, train)
            db[ch] = s1
            dw[ch] = dgamma
        d[ch] = dk
        cm[ch] = ck
        k1[ch] = k1k
        k2[ch] = k2k


@njit(**FLAGS)
def pack_moments(parts, shift, count, packed):
    """A place's partial moments per channel from its block partials about ``shift``: ``packed`` (4, C)
    float64 gets n, s, d = mean(x − s) and M2 = n · var (:mod:`normlab.core.stats`'s layout)."""
    for ch in range(shift.shape[0]):
        s1, s2 = combine_parts(parts, ch)
        d, v = shifted_moments(s1, s2, count)
        packed[0, ch] = count
        packed[1, ch] = shift[ch]
        packed[2, ch] = d
        packed[3, ch] = v * count


@njit(**FLAGS)
def pack_grad_sums(parts, mean_shifted, rstd, sums):
    """A place's partial gradient sums per channel from its block partials: ``sums`` (2, C) float64 gets
    Σ dy' and Σ dy' · x̂ (dβ and dγ over this place's values)."""
    for ch in range(mean_shifted.shape[0]):
        s1, s2 = combine_parts(parts, ch)
        sums[0, ch] = s1
        sums[1, ch] = xhat_grad_sum(np.float64(rstd[ch]), np.float64(mean_shifted[ch]), s1, s2)


@njit(inline="always", **FLAGS)
def channel_grad_factors(parts, totals, weight, mean_shifted, rstd, train, count, dw, db):
    """:func:`grad_constants` into new arrays: ``(d, cm, k1, k2)`` in ``rstd``'s dtype (the input's)."""
    c = rstd.shape[0]
    d = np.empty(c, rstd.dtype)
    cm = np.empty(c, rstd.dtype)
    k1 = np.empty(c, rstd.dtype)
    k2 = np.empty(c, rstd.dtype)
    grad_constants(parts, totals, weight, mean_shifted, rstd, train, count, dw, db, d, cm, k1, k2)
    return d, cm, k1, k2
