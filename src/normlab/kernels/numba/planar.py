"""BatchNorm on channel-contiguous data: a :class:`~normlab.kernels.layout.ChannelShape` seen as (N, C, S).

One statistic per channel, from N runs of S values. The kernels see the data as N·C runs (row r is
channel r mod C) and stream through them in memory order: once into per-block partial sums, once to
write the output. On large tensors with long runs the backward goes channel by channel instead
(:data:`_CHANNEL_BACKWARD_BYTES`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from normlab.kernels.numba import stream
from normlab.kernels.numba.channel import channel_factors, channel_grad_factors, given
from normlab.kernels.numba.primitives import (
    ADD_RELU, FLAGS, NONE, PARALLEL, SUM_FLAGS, block_parts, block_range, closed_form, dx_value, masked, moved,
    moved_grad, normalized, run_grad_sums, run_sums,
)
from normlab.kernels.numba.runs import run_affine, stream_affine, stream_grad


_SHORT_RUN = 256
_PIECE = 2048
"""The streaming kernels sum each run in the input dtype, then move its sums to the channel's shift and
add them into the channel's float64 accumulators (:func:`moved`): a run of up to :data:`_SHORT_RUN`
values (maps up to 16x16) in one piece about its first value, a longer run in pieces of at most
:data:`_PIECE` values (as equal as can be: a 56x56 map is two pieces of 1568), each about the median of
its first, middle and last values (:func:`_piece_origin`).

Summing in float64 would bound the pass by the conversions rather than by memory, and short pieces
would pay the reductions and float64 updates too often (benchmarks/README.md, "Run sums in pieces").

