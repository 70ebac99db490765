"""Kernels on (M, C) rows with C contiguous: the channels-last family of :mod:`normlab.kernels.layout`.

* BatchNorm (:class:`~normlab.kernels.layout.ChannelShape`) on 2D input, or channels_last with
  M = N·spatial: one statistic per column.
* GroupNorm and InstanceNorm (:class:`~normlab.kernels.layout.RowShape`) on channels_last data, seen as
  (N, S, C): per sample, one statistic per group of C/G adjacent columns.

Both sum eight rows at a time into per-column accumulators (:func:`_column_sums`) and write the output
row by row with per-column factors.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from normlab.kernels.numba import stream
from normlab.kernels.numba.channel import channel_factors, channel_grad_factors, given
from normlab.kernels.numba.primitives import (
    FLAGS, NONE, ADD_RELU, PARALLEL, block_parts, block_range, closed_form, dx_value, masked, moved, moved_grad,
    statistic, xhat_grad_sum,
)
from normlab.kernels.numba.runs import run_affine, stream_affine, stream_grad, stream_weighted_grad


_ROWS = 8  # rows summed in the input dtype before a column's float64 accumulators are updated
_LOCKSTEP_COLUMNS = 512
"""From this many columns on, the column sums read their eight rows in lockstep, one column at a time,
with the sums in registers; narrower rows are read one after the other into accumulators in L1
(benchmarks/README.md, "Column sums: row by row or in lockstep")."""


@njit(inline="always", **FLAGS)
def _spill(a, q, r0, sh, p1, p2):
    """Move the input-dtype sums a = Σ(x − r0) and q = Σ(x − r0)² of eight rows to the shift ``sh`` in
    float64 (:func:`moved`), add them into the accumulators, and zero them."""
    for ch in range(a.shape[0]):
        m1, m2 = moved(np.float64(a[ch]), np.float64(q[ch]), _ROWS, r0[ch], sh[ch])
        p1[ch] += m1
        p2[ch] += m2
        a[ch] = 0.0
        q[ch] = 0.0


@njit(inline="always", **FLAGS)
def _spill_grad(a, q, r0, sh, p1, p2):
    """Move the input-dtype sums a = Σ dy' and q = Σ dy' · (x − r0) of eight rows to the shift ``sh`` in
    float64 (:func:`moved_grad`), add them into the accumulators, and zero them."""
    for ch in range(a.shape[0]):
        a64 = np.float64(a[ch])
        p1[ch] += a64
        p2[ch] += moved_grad(a64, np.float64(q[ch]), r0[ch], sh[ch])
        a[ch] = 0.0
        q[ch] = 0.0


@njit(**FLAGS)
def _redo_overflowed_columns(x, dy, y, lo, hi, sh, p1, p2, epilogue):
    """Sum again in float64, over rows [lo, hi), every column whose sums came out inf or NaN: sums of
    values whose squares or products overflow the input dtype (|x − sh| beyond about 1.8e19 in
    float32), or of data holding NaN or inf (which stay NaN or inf). ``dy`` empty: the sums of
    :func:`_column_sums`, Σ(x − sh) and Σ(x − sh)², else those of :func:`_column_grad_sums`.

    Checked once per column after the fast loops rather than in them, where a branch would stop their
    vectorization; the accumulators start from zero, so the float64 sums replace them."""
    for ch in range(p1.shape[0]):
        if np.isfinite(p1[ch] + p2[ch]):
            continue
        s = np.float64(sh[ch])
        s1 = 0.0
        s2 = 0.0
        for j in range(lo, hi):
            t = np.float64(x[j, ch]) - s
            if dy.shape[0] == 0:
                s1 += t
                s2 += t * t
            else:
                g = np.float64(dy[j, ch]) if epilogue == NONE or y[j, ch] > 0.0 else 0.0
                s1 += g
                s2 += g * t
        p1[ch] = s1
        p2[ch] = s2


@njit(**FLAGS)
def _column_sums(x, lo, hi, sh, p1, p2):
    """Sum x − sh and (x − sh)² of rows [lo, hi) of ``x`` into the per-column float64 accumulators
    ``p1`` and ``p2``, which must be zero on entry.

    Eight rows at a time: their values are summed in the input dtype about the block's first row r0
    (x − r0 is exact for values within a factor of two of it, and eight terms lose at most a few units in
    the last place), and only then moved to the shift ``sh`` and added to the float64 accumulators (see
    :func:`_spill`), so that converting and storing those, not memory, does not bound the speed, and an
    outlier costs precision in its own block only, not in every block summed about it. See
    :data:`_LOCKSTEP_COLUMNS` for the order in which the eight rows are read.
    Columns whose sums overflow the input dtype are summed again in float64
    (:func:`_redo_overflowed_columns`).
    """
    c = x.shape[1]
    zero = x.dtype.type(0.0)
    i = lo
    if c >= _LOCKSTEP_COLUMNS:
        while i + _ROWS <= hi:
            for ch in range(c):
                r0 = x[i, ch]
                a = zero
                q = zero
                for k in range(_ROWS):
                    t = x[i + k, ch] - r0
                    a += t
                    q += t * t
                m1, m2 = moved(np.float64(a), np.float64(q), _ROWS, r0, sh[ch])
                p1[ch] += m1
                p2[ch] += m2
            i += _ROWS
    else:
        a = np.zeros(c, x.dtype)
        q = np.zeros(c, x.dtype)
        while i + _ROWS <= hi:
            r0 = x[i]
            for j in range(i, i + _ROWS):
                xr = x[j]
                for ch in range(c):
                    t = xr[ch] - r0[ch]
                    a[ch] += t
                    q[ch] += t * t
            _spill(a, q, r0, sh, p1, p2)
            i += _ROWS
    for j in range(i, hi):
        for ch in range(c):
            t = np.float64(x[j, ch]) - np.float64(sh[ch])
            p1[ch] += t
            p2[ch] += t * t
    _redo_overflowed_columns(x, x[:0], x, lo, hi, sh, p1, p2, NONE)


@njit(**FLAGS)
def _column_grad_sums(x, dy, y, lo, hi, sh, p1, p2, epilogue):
    """Sum dy' and dy' · (x − sh) of rows [lo, hi) into the per-column float64 accumulators (zero on
    entry), eight rows at a time in the input dtype as in :func:`_column_sums` (in lockstep only without a
    fused ReLU), columns whose sums overflow the input dtype again in float64."""
    c = x.shape[1]
    zero = x.dtype.type(0.0)
    i = lo
    if c >= _LOCKSTEP_COLUMNS:
        while epilogue == NONE and i + _ROWS <= hi:
            for ch in range(c):
                r0 = x[i, ch]
                a = zero
                q = zero
                for k in range(_ROWS):
                    g = dy[i + k, ch]
                    a += g
                    q += g * (x[i + k, ch] - r0)
                a64 = np.float64(a)
                p1[ch] += a64
                p2[ch] += moved_grad(a64, np.float64(q), r0, sh[ch])
            i += _ROWS
    else:
        a = np.zeros(c, x.dtype)
        q = np.zeros(c, x.dtype)
        while i + _ROWS <= hi:
            r0 = x[i]
            for j in range(i, i + _ROWS):
                xr, gr, yr = x[j], dy[j], y[j]
                if epilogue == NONE:
                    for ch in range(c):
                        g = gr[ch]
                        a[ch] += g
                        q[ch] += g * (xr[ch] - r0[ch])
                else:
                    for ch in range(c):
                        g = gr[ch] if yr[ch] > 0.0 else zero
                        a[ch] += g
                        q[ch] += g * (xr[ch] - r0[ch])
            _spill_grad(a, q, r0, sh, p1, p2)
            i += _ROWS
    for j in range(i, hi):
        for ch in range(c):
            g = np.float64(dy[j, ch]) if epilogue == NONE or y[j, ch] > 0.0 else 0.0
            p1[ch] += g
            p2[ch] += g * (np.float64(x[j, ch]) - np.float64(sh[ch]))
    _redo_overflowed_columns(x, dy, y, lo, hi, sh, p1, p2, epilogue)


@njit(**FLAGS)
def _column_affine(x, y, residual, lo, hi, sh, a, b, epilogue):
    """y = (x − sh) · a + b on rows [lo, hi), every factor per column, then the epilogue per row.

    ``b`` is β − mean_shifted · a: both terms are of the size of the data's spread, so folding the mean
    into it loses nothing, and saves a load and a subtraction per value.
    """
    for i in range(lo, hi):
        run_affine(x[i], y[i], residual[i], sh, a, b, epilogue)


@njit(**FLAGS)
def _column_grad_affine(x, dy, y, dx, dres, lo, hi, sh, d, w, cm, k1, k2, epilogue):
    """dx = (w · dy' − c) · k1 + ((x − sh) − d) · k2 on rows [lo, hi), every factor per column; after a
    fused add also dres = dy'. An empty ``w`` stands for w = 1 (BatchNorm, whose γ is in ``k1``)."""
    zero = k1[0] * 0
    for i in range(lo, hi):
        xr, dyr, yr, dxr = x[i], dy[i], y[i], dx[i]
        if epilogue == NONE and w.shape[0] == 0:
            for ch in range(x.shape[1]):
                dxr[ch] = dx_value(dyr[ch], xr[ch], sh[ch], d[ch], cm[ch], k1[ch], k2[ch])
        elif epilogue == NONE:
            for ch in range(x.shape[1]):
                dxr[ch] = dx_value(dyr[ch] * w[ch], xr[ch], sh[ch], d[ch], cm[ch], k1[ch], k2[ch])
        else:
            for ch in range(x.shape[1]):
                dxr[ch] = dx_value(masked(dyr[ch], yr[ch], zero), xr[ch], sh[ch], d[ch], cm[ch], k1[ch], k2[ch])
        if epilogue == ADD_RELU:
            dr = dres[i]
            for ch in range(x.shape[1]):
                dr[ch] = masked(dyr[ch], yr[ch], zero)


@njit(**PARALLEL)
def rows_sums(x, shift, parts):
    """The training forward's first pass over (M, C) ``x``: ``shift`` set to the first row, and per block
    of rows (one per thread, ``parts`` (B, 2, C) float64) the sums Σ(x − shift) and Σ(x − shift)² per
    column (:func:`_column_sums`)."""
    m = x.shape[0]
    shift[:] = x[0]
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = block_parts(parts, k, m)
        _column_sums(x, lo, hi, shift, p1, p2)


def valid_rows(valid):
    """``valid`` (a bool array, True = a row that counts), or an empty one for ``None``: every row counts."""
    raise NotImplementedError("numba only")


@overload(valid_rows, inline="always")
def _valid_rows_overload(valid):
    if valid is None or isinstance(valid, (types.NoneType, types.Omitted)):
        return lambda valid: np.empty(0, np.bool_)
    return lambda valid: valid


@njit(inline="always", **FLAGS)
def _padded(valid, i):
    """Whether row ``i`` is a padded one: ``valid`` is not empty and says False there."""
    return valid.shape[0] > 0 and not valid[i]


@njit(inline="always", **FLAGS)
def _zero_row(row):
    for ch in range(row.shape[0]):
        row[ch] = 0.0


@njit(**FLAGS)
def _valid_runs_sums(x, dy, y, valid, lo, hi, sh, p1, p2, epilogue):
    """Add the sums of :func:`_column_sums` (``dy`` empty) or of :func:`_column_grad_sums` over the rows of
    [lo, hi) that ``valid`` marks True into ``p1`` and ``p2``: each run of consecutive valid rows summed
    on its own (into zeroed accumulators, then added), the other rows never read."""
    c = x.shape[1]
    t1 = np.empty(c)
    t2 = np.empty(c)
    i = lo
    while i < hi:
        if not valid[i]:
            i += 1
            continue
        j = i + 1
        while j < hi and valid[j]:
            j += 1
        t1[:] = 0.0
        t2[:] = 0.0
        if dy.shape[0] == 0:
            _column_sums(x, i, j, sh, t1, t2)
        else:
            _column_grad_sums(x, dy, y, i, j, sh, t1, t2, epilogue)
        for ch in range(c):
            p1[ch] += t1[ch]
            p2[ch] += t2[ch]
        i = j


@njit(**PARALLEL)
def rows_valid_sums(x, valid, shift, parts):
    """:func:`rows_sums` over the rows that ``valid`` ((M,) bool) marks True, ``shift`` set to the first of
    them (left alone if there is none)."""
    m = x.shape[0]
    for i in range(m):
        if valid[i]:
            shift[:] = x[i]
            break
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = block_parts(parts, k, m)
        _valid_runs_sums(x, x[:0], x, valid, lo, hi, shift, p1, p2, NONE)


@njit(**PARALLEL)
def rows_valid_grad_sums(x, dy, y, valid, shift, epilogue, parts):
    """:func:`rows_grad_sums` over the rows that ``valid`` ((M,) bool) marks True."""
    m = x.shape[0]
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = block_parts(parts, k, m)
        _valid_runs_sums(x, dy, y, valid, lo, hi, shift, p1, p2, epilogue)


@njit(**PARALLEL)
def rows_affine(x, y, residual, shift, a, b, epilogue, blocks, streaming, valid):
    """The forward's writing pass: y = (x − shift) · a + b per column, then the epilogue, parallel over
    rows; with streaming stores in ``blocks`` blocks of rows where ``streaming`` is set. Rows that
    ``valid`` (not empty) marks False get y = 0, their ``x`` unread."""
    m = x.shape[0]
    if streaming:
        for k in prange(blocks):
            lo, hi = block_range(k, m, blocks)
            for i in range(lo, hi):
                if _padded(valid, i):
                    _zero_row(y[i])
                else:
                    stream_affine(x[i], y[i], residual[i], shift, a, b, epilogue)
            stream.fence()
        return
    for i in prange(m):
        if _padded(valid, i):
            _zero_row(y[i])
        else:
            run_affine(x[i], y[i], residual[i], shift, a, b, epilogue)


@njit(**FLAGS)
def bn_rows_forward(x, weight, bias, eps, train, stats, y, residual, epilogue, running_mean, running_var, momentum,
                    unbias, parts, streaming, guarded=False, merged=None, valid=None):
    """BatchNorm forward on ``x`` of shape (M, C) with C contiguous: :func:`rows_sums` (training), the
    per-channel step (:func:`~.channel.channel_constants`), :func:`rows_affine`.

    Memory passes: training reads ``x`` once into per-block partial sums, combines them per channel, then
    reads ``x`` again and writes ``y``; evaluation reads once and writes once. The second read comes
    from cache only when the tensor fits in it: no value can be normalized before the statistics, which
    need every row, are complete. The arguments as in :func:`~.planar.bn_planar_forward`; ``valid`` ((M,)
    bool, with ``merged``: the statistics of the rows it marks True) sets the other rows of ``y`` to 0.
    """
    m, c = x.shape
    shift = stats[0]
    merged = given(merged, c)
    if train and not merged.shape[0]:
        rows_sums(x, shift, parts)
    skipped, a, b = channel_factors(parts, merged, weight, bias, eps, train, m, stats, running_mean, running_var,
                                    momentum, unbias, guarded)
    rows_affine(x, y, residual, shift, a, b, epilogue, parts.shape[0], streaming, valid_rows(valid))
    return skipped


@njit(**PARALLEL)
def rows_grad_sums(x, dy, y, shift, epilogue, parts):
    """The backward's first pass over (M, C) arrays: per block of rows, Σ dy' and Σ dy' · (x − shift) per
    column into ``parts`` (:func:`_column_grad_sums`)."""
    m = x.shape[0]
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = block_parts(parts, k, m)
        _column_grad_sums(x, dy, y, lo, hi, shift, p1, p2, epilogue)


@njit(**PARALLEL)
def rows_grad_affine(x, dy, y, dx, dres, shift, d, cm, k1, k2, epilogue, blocks, streaming, valid):
    """The backward's writing pass: dx = (dy' − c) · k1 + ((x − shift) − d) · k2 per column (and
    dres = dy' after a fused add), in ``blocks`` blocks of rows, with streaming stores where
    ``streaming`` is set. Rows that ``valid`` (not empty) marks False get dx = 0 (and dres = 0), their
    ``x`` and ``dy`` unread."""
    m = x.shape[0]
    unit = np.empty(0, x.dtype)
    for k in prange(blocks):
        lo, hi = block_range(k, m, blocks)
        if valid.shape[0]:
            for i in range(lo, hi):
                if not valid[i]:
                    _zero_row(dx[i])
                    if epilogue == ADD_RELU:
                        _zero_row(dres[i])
                elif streaming:
                    stream_grad(x[i], dy[i], y[i], dx[i], dres[i], shift, d, cm, k1, k2, epilogue)
                else:
                    _column_grad_affine(x, dy, y, dx, dres, i, i + 1, shift, d, unit, cm, k1, k2, epilogue)
            if streaming:
                stream.fence()
        elif streaming:
            for i in range(lo, hi):
                stream_grad(x[i], dy[i], y[i], dx[i], dres[i], shift, d, cm, k1, k2, epilogue)
            stream.fence()
        else:
            _column_grad_affine(x, dy, y, dx, dres, lo, hi, shift, d, unit, cm, k1, k2, epilogue)


@njit(**FLAGS)
def bn_rows_backward(x, dy, y, weight, shift, mean_shifted, rstd, train, need_x, epilogue, dx, dres, dw, db,
                     parts, streaming, totals=None, count=0.0, valid=None):
    """BatchNorm backward on (M, C) rows: :func:`rows_grad_sums`, the per-channel step
    (:func:`~.channel.grad_constants`), :func:`rows_grad_affine`.

    Memory passes: one read of ``x`` and ``dy`` (and ``y`` after a fused ReLU) into per-block partial
    sums, combined into dβ and dγ; then a second read of the same and one write of ``dx`` (and
    ``dres``). ``totals`` and ``count`` as in :func:`~.planar.bn_planar_backward`; ``valid`` ((M,) bool,
    with ``totals`` over the rows it marks True) sets ``dx`` of the other rows to 0.
    """
    m, c = x.shape
    totals = given(totals, c)
    if not totals.shape[0]:
        rows_grad_sums(x, dy, y, shift, epilogue, parts)
    total = count if totals.shape[0] else np.float64(m)
    d, cm, k1, k2 = channel_grad_factors(parts, totals, weight, mean_shifted, rstd, train, total, dw, db)
    if need_x:
        rows_grad_affine(x, dy, y, dx, dres, shift, d, cm, k1, k2, epilogue, parts.shape[0], streaming,
                         valid_rows(valid))


# ---------------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm on channels_last data, (N, S, C) with C contiguous: per sample, G groups of
# cg = C/G adjacent channels.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **FLAGS)
def _group_shifts(xs, shift, i, groups, from_data):
    """Per channel of sample ``i`` ((S, C) ``xs``), its group's shift: the group's first value
    (``from_data``) or the one in ``shift`` (indexed by sample · groups + group)."""
    c = xs.shape[1]
    cg = c // groups
    sh = np.empty(c, xs.dtype)
    for ch in range(c):
        sh[ch] = xs[0, (ch // cg) * cg] if from_data else shift[i * groups + ch // cg]
    return sh


@njit(**PARALLEL)
def group_cl_forward(x, weight, bias, eps, train, groups, stats, y, streaming):
    """Forward on (N, S, C), parallel over samples; statistics per (sample, group), written at n·G + g.

    Memory passes per sample (its S·C values): one read into per-channel float64 sums (C contiguous
    accumulators per spatial row), combined per group; then a second read, from cache for samples up to
    about 1 MiB, to write ``y`` (with streaming stores where ``streaming`` is set).
    """
    n, s, c = x.shape
    cg = c // groups
    shift, mean_shifted, var, rstd = stats[0], stats[1], stats[2], stats[3]
    for i in prange(n):
        xs = x[i]
        sh = _group_shifts(xs, shift, i, groups, train)
        coef = np.empty((2, c), x.dtype)
        a, b = coef[0], coef[1]
        p1 = np.zeros(c)
        p2 = np.zeros(c)
        if train:
            _column_sums(xs, 0, s, sh, p1, p2)
        for g in range(groups):
            s1, s2 = p1[g * cg:(g + 1) * cg].sum(), p2[g * cg:(g + 1) * cg].sum()
            dg, rs = statistic(i * groups + g, sh[g * cg], s1, s2, s * cg, eps, train, shift, mean_shifted, var,
                                rstd)
            for ch in range(g * cg, (g + 1) * cg):
                a[ch] = np.float64(weight[ch]) * rs
                b[ch] = np.float64(bias[ch]) - dg * np.float64(weight[ch]) * rs
        if train:  # normalize about the shifts the statistics were saved with (each group's rounded mean)
            sh = _group_shifts(xs, shift, i, groups, False)
        if streaming:
            ys = y[i]
            for j in range(s):
                stream_affine(xs[j], ys[j], xs[j], sh, a, b, NONE)
            stream.fence()
        else:
            _column_affine(xs, y[i], xs, 0, s, sh, a, b, NONE)


@njit(**PARALLEL)
def group_cl_backward(x, dy, weight, shift, mean_shifted, rstd, train, need_x, groups, dx, parts, streaming):
    """Backward on (N, S, C), parallel over samples.

    Memory passes per sample: one read of ``x`` and ``dy`` into per-channel sums Σ dy and Σ dy·(x − shift)
    (the sample's share of dβ and dγ goes to ``parts[n]``, (N, 2, C) float64, summed by the caller), then
    a second read, from cache, to write ``dx`` (with streaming stores where ``streaming`` is set).
    """
    n, s, c = x.shape
    cg = c // groups
    for i in prange(n):
        xs = x[i]
        dys = dy[i]
        sh = _group_shifts(xs, shift, i, groups, False)
        coef = np.empty((4, c), x.dtype)
        d, cm, k1, k2 = coef[0], coef[1], coef[2], coef[3]
        p1, p2, _, _ = block_parts(parts, i, n)
        _column_grad_sums(xs, dys, xs, 0, s, sh, p1, p2, NONE)
        for g in range(groups):
            q = i * groups + g
            dg = np.float64(mean_shifted[q]) if train else 0.0
            rs = np.float64(rstd[q])
            sg = 0.0
            sgx = 0.0
            for ch in range(g * cg, (g + 1) * cg):
                w = np.float64(weight[ch])
                sg += w * p1[ch]
                sgx += w * p2[ch]
                p2[ch] = xhat_grad_sum(rs, dg, p1[ch], p2[ch])
            # g = γ · dy within the group: its mean is sg / m and Σ g · x̂ = rs · (sgx − dg · sg).
            _, cg_mean, _, kb = closed_form(1.0, rs, dg, sg, sgx, s * cg, train)
            for ch in range(g * cg, (g + 1) * cg):
                d[ch] = dg
                cm[ch] = cg_mean
                k1[ch] = rs
                k2[ch] = kb
        if need_x and streaming:
            dxs = dx[i]
            for j in range(s):
                stream_weighted_grad(xs[j], dys[j], dxs[j], weight, sh, d, cm, k1, k2)
            stream.fence()
        elif need_x:
            _column_grad_affine(xs, dys, xs, dx[i], dx[i], 0, s, sh, d, weight, cm, k1, k2, NONE)
