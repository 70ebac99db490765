"""GroupNorm, InstanceNorm and LayerNorm on contiguous data: a :class:`~normlab.kernels.layout.RowShape`
seen as (R, K) rows, one statistic per row.

Row r belongs to group g = r mod G; its K values are cg runs of hw values, run k scaled by parameter
g·cg + k. GroupNorm: (G, C/G, H·W); InstanceNorm: (C, 1, H·W); LayerNorm: (1, K, 1), one parameter per
value. Each row is read once for its sums and once more, from cache, to write its output.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels.numba import stream
from normlab.kernels.numba.primitives import (
    FLAGS, PARALLEL, SUM_FLAGS, block_parts, block_range, closed_form, run_grad_sums, run_sums,
    run_weighted_grad_sums, statistic, xhat_grad_sum,
)
from normlab.kernels.numba.runs import (
    centred_run, layer_values, stream_centred, stream_layer, stream_weighted_grad, weighted_grad_values,
)


@njit(inline="always", **FLAGS)
def _forward_row(x, weight, bias, eps, train, groups, hw, stats, y, r, streaming):
    """Row ``r`` of :func:`row_forward`: its statistics, then its output."""
    kk = x.shape[1]
    cg = kk // hw
    cast = x.dtype.type
    shift, mean_shifted, var, rstd = stats[0], stats[1], stats[2], stats[3]
    xr = x[r]
    yr = y[r]
    s1, s2 = run_sums(xr, np.float64(xr[0])) if train else (0.0, 0.0)
    d, rs = statistic(r, xr[0], s1, s2, kk, eps, train, shift, mean_shifted, var, rstd)
    p0 = (r % groups) * cg
    sh_x, d_x, r_x = shift[r], cast(d), cast(rs)
    if hw == 1:
        wr = weight[p0:p0 + kk]
        br = bias[p0:p0 + kk]
        if streaming:
            stream_layer(xr, yr, sh_x, d_x, r_x, wr, br)
        else:
            layer_values(xr, yr, sh_x, d_x, r_x, wr, br, 0, kk)
    else:
        for k in range(cg):
            lo = k * hw
            a = cast(np.float64(weight[p0 + k]) * rs)
            if streaming:
                stream_centred(xr[lo:lo + hw], yr[lo:lo + hw], sh_x, d_x, a, bias[p0 + k])
            else:
                centred_run(xr[lo:lo + hw], yr[lo:lo + hw], sh_x, d_x, a, bias[p0 + k])


@njit(**PARALLEL)
def row_forward(x, weight, bias, eps, train, groups, hw, stats, y, blocks, streaming):
    """Forward with one statistic per row of ``x`` ((R, K)), parallel over rows.

    Memory passes: each row is read once for its float64 sums and once more from cache (a row is at
    most a few hundred KiB for the usual shapes) to write ``y``: x and y cross main memory once.
    ``streaming`` writes ``y`` with streaming stores (see :mod:`normlab.kernels.numba.stream`), parallel over
    ``blocks`` blocks of rows (one per thread), each ended by a fence.
    """
    rows = x.shape[0]
    if streaming:
        nb = max(1, min(blocks, rows))
        for k in prange(nb):
            lo, hi = block_range(k, rows, nb)
            for r in range(lo, hi):
                _forward_row(x, weight, bias, eps, train, groups, hw, stats, y, r, True)
            stream.fence()
        return
    for r in prange(rows):
        _forward_row(x, weight, bias, eps, train, groups, hw, stats, y, r, False)


@njit(inline="always", **FLAGS)
def _row_centre(shift, mean_shifted, rstd, r, train):
    """(μ, rstd) of row ``r`` in float64, μ = shift + mean_shifted (0 for fixed statistics)."""
    return np.float64(shift[r]) + (np.float64(mean_shifted[r]) if train else 0.0), np.float64(rstd[r])


@njit(inline="always", **FLAGS)
def _row_terms(shift, mean_shifted, rstd, r, train):
    """(shift, mean_shifted, rstd) of row ``r`` in float64 (mean_shifted 0 for fixed statistics)."""
    return np.float64(shift[r]), np.float64(mean_shifted[r]) if train else 0.0, np.float64(rstd[r])


@njit(**FLAGS)
def _row_param_sums(x, dy, r, shift, mean_shifted, rstd, train, groups, pb, pw):
    """Add dy and dy · x̂ of row ``r`` into the float64 accumulators of dβ and dγ where each value has its
    own parameter (row r's value j: parameter (r mod groups) · K + j)."""
    kk = x.shape[1]
    xr, gr = x[r], dy[r]
    mu, rs = _row_centre(shift, mean_shifted, rstd, r, train)
    p0 = (r % groups) * kk
    for j in range(kk):
        a = np.float64(gr[j])
        pb[p0 + j] += a
        pw[p0 + j] += a * ((np.float64(xr[j]) - mu) * rs)


@njit(**SUM_FLAGS)
def _four_row_sums(x, dy, w, i, shift, mean_shifted, rstd, train, pb, pw, sums):
    """Rows i to i + 3 of (R, K) ``x`` and ``dy`` where every value has its own parameter ``w[j]`` (LayerNorm)
    in one read: dy and dy · x̂ added into the float64 accumulators of dβ and dγ (``pb``, ``pw``), and
    each row's Σ w · dy and Σ w · dy · (x − shift) written to ``sums[k]`` (k = 0..3), all in float64.

    Four rows are read once for both kinds of sums rather than once for the parameters' and again per
    row (benchmarks/README.md, "LayerNorm backward: four rows at a time"). In float64 every
    step is exact enough that reassociating the sums (which vectorizes them) loses nothing:
    x − shift is exact, and x̂ = ((x − shift) − mean_shifted) · rstd is formed from it."""
    x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
    g0, g1, g2, g3 = dy[i], dy[i + 1], dy[i + 2], dy[i + 3]
    h0, d0, r0 = _row_terms(shift, mean_shifted, rstd, i, train)
    h1, d1, r1 = _row_terms(shift, mean_shifted, rstd, i + 1, train)
    h2, d2, r2 = _row_terms(shift, mean_shifted, rstd, i + 2, train)
    h3, d3, r3 = _row_terms(shift, mean_shifted, rstd, i + 3, train)
    a0 = b0 = a1 = b1 = a2 = b2 = a3 = b3 = 0.0
    for j in range(x.shape[1]):
        wj = np.float64(w[j])
        e0, e1, e2, e3 = np.float64(g0[j]), np.float64(g1[j]), np.float64(g2[j]), np.float64(g3[j])
        c0, c1 = np.float64(x0[j]) - h0, np.float64(x1[j]) - h1
        c2, c3 = np.float64(x2[j]) - h2, np.float64(x3[j]) - h3
        pb[j] += (e0 + e1) + (e2 + e3)
        pw[j] += (e0 * ((c0 - d0) * r0) + e1 * ((c1 - d1) * r1)) + (e2 * ((c2 - d2) * r2) + e3 * ((c3 - d3) * r3))
        a0 += wj * e0
        b0 += wj * e0 * c0
        a1 += wj * e1
        b1 += wj * e1 * c1
        a2 += wj * e2
        b2 += wj * e2 * c2
        a3 += wj * e3
        b3 += wj * e3 * c3
    sums[0, 0], sums[0, 1], sums[1, 0], sums[1, 1] = a0, b0, a1, b1
    sums[2, 0], sums[2, 1], sums[3, 0], sums[3, 1] = a2, b2, a3, b3


@njit(**PARALLEL)
def row_backward(x, dy, weight, shift, mean_shifted, rstd, train, need_x, groups, hw, dx, parts, streaming):
    """Backward with one statistic per row, parallel over blocks of rows.

    Memory passes: each row of ``x`` and ``dy`` is read once for the sums Σ g and Σ g · x̂ of the closed
    form (g = γ · dy) and for the block's partial dγ and dβ (``parts``, (B, 2, P) float64, summed by
    the caller), then once more from cache to write ``dx``, with streaming stores where ``streaming``
    is set.
    """
    rows, kk = x.shape
    cg = kk // hw
    nb = parts.shape[0]
    cast = x.dtype.type
    for blk in prange(nb):
        pb, pw, lo, hi = block_parts(parts, blk, rows)
        four = np.empty((4, 2))  # per-row sums of a group of four rows (LayerNorm)
        for r in range(lo, hi):
            xr = x[r]
            dyr = dy[r]
            dxr = dx[r]
            sh = np.float64(shift[r])
            d = np.float64(mean_shifted[r]) if train else 0.0
            rs = np.float64(rstd[r])
            p0 = (r % groups) * cg
            if hw == 1:
                wr = weight[p0:p0 + kk]
                k = (r - lo) % 4
                if groups == 1 and r - k + 4 <= hi:  # in a group of four rows, summed when it starts
                    if k == 0:
                        _four_row_sums(x, dy, wr, r, shift, mean_shifted, rstd, train, pb, pw, four)
                    sg, sgx = four[k, 0], four[k, 1]
                else:
                    _row_param_sums(x, dy, r, shift, mean_shifted, rstd, train, groups, pb, pw)
                    sg, sgx = run_weighted_grad_sums(xr, dyr, wr, sh)
            else:
                sg = 0.0
                sgx = 0.0
                for k in range(cg):
                    s = k * hw
                    s1, s2 = run_grad_sums(xr[s:s + hw], dyr[s:s + hw], sh)
                    w = np.float64(weight[p0 + k])
                    pb[p0 + k] += s1
                    pw[p0 + k] += xhat_grad_sum(rs, d, s1, s2)
                    sg += w * s1
                    sgx += w * s2
            if not need_x:
                continue
            # Per row, g = γ · dy: its mean is sg / K, and Σ g · x̂ = rs · (sgx − d · sg).
            _, cm, _, k2 = closed_form(1.0, rs, d, sg, sgx, kk, train)
            sh_x, d_x, c_x, r_x, k2_x = shift[r], cast(d), cast(cm), cast(rs), cast(k2)
            if hw == 1 and streaming:
                stream_weighted_grad(xr, dyr, dxr, wr, sh_x, d_x, c_x, r_x, k2_x)
            elif hw == 1:
                weighted_grad_values(xr, dyr, dxr, wr, sh_x, d_x, c_x, r_x, k2_x, 0, kk)
            else:
                for k in range(cg):
                    s = k * hw
                    xs, dys, dxs, wk = xr[s:s + hw], dyr[s:s + hw], dxr[s:s + hw], weight[p0 + k]
                    if streaming:
                        stream_weighted_grad(xs, dys, dxs, wk, sh_x, d_x, c_x, r_x, k2_x)
                    else:
                        weighted_grad_values(xs, dys, dxs, wk, sh_x, d_x, c_x, r_x, k2_x, 0, hw)
        if streaming:
            stream.fence()


