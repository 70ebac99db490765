"""BatchNorm's per-channel step between its passes, shared by both layouts (:mod:`.planar`, :mod:`.columns`).

Forward: the block partial sums of each channel combined into its statistics, the running statistics
updated, and the affine factors a = γ · rstd and b = β − mean_shifted · a. Backward: dβ, dγ and the
constants of the closed form. The statistics seam of the backend (partial moments → combine → apply)
enters here too: :func:`partial_moments` packs a place's moments, :func:`merged_constants` turns merged
ones into the same statistics and factors the fused kernels compute.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from normlab.kernels.numba.primitives import FLAGS, closed_form, combine_parts, statistic


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




@njit(inline="always", **FLAGS)
def channel_constants(parts, weight, bias, eps, train, count, stats, running_mean, running_var, momentum, unbias,
                       guarded, a, b):
    """The BatchNorm forward's per-channel step between its two passes: each channel's statistics from the
    block partials ``parts`` combined (training, ``count`` values per channel) or from the fixed ones in
    ``stats`` (:func:`statistic`), the running statistics updated where they are given, and the affine
    map's factors a = γ · rstd and b = β − mean_shifted · a written to ``a`` and ``b`` in their dtype.

    Returns whether the update was skipped: ``guarded`` and some channel's batch statistics not finite
    (:func:`finite_statistic`), in which case no channel is updated."""
    shift, mean_shifted, var, rstd = stats[0], stats[1], stats[2], stats[3]
    c = a.shape[0]
    update = train and running_mean.shape[0] > 0
    mus = np.empty(c if update else 0)
    finite = True
    for ch in range(c):
        s1, s2 = combine_parts(parts, ch) if train else (0.0, 0.0)
        d, r = statistic(ch, shift[ch], s1, s2, count, eps, train, shift, mean_shifted, var, rstd)
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
def grad_constants(parts, weight, mean_shifted, rstd, train, count, dw, db, d, cm, k1, k2):
    """The BatchNorm backward's per-channel step between its two passes: dβ and dγ from the block partials
    ``parts`` combined, and the constants of dx = (dy' − c) · k1 + ((x − shift) − d) · k2
    (:func:`closed_form`) written to ``d``, ``cm``, ``k1`` and ``k2`` in their dtype."""
    for ch in range(d.shape[0]):
        s1, s2 = combine_parts(parts, ch)
        dk = np.float64(mean_shifted[ch]) if train else 0.0
        dgamma, ck, k1k, k2k = closed_form(np.float64(weight[ch]), np.float64(rstd[ch]), dk, s1, s2, count, train)
        db[ch] = s1
        dw[ch] = dgamma
        d[ch] = dk
        cm[ch] = ck
        k1[ch] = k1k
        k2[ch] = k2k