x − r0 is exact for data within a factor of two of the origin r0 (see the module docstring), so only
the summing rounds; its error grows like ((r0 − mean) / σ)² when r0 is an outlier, and with the number of
terms per vector lane. With every channel's first value 300σ from the mean of 1e4 + N(0, 1e-2), short
runs summed about their first value kept the variance within 1e-5 and the outputs within 2e-5 of
float64 (ATen's float32 kernel: 1e-2); summing every run about the channel's shift instead spread that
error to all runs (outputs 1e-3 off). Runs of 784 to 50176 values with every first value such an
outlier, summed about it, gave outputs up to 8e-4 to 1e-2 off; about the median of three, 2e-6 to 6e-6
(float64 sums: the same). A piece whose squares overflow the input dtype (values apart by more than
about 1e19 in float32) is summed again in float64."""


_CHANNEL_BACKWARD_BYTES = 32 << 20
"""The backward on an ``x`` of more than :data:`_CHANNEL_BACKWARD_BYTES` with runs of more than
:data:`_SHORT_RUN` values visits each channel's N runs in turn, sums them (in float64) and
writes its ``dx`` while they are still in cache, so that ``x`` and ``dy``, which no cache holds, cross
main memory once rather than twice. Everywhere else it streams, as the forward always does
(benchmarks/README.md, "Backward channel by channel")."""





@njit(inline="always", **FLAGS)
def _piece_size(s):
    """The length of the pieces :data:`_PIECE` cuts a run of ``s`` values into, as equal as can be (the
    last one may be shorter)."""
    count = (s + _PIECE - 1) // _PIECE
    return (s + count - 1) // count


@njit(inline="always", **FLAGS)
def _piece_origin(xp):
    """The value a long piece is summed about: the median of its first, middle and last values, so that
    one outlier among them does not become the origin (see :data:`_PIECE`)."""
    u, v, w = xp[0], xp[xp.shape[0] // 2], xp[xp.shape[0] - 1]
    lo, hi = (u, v) if u < v else (v, u)
    return lo if w < lo else hi if hi < w else w


@njit(inline="always", **FLAGS)
def _piece_sums(xp, zero):
    """A long piece's origin r0 (:func:`_piece_origin`) and its sums Σ(x − r0), Σ(x − r0)², summed in
    the input dtype (``zero`` of it), returned in float64; again in float64 if the squares overflowed
    the input dtype."""
    r0 = _piece_origin(xp)
    a = zero
    q = zero
    for j in range(xp.shape[0]):
        t = xp[j] - r0
        a += t
        q += t * t
    a64, q64 = np.float64(a), np.float64(q)
    if not np.isfinite(q64):  # (x − r0)² beyond the input dtype's range (or NaN, inf in the data)
        a64, q64 = run_sums(xp, np.float64(r0))
    return r0, a64, q64


@njit(inline="always", **FLAGS)
def _piece_grad_sums(xp, gp, yp, zero, epilogue):
    """A long piece's origin r0 (:func:`_piece_origin` of ``xp``) and the sums Σ dy', Σ dy' · (x − r0),
    summed in the input dtype, returned in float64 (again in float64 if they overflowed it); dy' is
    ``gp`` masked by ``yp > 0`` after a fused ReLU."""
    r0 = _piece_origin(xp)
    a = zero
    q = zero
    if epilogue == NONE:
        for j in range(xp.shape[0]):
            g = gp[j]
            a += g
            q += g * (xp[j] - r0)
    else:
        for j in range(xp.shape[0]):
            g = gp[j] if yp[j] > 0.0 else zero
            a += g
            q += g * (xp[j] - r0)
    a64, q64 = np.float64(a), np.float64(q)
    if not np.isfinite(a64 + q64):  # dy' or dy' · (x − r0) beyond the input dtype's range, or NaN/inf
        g = gp if epilogue == NONE else np.where(yp > 0.0, gp, zero)
        a64, q64 = run_grad_sums(xp, g, np.float64(r0))
    return r0, a64, q64


@njit(**SUM_FLAGS)
def _plane_sums(x, lo, hi, c, shift, p1, p2):
    """Add Σ(x − shift) and Σ(x − shift)² of the runs [lo, hi) of (N·C, S) ``x`` into the per-channel
    float64 accumulators ``p1``, ``p2`` (run r is channel r mod ``c``), each piece of a run summed in the
    input dtype first; see :data:`_PIECE`."""
    s = x.shape[1]
    zero = x.dtype.type(0.0)
    ch = lo % c
    if s <= _SHORT_RUN:
        # A short run is one piece, summed about its first value by the loop written out here, which runs
        # faster than the piece loop below (benchmarks/README.md, "Run sums in pieces").
        for row in range(lo, hi):
            r0 = x[row, 0]
            a = zero
            q = zero
            for j in range(s):
                t = x[row, j] - r0
                a += t
                q += t * t
            a64, q64 = np.float64(a), np.float64(q)
            if not np.isfinite(q64):  # (x − r0)² beyond the input dtype's range (or NaN, inf in the data)
                a64, q64 = run_sums(x[row], np.float64(r0))
            m1, m2 = moved(a64, q64, s, r0, shift[ch])
            p1[ch] += m1
            p2[ch] += m2
            ch = ch + 1 if ch + 1 < c else 0
        return
    size = _piece_size(s)
    for row in range(lo, hi):
        xr = x[row]
        sh = shift[ch]
        for start in range(0, s, size):
            xp = xr[start:start + size]
            r0, a64, q64 = _piece_sums(xp, zero)
            m1, m2 = moved(a64, q64, xp.shape[0], r0, sh)
            p1[ch] += m1
            p2[ch] += m2
        ch = ch + 1 if ch + 1 < c else 0


@njit(**SUM_FLAGS)
def _plane_grad_sums(x, dy, y, lo, hi, c, shift, p1, p2, epilogue):
    """Add Σ dy' and Σ dy' · (x − shift) of the runs [lo, hi) of (N·C, S) arrays into the per-channel
    float64 accumulators, dy' being dy masked by y > 0 after a fused ReLU; each piece of a run summed in
    the input dtype as in :func:`_plane_sums`."""
    s = x.shape[1]
    zero = x.dtype.type(0.0)
    ch = lo % c
    if s <= _SHORT_RUN:  # a short run is one piece, its loops written out here (see _plane_sums)
        for row in range(lo, hi):
            r0 = x[row, 0]
            a = zero
            q = zero
            if epilogue == NONE:
                for j in range(s):
                    g = dy[row, j]
                    a += g
                    q += g * (x[row, j] - r0)
            else:
                for j in range(s):
                    g = dy[row, j] if y[row, j] > 0.0 else zero
                    a += g
                    q += g * (x[row, j] - r0)
            a64, q64 = np.float64(a), np.float64(q)
            if not np.isfinite(a64 + q64):  # dy' or dy' · (x − r0) beyond the input dtype's range, or NaN/inf
                g = dy[row] if epilogue == NONE else np.where(y[row] > 0.0, dy[row], zero)
                a64, q64 = run_grad_sums(x[row], g, np.float64(r0))
            p1[ch] += a64
            p2[ch] += moved_grad(a64, q64, r0, shift[ch])
            ch = ch + 1 if ch + 1 < c else 0
        return
    size = _piece_size(s)
    for row in range(lo, hi):
        xr, gr, yr = x[row], dy[row], y[row]
        sh = shift[ch]
        for start in range(0, s, size):
            stop = start + size
            r0, a64, q64 = _piece_grad_sums(xr[start:stop], gr[start:stop], yr[start:stop], zero, epilogue)
            p1[ch] += a64
            p2[ch] += moved_grad(a64, q64, r0, sh)
        ch = ch + 1 if ch + 1 < c else 0


@njit(**SUM_FLAGS)
def _channel_grad_sums(x, dy, y, ch, sh, epilogue):
    """Σ dy' and Σ dy' · (x − sh) over channel ``ch`` of (N, C, S) arrays, in float64."""
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[0]):
        for j in range(x.shape[2]):
            g = np.float64(dy[i, ch, j]) if epilogue == NONE or y[i, ch, j] > 0.0 else 0.0
            s1 += g
            s2 += g * (np.float64(x[i, ch, j]) - sh)
    return s1, s2


@njit(**FLAGS)
def _channel_grad_affine(x, dy, y, dx, dres, ch, sh, d, c, k1, k2, epilogue):
    """dx = (dy' − c) · k1 + ((x − sh) − d) · k2 over channel ``ch``; after a fused add also dres = dy'."""
    zero = k1 * 0
    for i in range(x.shape[0]):
        if epilogue == NONE:
            for j in range(x.shape[2]):
                dx[i, ch, j] = dx_value(dy[i, ch, j], x[i, ch, j], sh, d, c, k1, k2)
            continue
        for j in range(x.shape[2]):
            dx[i, ch, j] = dx_value(masked(dy[i, ch, j], y[i, ch, j], zero), x[i, ch, j], sh, d, c, k1, k2)
        if epilogue == ADD_RELU:
            for j in range(x.shape[2]):
                dres[i, ch, j] = masked(dy[i, ch, j], y[i, ch, j], zero)




@njit(**PARALLEL)
def planar_sums(x, shift, parts):
    """The training forward's first pass over (N, C, S) ``x``: ``shift`` set to each channel's first
    value, and per block of runs (one per thread, ``parts`` (B, 2, C) float64) the sums Σ(x − shift) and
    Σ(x − shift)², each run summed in pieces (:data:`_PIECE`)."""
    n, c, s = x.shape
    rows = n * c
    xr = x.reshape(rows, s)
    for ch in range(c):
        shift[ch] = x[0, ch, 0]
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = block_parts(parts, k, rows)
        _plane_sums(xr, lo, hi, c, shift, p1, p2)


@njit(**PARALLEL)
def planar_affine(x, y, residual, shift, a, b, epilogue, blocks, streaming):
    """The forward's writing pass: y = (x − shift) · a + b per channel, then the epilogue, parallel over
    the N·C runs; with streaming stores in ``blocks`` blocks of runs where ``streaming`` is set."""
    n, c, s = x.shape
    rows = n * c
    xr, yr, rr = x.reshape(rows, s), y.reshape(rows, s), residual.reshape(rows, s)
    if streaming:
        for k in prange(blocks):
            lo, hi = block_range(k, rows, blocks)
            for row in range(lo, hi):
                ch = row % c
                stream_affine(xr[row], yr[row], rr[row], shift[ch], a[ch], b[ch], epilogue)
            stream.fence()
        return
    for row in prange(rows):
        ch = row % c
        if epilogue == NONE:
            # The plain map written out here rather than through run_affine's own NONE branch, which ran
            # at half the speed inlined into this loop (benchmarks/README.md, "Plain map in the planar loop").
            xrow, yrow, sh, ak, bk = xr[row], yr[row], shift[ch], a[ch], b[ch]
            for j in range(s):
                yrow[j] = normalized(xrow[j], sh, ak, bk)
        else:
            run_affine(xr[row], yr[row], rr[row], shift[ch], a[ch], b[ch], epilogue)


@njit(**FLAGS)
def bn_planar_forward(x, weight, bias, eps, train, stats, y, residual, epilogue, running_mean, running_var, momentum,
                      unbias, parts, streaming, guarded=False, merged=None):
    """BatchNorm forward on ``x`` of shape (N, C, S): :func:`planar_sums` (training), the per-channel step
    (:func:`~.channel.channel_constants`), :func:`planar_affine`.

    In training ``x`` is read twice, in memory order: once into per-block partial sums, combined per
    channel; then again to write ``y``. Evaluation reads once and writes once. Streaming twice beats
    visiting a channel's N runs while in cache (benchmarks/README.md, "BatchNorm on (N, C, S)").

    ``stats`` is (4, C): shift, mean_shifted, var, rstd. In training all four are written; with fixed
    statistics ``shift`` holds the running mean and ``var`` the running variance on entry, and only
    ``rstd`` is written. In training, ``running_mean`` and ``running_var`` ((C,), in ``x``'s dtype) are
    updated with ``momentum``; empty arrays in their place leave them alone. ``streaming`` writes ``y``
    with streaming stores (see :mod:`.stream`). ``guarded`` skips the update when a channel's batch
    statistics are not finite; returns whether it did. ``merged`` ((4, C): N, K, D, σ², the statistics
    seam's merged moments) replaces the first pass: the batch's statistics are given.
    """
    n, c, s = x.shape
    shift = stats[0]
    merged = given(merged, c)
    if train and not merged.shape[0]:
        planar_sums(x, shift, parts)
    skipped, a, b = channel_factors(parts, merged, weight, bias, eps, train, n * s, stats, running_mean,
                                    running_var, momentum, unbias, guarded)
    planar_affine(x, y, residual, shift, a, b, epilogue, parts.shape[0], streaming)
    return skipped


@njit(**PARALLEL)
def planar_grad_sums(x, dy, y, shift, epilogue, parts):
    """The backward's first pass over (N, C, S) arrays: per block of runs, Σ dy' and Σ dy' · (x − shift)
    per channel into ``parts``, each run summed in pieces."""
    n, c, s = x.shape
    rows = n * c
    xr, dyr, yr = x.reshape(rows, s), dy.reshape(rows, s), y.reshape(rows, s)
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = block_parts(parts, k, rows)
        _plane_grad_sums(xr, dyr, yr, lo, hi, c, shift, p1, p2, epilogue)


@njit(**PARALLEL)
def planar_grad_affine(x, dy, y, dx, dres, shift, d, cm, k1, k2, epilogue, blocks, streaming):
    """The backward's writing pass: dx = (dy' − c) · k1 + ((x − shift) − d) · k2 per channel (and
    dres = dy' after a fused add), parallel over the N·C runs; with streaming stores in ``blocks``
    blocks of runs where ``streaming`` is set."""
    n, c, s = x.shape
    rows = n * c
    xr, dyr, yr = x.reshape(rows, s), dy.reshape(rows, s), y.reshape(rows, s)
    dxr, dresr = dx.reshape(rows, s), dres.reshape(rows, s)
    if streaming:
        for k in prange(blocks):
            lo, hi = block_range(k, rows, blocks)
            for row in range(lo, hi):
                ch = row % c
                stream_grad(xr[row], dyr[row], yr[row], dxr[row], dresr[row], shift[ch], d[ch], cm[ch], k1[ch],
                            k2[ch], epilogue)
            stream.fence()
        return
    zero = x.dtype.type(0.0)
    for row in prange(rows):
        ch = row % c
        xrow, dyrow, dxrow = xr[row], dyr[row], dxr[row]
        sh, dk, ck, k1k, k2k = shift[ch], d[ch], cm[ch], k1[ch], k2[ch]
        if epilogue == NONE:
            for j in range(s):
                dxrow[j] = dx_value(dyrow[j], xrow[j], sh, dk, ck, k1k, k2k)
            continue
        yrow = yr[row]
        for j in range(s):
            g = masked(dyrow[j], yrow[j], zero)
            dxrow[j] = dx_value(g, xrow[j], sh, dk, ck, k1k, k2k)
        if epilogue == ADD_RELU:
            drow = dresr[row]
            for j in range(s):
                drow[j] = masked(dyrow[j], yrow[j], zero)


@njit(**PARALLEL)
def _planar_backward_by_channel(x, dy, y, weight, shift, mean_shifted, rstd, train, need_x, epilogue, dx, dres, dw,
                                db, streaming):
    """The backward parallel over channels, each channel's runs summed and then written while still in
    cache (:data:`_CHANNEL_BACKWARD_BYTES`)."""
    n, c, s = x.shape
    cast = x.dtype.type
    for ch in prange(c):
        s1, s2 = _channel_grad_sums(x, dy, y, ch, np.float64(shift[ch]), epilogue)
        dk = np.float64(mean_shifted[ch]) if train else 0.0
        dgamma, ck, k1k, k2k = closed_form(np.float64(weight[ch]), np.float64(rstd[ch]), dk, s1, s2, n * s, train)
        db[ch] = s1
        dw[ch] = dgamma
        if need_x and streaming:
            for i in range(n):
                stream_grad(x[i, ch], dy[i, ch], y[i, ch], dx[i, ch], dres[i, ch], shift[ch], cast(dk), cast(ck),
                            cast(k1k), cast(k2k), epilogue)
            stream.fence()
        elif need_x:
            _channel_grad_affine(x, dy, y, dx, dres, ch, shift[ch], cast(dk), cast(ck), cast(k1k), cast(k2k),
                                 epilogue)


@njit(**FLAGS)
def bn_planar_backward(x, dy, y, weight, shift, mean_shifted, rstd, train, need_x, epilogue, dx, dres, dw, db,
                       parts, streaming, totals=None, count=0.0):
    """BatchNorm backward on (N, C, S): :func:`planar_grad_sums`, the per-channel step
    (:func:`~.channel.grad_constants`), :func:`planar_grad_affine`.

    Per channel, the sums Σ dy' and Σ dy' · (x − shift) give dβ and dγ; a second read of ``x`` and ``dy``
    (and ``y``, the mask of a fused ReLU) writes ``dx`` (and ``dres = dy'``, the residual's gradient,
    after a fused add). Both passes stream through memory in order, parallel over the N·C runs; on
    large tensors with long runs (:data:`_CHANNEL_BACKWARD_BYTES`) the work is parallel over channels
    instead. ``streaming`` writes ``dx`` (and ``dres``) with streaming stores (see :mod:`.stream`).
    ``totals`` ((2, C): Σ dy' and Σ dy' · x̂ over the whole batch, the statistics seam's combined sums)
    replaces the first pass, ``count`` being the batch's number of values per channel; ``dw`` and ``db``
    are then left alone.
    """
    n, c, s = x.shape
    totals = given(totals, c)
    if not totals.shape[0] and s > _SHORT_RUN and x.size * x.itemsize > _CHANNEL_BACKWARD_BYTES:
        _planar_backward_by_channel(x, dy, y, weight, shift, mean_shifted, rstd, train, need_x, epilogue, dx, dres,
                                    dw, db, streaming)
        return
    if not totals.shape[0]:
        planar_grad_sums(x, dy, y, shift, epilogue, parts)
    m = count if totals.shape[0] else np.float64(n * s)
    d, cm, k1, k2 = channel_grad_factors(parts, totals, weight, mean_shifted, rstd, train, m, dw, db)
    if need_x:
        planar_grad_affine(x, dy, y, dx, dres, shift, d, cm, k1, k2, epilogue, parts.shape[0], streaming)
