"""numba kernels for the CPU backend: the statistics, normalization and closed-form backward of
:mod:`normlab.core.engine`, each in as few passes over memory as the layout allows.

Importing this module imports numba but compiles nothing; each kernel is compiled on its first call
for the dtype it is called with (float32 or float64) and cached on disk (``cache=True``: in
``__pycache__`` next to this file, or, where that folder is not writable, in numba's per-user cache
directory; ``NUMBA_CACHE_DIR`` overrides both).

Conventions shared by every kernel
----------------------------------
* ``x`` and every output are C-contiguous arrays of one dtype (float32 or float64); ``weight`` and
  ``bias`` are arrays of that dtype (ones and zeros stand in for missing parameters).
* Statistics are *shifted*: the sums Σ(x − shift) and Σ(x − shift)² are taken about the first value of
  each statistic's data (short runs and blocks of rows about their own first value, moved to it in
  float64) and accumulated in float64, ``mean_shifted = mean(x − shift)`` and
  ``var = E[(x − shift)²] − mean_shifted²``. ``x − shift`` is exact for data within a factor of two of
  the shift, so a large mean with a tiny spread keeps its variance. The shift then saved, and used to
  normalize forward and backward, is the mean μ rounded to the input dtype, with ``mean_shifted`` the
  float64 remainder (see :func:`_statistic`): μ itself is never used in the input dtype.
* Normalizing computes ``y = (x − shift) · a + b`` with ``a = γ · rstd`` and ``b = β − mean_shifted · a``
  (the per-row kernels keep ``((x − shift) − mean_shifted) · a + β``), the per-statistic constants
  computed in float64 and rounded to the input dtype once. ``x − shift`` and ``mean_shifted`` are of
  the size of the data's spread, never of its mean, so neither form loses the shifted precision. With
  fixed statistics (evaluation) ``shift`` is the running mean and ``mean_shifted`` is 0.
* The backward is the engine's closed form with the per-statistic constants hoisted: with
  ``S = Σ g`` and ``D = Σ g · x̂`` over the statistic's ``m`` values (g = γ · dy', ``dy'`` being ``dy``
  masked by ``y > 0`` after a fused ReLU), ``dx = (g − S/m) · rstd + ((x − shift) − mean_shifted) · k2``
  with ``k2 = −rstd² · D / m``; with fixed statistics ``S/m`` and ``k2`` are 0. Where γ is constant
  over a statistic (BatchNorm) it is factored out of the sums.
* The forward kernels write the statistics into one ``stats`` array of shape (4, K): rows ``shift``,
  ``mean_shifted``, ``var`` (biased) and ``rstd``, one column per statistic. The BatchNorm kernels also
  update the running averages (``running_mean``, ``running_var``) once they have every channel's statistics, so
  a training step needs no further pass over them; guarded, they skip the update when a channel's are not finite.
* ``epilogue`` selects what follows the affine map: 0 nothing, 1 ReLU, 2 add ``residual`` then ReLU.
* Where a kernel does not use an array argument (the residual without ``epilogue`` 2, the mask ``y``
  without ReLU, ``mean_shifted`` with fixed statistics) the caller passes any array of the right shape.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from normlab.kernels import stream

# The GIL stays held: numba's fallback threading layer (workqueue, where OpenMP and TBB are missing)
# aborts the process when two threads launch parallel kernels at once.
_FLAGS = dict(cache=True, error_model="numpy", fastmath={"contract"})
_PARALLEL = dict(parallel=True, **_FLAGS)
# Only the sums may be reassociated (which lets LLVM vectorize them): the elementwise passes must keep
# their order, or ((x − shift) − mean_shifted) · a could become x · a − (shift + mean_shifted) · a and
# lose the shifted precision. Fast-math flags stay on the instructions they were compiled with, so the
# summing helpers are separate functions with their own flags rather than inlined into the kernels.
# (The column sums of the row-major layouts vectorize across columns and need no reassociation.)
# NaN and inf keep their IEEE behaviour everywhere.
_SUM_FLAGS = dict(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})

NONE, RELU, ADD_RELU = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# Building blocks on one contiguous run of values.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **_FLAGS)
def _constants(s1, s2, m, eps):
    """(mean_shifted, var, rstd) in float64 from the shifted sums Σt and Σt² over ``m`` values."""
    d = s1 / m
    v = max(s2 / m - d * d, 0.0)
    return d, v, 1.0 / np.sqrt(v + eps)


@njit(inline="always", **_FLAGS)
def _statistic(k, first, s1, s2, m, eps, train, shift, mean_shifted, var, rstd):
    """Statistic ``k``: in training from the sums ``s1``, ``s2`` shifted by ``first``, written to
    ``shift``, ``mean_shifted`` and ``var``; otherwise from the fixed variance ``var[k]``. Writes
    ``rstd[k]`` and returns (mean_shifted, rstd) in float64.

    In training the shift saved (and used to normalize, forward and backward) is not ``first`` but the
    mean μ = first + d rounded to the input dtype, and ``mean_shifted`` the float64 remainder μ − shift:
    a first value far from the rest (an outlier) then costs ``x − shift`` no digits, as it would if the
    data were normalized about it.
    """
    if train:
        d, v, r = _constants(s1, s2, m, eps)
        mu = np.float64(first) + d
        sh = shift.dtype.type(mu)
        if not np.isfinite(sh):  # μ beyond the input dtype's range, or NaN data: keep the first value
            sh = first
        shift[k] = sh
        d = mu - np.float64(sh)
        mean_shifted[k] = d
        var[k] = v
    else:
        d = 0.0
        r = 1.0 / np.sqrt(np.float64(var[k]) + eps)
    rstd[k] = r
    return d, r


@njit(inline="always", **_FLAGS)
def _closed_form(gam, r, d, s1, s2, m, train):
    """dγ and the constants (c, k1, k2) of dx = (dy' − c) · k1 + ((x − shift) − d) · k2, in float64.

    ``s1 = Σ dy'`` and ``s2 = Σ dy' · (x − shift)`` over the ``m`` values of one statistic, so that
    Σ dy' · x̂ = r · (s2 − d · s1) is dγ. Where γ varies within a statistic (GroupNorm, LayerNorm) the
    caller passes ``gam = 1`` and sums of g = γ · dy in place of dy, and uses γ · dy in place of dy'.
    """
    dgamma = r * (s2 - d * s1)
    if not train:
        return dgamma, 0.0, gam * r, 0.0
    return dgamma, s1 / m, gam * r, -gam * r * r * dgamma / m


@njit(inline="always", **_FLAGS)
def _block(k, rows, blocks):
    """Rows [lo, hi) of block ``k`` when ``rows`` rows are cut into ``blocks`` near-equal blocks."""
    return k * rows // blocks, (k + 1) * rows // blocks


@njit(**_SUM_FLAGS)
def _sums(xr, sh):
    """Σ(x − sh) and Σ(x − sh)² over the run ``xr``, in float64."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        t = np.float64(xr[j]) - sh
        s1 += t
        s2 += t * t
    return s1, s2


@njit(**_SUM_FLAGS)
def _grad_sums(xr, dyr, sh):
    """Σ dy and Σ dy · (x − sh) over one run, in float64."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        g = np.float64(dyr[j])
        s1 += g
        s2 += g * (np.float64(xr[j]) - sh)
    return s1, s2


@njit(**_SUM_FLAGS)
def _weighted_grad_sums(xr, dyr, wr, sh):
    """Σ w · dy and Σ w · dy · (x − sh) over one run, in float64."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        g = np.float64(wr[j]) * np.float64(dyr[j])
        s1 += g
        s2 += g * (np.float64(xr[j]) - sh)
    return s1, s2


@njit(inline="always", **_FLAGS)
def _affine(xr, yr, sh, d, a, b):
    """y = ((x − sh) − d) · a + b over one run, in the input dtype."""
    for j in range(xr.shape[0]):
        yr[j] = ((xr[j] - sh) - d) * a + b


@njit(inline="always", **_FLAGS)
def _run_affine(xr, yr, rr, sh, a, b, epilogue):
    """y = (x − sh) · a + b over one run, ``sh``, ``a``, ``b`` scalars, followed in the same loop by the
    epilogue: ReLU (1) or adding ``rr`` then ReLU (2). ReLU keeps NaN, as torch.relu does.

    One loop with the select in it: a second pass for the ReLU, even over a run still in L1, cost as much
    as the affine map itself on (32, 512, 7, 7).
    """
    zero = yr.dtype.type(0.0)
    if epilogue == NONE:
        for j in range(xr.shape[0]):
            yr[j] = (xr[j] - sh) * a + b
    elif epilogue == RELU:
        for j in range(xr.shape[0]):
            v = (xr[j] - sh) * a + b
            yr[j] = zero if v < zero else v
    else:
        for j in range(xr.shape[0]):
            v = (xr[j] - sh) * a + b + rr[j]
            yr[j] = zero if v < zero else v


@njit(inline="always", **_FLAGS)
def _row_affine(xr, yr, rr, sh, a, b, epilogue):
    """:func:`_run_affine` with ``sh``, ``a``, ``b`` vectors, one entry per value of the row (per column)."""
    zero = yr.dtype.type(0.0)
    if epilogue == NONE:
        for j in range(xr.shape[0]):
            yr[j] = (xr[j] - sh[j]) * a[j] + b[j]
    elif epilogue == RELU:
        for j in range(xr.shape[0]):
            v = (xr[j] - sh[j]) * a[j] + b[j]
            yr[j] = zero if v < zero else v
    else:
        for j in range(xr.shape[0]):
            v = (xr[j] - sh[j]) * a[j] + b[j] + rr[j]
            yr[j] = zero if v < zero else v


def _at(v, j):
    """``v[j]`` for an array, ``v`` itself for a scalar: one loop body for per-run and per-value factors."""
    raise NotImplementedError("numba only")


@overload(_at, inline="always")
def _at_overload(v, j):
    if isinstance(v, types.Array):
        return lambda v, j: v[j]
    return lambda v, j: v


@njit(inline="always", **_FLAGS)
def _affine_values(xr, yr, rr, sh, a, b, epilogue, lo, hi):
    """:func:`_run_affine` on values [lo, hi) of a run, ``sh``, ``a``, ``b`` scalars or arrays over the run."""
    zero = yr.dtype.type(0.0)
    for j in range(lo, hi):
        v = (xr[j] - _at(sh, j)) * _at(a, j) + _at(b, j)
        if epilogue == ADD_RELU:
            v = v + rr[j]
        yr[j] = v if epilogue == NONE or not v < zero else zero


@njit(inline="always", **_FLAGS)
def _stream_affine(xr, yr, rr, sh, a, b, epilogue):
    """:func:`_run_affine` (``sh``, ``a``, ``b`` scalars) or :func:`_row_affine` (arrays over the run)
    written with streaming stores (:mod:`normlab.kernels.stream`): the values before the output's first
    32-byte boundary and after its last whole vector ordinarily, the rest a vector at a time. The caller
    ends its block with :func:`stream.fence`."""
    n = xr.shape[0]
    w = stream.lanes(yr)
    lo, hi = stream.span(yr)
    _affine_values(xr, yr, rr, sh, a, b, epilogue, 0, lo)
    if epilogue == NONE:
        for j in range(lo, hi, w):
            stream.affine(yr, j, xr, sh, a, b)
    elif epilogue == RELU:
        for j in range(lo, hi, w):
            stream.affine_relu(yr, j, xr, sh, a, b)
    else:
        for j in range(lo, hi, w):
            stream.affine_add_relu(yr, j, xr, sh, a, b, rr)
    _affine_values(xr, yr, rr, sh, a, b, epilogue, hi, n)


@njit(inline="always", **_FLAGS)
def _grad_values(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue, lo, hi):
    """dx = (dy' − c) · k1 + ((x − sh) − d) · k2 on values [lo, hi) of a run (and dres = dy' after a fused
    add), the factors scalars or arrays over the run."""
    zero = dxr.dtype.type(0.0)
    for j in range(lo, hi):
        g = dyr[j] if epilogue == NONE or yr[j] > 0.0 else zero
        dxr[j] = (g - _at(c, j)) * _at(k1, j) + ((xr[j] - _at(sh, j)) - _at(d, j)) * _at(k2, j)
        if epilogue == ADD_RELU:
            dresr[j] = g


@njit(inline="always", **_FLAGS)
def _stream_grad(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue):
    """:func:`_grad_values` over a whole run with streaming stores, as :func:`_stream_affine`. ``dxr`` and
    ``dresr`` are runs of arrays laid out alike, so one head fits both."""
    n = xr.shape[0]
    w = stream.lanes(dxr)
    lo, hi = stream.span(dxr)
    _grad_values(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue, 0, lo)
    if epilogue == NONE:
        for j in range(lo, hi, w):
            stream.grad(dxr, j, dyr, xr, sh, d, c, k1, k2)
    else:
        for j in range(lo, hi, w):
            stream.grad_relu(dxr, j, yr, dyr, xr, sh, d, c, k1, k2)
        if epilogue == ADD_RELU and stream.head(dresr) == lo:
            for j in range(lo, hi, w):
                stream.mask(dresr, j, yr, dyr)
        elif epilogue == ADD_RELU:  # laid out unlike dx: written ordinarily
            zero = dresr.dtype.type(0.0)
            for j in range(lo, hi):
                dresr[j] = dyr[j] if yr[j] > 0.0 else zero
    _grad_values(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue, hi, n)


@njit(inline="always", **_FLAGS)
def _stream_centred(xr, yr, sh, d, a, b):
    """:func:`_affine` over one run (y = ((x − sh) − d) · a + b, scalars) with streaming stores, as
    :func:`_stream_affine`."""
    w = stream.lanes(yr)
    lo, hi = stream.span(yr)
    _affine(xr[:lo], yr[:lo], sh, d, a, b)
    for j in range(lo, hi, w):
        stream.centred_affine(yr, j, xr, sh, d, a, b)
    _affine(xr[hi:], yr[hi:], sh, d, a, b)


@njit(inline="always", **_FLAGS)
def _layer_values(xr, yr, sh, d, r, wr, br, lo, hi):
    """y = ((x − sh) − d) · (r · w) + b on values [lo, hi) of a row whose every value has its own
    parameters ``wr``, ``br`` (LayerNorm)."""
    for j in range(lo, hi):
        yr[j] = ((xr[j] - sh) - d) * (r * wr[j]) + br[j]


@njit(inline="always", **_FLAGS)
def _stream_layer(xr, yr, sh, d, r, wr, br):
    """:func:`_layer_values` over a whole row with streaming stores, as :func:`_stream_affine`."""
    n = xr.shape[0]
    w = stream.lanes(yr)
    lo, hi = stream.span(yr)
    _layer_values(xr, yr, sh, d, r, wr, br, 0, lo)
    for j in range(lo, hi, w):
        stream.centred_scaled_affine(yr, j, xr, sh, d, r, wr, br)
    _layer_values(xr, yr, sh, d, r, wr, br, hi, n)


@njit(inline="always", **_FLAGS)
def _weighted_grad_values(xr, dyr, dxr, wt, sh, d, c, k1, k2, lo, hi):
    """dx = (dy · w − c) · k1 + ((x − sh) − d) · k2 on values [lo, hi) of a run, every factor a scalar or
    an array over the run."""
    for j in range(lo, hi):
        dxr[j] = (dyr[j] * _at(wt, j) - _at(c, j)) * _at(k1, j) + ((xr[j] - _at(sh, j)) - _at(d, j)) * _at(k2, j)


@njit(inline="always", **_FLAGS)
def _stream_weighted_grad(xr, dyr, dxr, wt, sh, d, c, k1, k2):
    """:func:`_weighted_grad_values` over a whole run with streaming stores, as :func:`_stream_affine`."""
    n = xr.shape[0]
    w = stream.lanes(dxr)
    lo, hi = stream.span(dxr)
    _weighted_grad_values(xr, dyr, dxr, wt, sh, d, c, k1, k2, 0, lo)
    for j in range(lo, hi, w):
        stream.weighted_grad(dxr, j, dyr, wt, xr, sh, d, c, k1, k2)
    _weighted_grad_values(xr, dyr, dxr, wt, sh, d, c, k1, k2, hi, n)


# ---------------------------------------------------------------------------------------------------
# BatchNorm on (N, C, S) contiguous data: one statistic per channel, from N runs of S values. The kernels
# see the data as N·C runs (row r is channel r mod C) and stream through them in memory order.
# ---------------------------------------------------------------------------------------------------

_SHORT_RUN = 256
_PIECE = 2048
"""The streaming kernels sum each run in the input dtype, then move its sums to the channel's shift and
add them into the channel's float64 accumulators (:func:`_moved`): a run of up to :data:`_SHORT_RUN`
values (maps up to 16x16) in one piece about its first value, a longer run in pieces of at most
:data:`_PIECE` values (as equal as can be: a 56x56 map is two pieces of 1568), each about the median of
its first, middle and last values (:func:`_piece_origin`).

Summing in float64 costs more than reading the data: converting every value and reducing float64
vector lanes bounded the statistics pass (on (32, 512, 7, 7) float32, 105-134 µs for the sums against
52 µs in float32, 2 threads); cutting long runs into pieces of 256 made their sums 2-3x slower than one
loop over each run (the reductions and float64 updates are paid per piece), pieces of 2048 do not.

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
main memory once rather than twice. Everywhere else it streams, as the forward always does.

Measured on the 2-core benchmark machine (float32, interleaved A/B of the kernels, caches flushed
before each call or not): streaming was 0.76-1.09x as fast on (64, 64, 56, 56) (51 MB), 0.96-1.2x on
25.7 MB ((32, 64, 56, 56), (128, 64, 28, 28)) and 1.0-1.7x below; the forward, with one array to read,
streamed 1.0-1.8x as fast on (64, 64, 56, 56) as well."""


@njit(inline="always", **_FLAGS)
def _moved(a, q, n, r0, sh):
    """Float64 sums a = Σ(x − r0) and q = Σ(x − r0)² over ``n`` values, moved to the shift ``sh``:
    Σ(x − sh) = a + n·δ and Σ(x − sh)² = q + δ·(2a + n·δ), with δ = r0 − sh."""
    delta = np.float64(r0) - np.float64(sh)
    return a + n * delta, q + delta * (2.0 * a + n * delta)


@njit(inline="always", **_FLAGS)
def _moved_grad(a, q, r0, sh):
    """Float64 sums a = Σ dy' and q = Σ dy' · (x − r0), moved to the shift ``sh``:
    Σ dy' · (x − sh) = q + δ·a, with δ = r0 − sh."""
    return q + (np.float64(r0) - np.float64(sh)) * a


@njit(inline="always", **_FLAGS)
def _piece_size(s):
    """The length of the pieces :data:`_PIECE` cuts a run of ``s`` values into, as equal as can be (the
    last one may be shorter)."""
    count = (s + _PIECE - 1) // _PIECE
    return (s + count - 1) // count


@njit(inline="always", **_FLAGS)
def _piece_origin(xp):
    """The value a long piece is summed about: the median of its first, middle and last values, so that
    one outlier among them does not become the origin (see :data:`_PIECE`)."""
    u, v, w = xp[0], xp[xp.shape[0] // 2], xp[xp.shape[0] - 1]
    lo, hi = (u, v) if u < v else (v, u)
    return lo if w < lo else hi if hi < w else w


@njit(inline="always", **_FLAGS)
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
        a64, q64 = _sums(xp, np.float64(r0))
    return r0, a64, q64


@njit(inline="always", **_FLAGS)
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
        a64, q64 = _grad_sums(xp, g, np.float64(r0))
    return r0, a64, q64


@njit(**_SUM_FLAGS)
def _plane_sums(x, lo, hi, c, shift, p1, p2):
    """Add Σ(x − shift) and Σ(x − shift)² of the runs [lo, hi) of (N·C, S) ``x`` into the per-channel
    float64 accumulators ``p1``, ``p2`` (run r is channel r mod ``c``), each piece of a run summed in the
    input dtype first; see :data:`_PIECE`."""
    s = x.shape[1]
    zero = x.dtype.type(0.0)
    ch = lo % c
    if s <= _SHORT_RUN:
        # A short run is one piece, summed about its first value by the loop written out here: through the
        # piece loop below the sums ran at half the speed on 7x7 maps, the backward's at 0.6-0.8x.
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
                a64, q64 = _sums(x[row], np.float64(r0))
            m1, m2 = _moved(a64, q64, s, r0, shift[ch])
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
            m1, m2 = _moved(a64, q64, xp.shape[0], r0, sh)
            p1[ch] += m1
            p2[ch] += m2
        ch = ch + 1 if ch + 1 < c else 0


@njit(**_SUM_FLAGS)
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
                a64, q64 = _grad_sums(x[row], g, np.float64(r0))
            p1[ch] += a64
            p2[ch] += _moved_grad(a64, q64, r0, shift[ch])
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
            p2[ch] += _moved_grad(a64, q64, r0, sh)
        ch = ch + 1 if ch + 1 < c else 0


@njit(**_SUM_FLAGS)
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


@njit(**_FLAGS)
def _channel_grad_affine(x, dy, y, dx, dres, ch, sh, d, c, k1, k2, epilogue):
    """dx = (dy' − c) · k1 + ((x − sh) − d) · k2 over channel ``ch``; after a fused add also dres = dy'."""
    zero = k1 * 0
    for i in range(x.shape[0]):
        if epilogue == NONE:
            for j in range(x.shape[2]):
                dx[i, ch, j] = (dy[i, ch, j] - c) * k1 + ((x[i, ch, j] - sh) - d) * k2
            continue
        for j in range(x.shape[2]):
            g = dy[i, ch, j] if y[i, ch, j] > 0.0 else zero
            dx[i, ch, j] = (g - c) * k1 + ((x[i, ch, j] - sh) - d) * k2
        if epilogue == ADD_RELU:
            for j in range(x.shape[2]):
                dres[i, ch, j] = dy[i, ch, j] if y[i, ch, j] > 0.0 else zero


@njit(inline="always", **_FLAGS)
def _update_running(k, mu, v, rm, rv, momentum, unbias):
    """running ← (1 − momentum) · running + momentum · statistic for channel ``k``: the mean ``mu`` and
    the unbiased variance v · m/(m − 1) (``unbias``), in float64, rounded once."""
    rm[k] = (1.0 - momentum) * np.float64(rm[k]) + momentum * mu
    rv[k] = (1.0 - momentum) * np.float64(rv[k]) + momentum * (v * unbias)


@njit(inline="always", **_FLAGS)
def _finite_statistic(mu, v, rm, unbias):
    """Whether the batch mean ``mu`` and unbiased variance v · ``unbias``, rounded to the running
    statistics' dtype, are both finite (:mod:`normlab.core.guard`)."""
    return np.isfinite(rm.dtype.type(mu)) and np.isfinite(rm.dtype.type(v * unbias))


@njit(**_PARALLEL)
def bn_planar_forward(x, weight, bias, eps, train, stats, y, residual, epilogue, running_mean, running_var, momentum,
                      unbias, parts, streaming, guarded=False):
    """BatchNorm forward on ``x`` of shape (N, C, S).

    In training ``x`` is read twice, in memory order: once into per-block partial sums (``parts``,
    (B, 2, C) float64: one block of runs per thread, each run summed in pieces, see :data:`_PIECE`),
    combined per channel; then again to write ``y``. Evaluation reads once and writes once. Both passes
    are parallel over the N·C runs.

    Streaming twice beats visiting a channel's N runs, C·S values apart, and normalizing them while in
    cache (2-core benchmark machine, float32, interleaved A/B of the kernels, each run summed in float64
    in the per-channel version): 1.3-3.0x on 7x7 maps, 1.3-2.5x on 14x14; on 28x28 (64, 16, 28, 28)
    1.3-1.5x, 1.9-2.0x with caches flushed before each call (as after a convolution in a network); on
    56x56 1.3x on (8, 64, 56, 56) (1.05-1.3x flushed) and 1.0-1.2x on (64, 64, 56, 56), where both reads
    come from memory.

    ``stats`` is (4, C): shift, mean_shifted, var, rstd. In training all four are written; with fixed
    statistics ``shift`` holds the running mean and ``var`` the running variance on entry, and only
    ``rstd`` is written. In training, ``running_mean`` and ``running_var`` ((C,), in ``x``'s dtype) are
    updated with ``momentum``; empty arrays in their place leave them alone. ``streaming`` writes ``y``
    with streaming stores (see :mod:`normlab.kernels.stream`). ``guarded`` skips the update when a
    channel's batch statistics are not finite; returns whether it did (:func:`_channel_constants`).
    """
    n, c, s = x.shape
    rows = n * c
    xr, yr, rr = x.reshape(rows, s), y.reshape(rows, s), residual.reshape(rows, s)
    shift = stats[0]
    if train:
        for ch in range(c):
            shift[ch] = x[0, ch, 0]
        for k in prange(parts.shape[0]):
            p1, p2, lo, hi = _block_parts(parts, k, rows)
            _plane_sums(xr, lo, hi, c, shift, p1, p2)
    a = np.empty(c, x.dtype)
    b = np.empty(c, x.dtype)
    skipped = _channel_constants(parts, weight, bias, eps, train, n * s, stats, running_mean, running_var, momentum,
                                 unbias, guarded, a, b)
    if streaming:
        nb = parts.shape[0]
        for k in prange(nb):
            lo, hi = _block(k, rows, nb)
            for row in range(lo, hi):
                ch = row % c
                _stream_affine(xr[row], yr[row], rr[row], shift[ch], a[ch], b[ch], epilogue)
            stream.fence()
        return skipped
    for row in prange(rows):
        ch = row % c
        if epilogue == NONE:
            # The plain map written out here rather than through _run_affine's own NONE branch: inlined into
            # this loop, that branch ran at half the speed (interleaved A/B, (32, 512, 7, 7), 66 vs 130 µs
            # eval), although the loop is the same.
            xrow, yrow, sh, ak, bk = xr[row], yr[row], shift[ch], a[ch], b[ch]
            for j in range(s):
                yrow[j] = (xrow[j] - sh) * ak + bk
        else:
            _run_affine(xr[row], yr[row], rr[row], shift[ch], a[ch], b[ch], epilogue)
    return skipped


@njit(**_PARALLEL)
def bn_planar_backward(x, dy, y, weight, shift, mean_shifted, rstd, train, need_x, epilogue, dx, dres, dw, db,
                       parts, streaming):
    """BatchNorm backward on (N, C, S).

    Per channel, the sums Σ dy' and Σ dy' · (x − shift) give dβ and dγ; a second read of ``x`` and ``dy``
    (and ``y``, the mask of a fused ReLU) writes ``dx`` (and ``dres = dy'``, the residual's gradient,
    after a fused add). Both passes stream through memory in order, parallel over the N·C runs, the sums
    into per-block partials (``parts`` as in :func:`bn_planar_forward`, each run summed in pieces); on
    large tensors with long runs (see :data:`_CHANNEL_BACKWARD_BYTES`) the work is parallel over
    channels instead, each channel's runs summed and then written while still in cache. ``streaming``
    writes ``dx`` (and ``dres``) with streaming stores (see :mod:`normlab.kernels.stream`).
    """
    n, c, s = x.shape
    cast = x.dtype.type
    if s > _SHORT_RUN and x.size * x.itemsize > _CHANNEL_BACKWARD_BYTES:
        for ch in prange(c):
            s1, s2 = _channel_grad_sums(x, dy, y, ch, np.float64(shift[ch]), epilogue)
            dk = np.float64(mean_shifted[ch]) if train else 0.0
            dgamma, ck, k1k, k2k = _closed_form(np.float64(weight[ch]), np.float64(rstd[ch]), dk, s1, s2, n * s, train)
            db[ch] = s1
            dw[ch] = dgamma
            if need_x and streaming:
                for i in range(n):
                    _stream_grad(x[i, ch], dy[i, ch], y[i, ch], dx[i, ch], dres[i, ch], shift[ch], cast(dk), cast(ck),
                                 cast(k1k), cast(k2k), epilogue)
                stream.fence()
            elif need_x:
                _channel_grad_affine(x, dy, y, dx, dres, ch, shift[ch], cast(dk), cast(ck), cast(k1k), cast(k2k),
                                     epilogue)
        return
    rows = n * c
    xr, dyr, yr = x.reshape(rows, s), dy.reshape(rows, s), y.reshape(rows, s)
    dxr, dresr = dx.reshape(rows, s), dres.reshape(rows, s)
    for k in prange(parts.shape[0]):
        p1, p2, lo, hi = _block_parts(parts, k, rows)
        _plane_grad_sums(xr, dyr, yr, lo, hi, c, shift, p1, p2, epilogue)
    d = np.empty(c, x.dtype)
    cm = np.empty(c, x.dtype)
    k1 = np.empty(c, x.dtype)
    k2 = np.empty(c, x.dtype)
    _grad_constants(parts, weight, mean_shifted, rstd, train, n * s, dw, db, d, cm, k1, k2)
    if not need_x:
        return
    if streaming:
        nb = parts.shape[0]
        for k in prange(nb):
            lo, hi = _block(k, rows, nb)
            for row in range(lo, hi):
                ch = row % c
                _stream_grad(xr[row], dyr[row], yr[row], dxr[row], dresr[row], shift[ch], d[ch], cm[ch], k1[ch],
                             k2[ch], epilogue)
            stream.fence()
        return
    zero = cast(0.0)
    for row in prange(rows):
        ch = row % c
        xrow, dyrow, dxrow = xr[row], dyr[row], dxr[row]
        sh, dk, ck, k1k, k2k = shift[ch], d[ch], cm[ch], k1[ch], k2[ch]
        if epilogue == NONE:
            for j in range(s):
                dxrow[j] = (dyrow[j] - ck) * k1k + ((xrow[j] - sh) - dk) * k2k
            continue
        yrow = yr[row]
        for j in range(s):
            g = dyrow[j] if yrow[j] > 0.0 else zero
            dxrow[j] = (g - ck) * k1k + ((xrow[j] - sh) - dk) * k2k
        if epilogue == ADD_RELU:
            drow = dresr[row]
            for j in range(s):
                drow[j] = dyrow[j] if yrow[j] > 0.0 else zero


# ---------------------------------------------------------------------------------------------------
# BatchNorm on (M, C) rows, C contiguous: 2D input, or channels_last with M = N·spatial.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **_FLAGS)
def _combine(parts, ch):
    """Σ over blocks of the two partial sums of column ``ch`` of ``parts`` ((B, 2, C) float64)."""
    s1 = 0.0
    s2 = 0.0
    for k in range(parts.shape[0]):
        s1 += parts[k, 0, ch]
        s2 += parts[k, 1, ch]
    return s1, s2


@njit(inline="always", **_FLAGS)
def _block_parts(parts, k, rows):
    """Block ``k`` of ``rows`` rows cut into ``parts.shape[0]`` near-equal blocks: its two zeroed float64
    accumulators ``parts[k, 0]`` and ``parts[k, 1]``, and its rows [lo, hi)."""
    p1 = parts[k, 0]
    p2 = parts[k, 1]
    p1[:] = 0.0
    p2[:] = 0.0
    lo, hi = _block(k, rows, parts.shape[0])
    return p1, p2, lo, hi


@njit(inline="always", **_FLAGS)
def _channel_constants(parts, weight, bias, eps, train, count, stats, running_mean, running_var, momentum, unbias,
                       guarded, a, b):
    """The BatchNorm forward's per-channel step between its two passes: each channel's statistics from the
    block partials ``parts`` combined (training, ``count`` values per channel) or from the fixed ones in
    ``stats`` (:func:`_statistic`), the running statistics updated where they are given, and the affine
    map's factors a = γ · rstd and b = β − mean_shifted · a written to ``a`` and ``b`` in their dtype.

    Returns whether the update was skipped: ``guarded`` and some channel's batch statistics not finite
    (:func:`_finite_statistic`), in which case no channel is updated."""
    shift, mean_shifted, var, rstd = stats[0], stats[1], stats[2], stats[3]
    c = a.shape[0]
    update = train and running_mean.shape[0] > 0
    mus = np.empty(c if update else 0)
    finite = True
    for ch in range(c):
        s1, s2 = _combine(parts, ch) if train else (0.0, 0.0)
        d, r = _statistic(ch, shift[ch], s1, s2, count, eps, train, shift, mean_shifted, var, rstd)
        if update:
            mu = np.float64(shift[ch]) + d
            mus[ch] = mu
            finite = finite and _finite_statistic(mu, np.float64(var[ch]), running_mean, unbias)
        ak = np.float64(weight[ch]) * r
        a[ch] = ak
        b[ch] = np.float64(bias[ch]) - d * ak
    if not update or (guarded and not finite):
        return update
    for ch in range(c):
        _update_running(ch, mus[ch], np.float64(var[ch]), running_mean, running_var, momentum, unbias)
    return False


@njit(inline="always", **_FLAGS)
def _grad_constants(parts, weight, mean_shifted, rstd, train, count, dw, db, d, cm, k1, k2):
    """The BatchNorm backward's per-channel step between its two passes: dβ and dγ from the block partials
    ``parts`` combined, and the constants of dx = (dy' − c) · k1 + ((x − shift) − d) · k2
    (:func:`_closed_form`) written to ``d``, ``cm``, ``k1`` and ``k2`` in their dtype."""
    for ch in range(d.shape[0]):
        s1, s2 = _combine(parts, ch)
        dk = np.float64(mean_shifted[ch]) if train else 0.0
        dgamma, ck, k1k, k2k = _closed_form(np.float64(weight[ch]), np.float64(rstd[ch]), dk, s1, s2, count, train)
        db[ch] = s1
        dw[ch] = dgamma
        d[ch] = dk
        cm[ch] = ck
        k1[ch] = k1k
        k2[ch] = k2k


_ROWS = 8  # rows summed in the input dtype before a column's float64 accumulators are updated
_LOCKSTEP_COLUMNS = 512
"""From this many columns on, the column sums read their eight rows in lockstep, one column at a time,
with the sums in registers; narrower rows are read one after the other into accumulators in L1.

Measured on the 2-core benchmark machine (float32, caches flushed between calls, interleaved): reading
row by row made the kernels on 256 and 64 columns 1.1-1.4x faster (BatchNorm on (50176, 256) and
(200704, 64) rows, GroupNorm on channels_last (32, 256, 28, 28), forward and backward), while from 512
columns on the lockstep order was as fast or faster (row by row: 0.9x on (1568, 512) rows; the sums
alone over 25 MiB took 1.30 ms row by row against 0.75 ms in lockstep at 2048 columns)."""


@njit(inline="always", **_FLAGS)
def _spill(a, q, r0, sh, p1, p2):
    """Move the input-dtype sums a = Σ(x − r0) and q = Σ(x − r0)² of eight rows to the shift ``sh`` in
    float64 (:func:`_moved`), add them into the accumulators, and zero them."""
    for ch in range(a.shape[0]):
        m1, m2 = _moved(np.float64(a[ch]), np.float64(q[ch]), _ROWS, r0[ch], sh[ch])
        p1[ch] += m1
        p2[ch] += m2
        a[ch] = 0.0
        q[ch] = 0.0


@njit(inline="always", **_FLAGS)
def _spill_grad(a, q, r0, sh, p1, p2):
    """Move the input-dtype sums a = Σ dy' and q = Σ dy' · (x − r0) of eight rows to the shift ``sh`` in
    float64 (:func:`_moved_grad`), add them into the accumulators, and zero them."""
    for ch in range(a.shape[0]):
        a64 = np.float64(a[ch])
        p1[ch] += a64
        p2[ch] += _moved_grad(a64, np.float64(q[ch]), r0[ch], sh[ch])
        a[ch] = 0.0
        q[ch] = 0.0


@njit(**_FLAGS)
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


@njit(**_FLAGS)
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
                m1, m2 = _moved(np.float64(a), np.float64(q), _ROWS, r0, sh[ch])
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


@njit(**_FLAGS)
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
                p2[ch] += _moved_grad(a64, np.float64(q), r0, sh[ch])
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


@njit(**_FLAGS)
def _column_affine(x, y, residual, lo, hi, sh, a, b, epilogue):
    """y = (x − sh) · a + b on rows [lo, hi), every factor per column, then the epilogue per row.

    ``b`` is β − mean_shifted · a: both terms are of the size of the data's spread, so folding the mean
    into it loses nothing, and saves a load and a subtraction per value.
    """
    for i in range(lo, hi):
        _row_affine(x[i], y[i], residual[i], sh, a, b, epilogue)


@njit(**_FLAGS)
def _column_grad_affine(x, dy, y, dx, dres, lo, hi, sh, d, w, cm, k1, k2, epilogue):
    """dx = (w · dy' − c) · k1 + ((x − sh) − d) · k2 on rows [lo, hi), every factor per column; after a
    fused add also dres = dy'. An empty ``w`` stands for w = 1 (BatchNorm, whose γ is in ``k1``)."""
    zero = k1[0] * 0
    for i in range(lo, hi):
        xr, dyr, yr, dxr = x[i], dy[i], y[i], dx[i]
        if epilogue == NONE and w.shape[0] == 0:
            for ch in range(x.shape[1]):
                dxr[ch] = (dyr[ch] - cm[ch]) * k1[ch] + ((xr[ch] - sh[ch]) - d[ch]) * k2[ch]
        elif epilogue == NONE:
            for ch in range(x.shape[1]):
                dxr[ch] = (dyr[ch] * w[ch] - cm[ch]) * k1[ch] + ((xr[ch] - sh[ch]) - d[ch]) * k2[ch]
        else:
            for ch in range(x.shape[1]):
                g = dyr[ch] if yr[ch] > 0.0 else zero
                dxr[ch] = (g - cm[ch]) * k1[ch] + ((xr[ch] - sh[ch]) - d[ch]) * k2[ch]
        if epilogue == ADD_RELU:
            dr = dres[i]
            for ch in range(x.shape[1]):
                dr[ch] = dyr[ch] if yr[ch] > 0.0 else zero


@njit(**_PARALLEL)
def bn_rows_forward(x, weight, bias, eps, train, stats, y, residual, epilogue, running_mean, running_var, momentum,
                    unbias, parts, streaming, guarded=False):
    """BatchNorm forward on ``x`` of shape (M, C) with C contiguous.

    Memory passes: training reads ``x`` once into per-block partial sums (``parts``, (B, 2, C) float64:
    one block of rows per thread, every eight rows adding into C contiguous accumulators, see
    :func:`_column_sums`), combines them per channel, then reads ``x`` again and writes ``y``;
    evaluation reads once and writes once. The second
    read comes from cache only when the tensor fits in it: no value can be normalized before the
    statistics, which need every row, are complete. ``stats``, the running statistics and ``streaming``
    as in :func:`bn_planar_forward`.
    """
    m, c = x.shape
    nb = parts.shape[0]
    shift = stats[0]
    if train:
        shift[:] = x[0]
        for k in prange(nb):
            p1, p2, lo, hi = _block_parts(parts, k, m)
            _column_sums(x, lo, hi, shift, p1, p2)
    a = np.empty(c, x.dtype)
    b = np.empty(c, x.dtype)
    skipped = _channel_constants(parts, weight, bias, eps, train, m, stats, running_mean, running_var, momentum,
                                 unbias, guarded, a, b)
    if streaming:
        for k in prange(nb):
            lo, hi = _block(k, m, nb)
            for i in range(lo, hi):
                _stream_affine(x[i], y[i], residual[i], shift, a, b, epilogue)
            stream.fence()
        return skipped
    for i in prange(m):
        _row_affine(x[i], y[i], residual[i], shift, a, b, epilogue)
    return skipped


@njit(**_PARALLEL)
def bn_rows_backward(x, dy, y, weight, shift, mean_shifted, rstd, train, need_x, epilogue, dx, dres, dw, db,
                     parts, streaming):
    """BatchNorm backward on (M, C) rows.

    Memory passes: one read of ``x`` and ``dy`` (and ``y`` after a fused ReLU) into per-block partial
    sums Σ dy' and Σ dy' · (x − shift) per channel, combined into dβ and dγ; then a second read of the
    same and one write of ``dx`` (and ``dres``), with streaming stores where ``streaming`` is set.
    """
    m, c = x.shape
    nb = parts.shape[0]
    for k in prange(nb):
        p1, p2, lo, hi = _block_parts(parts, k, m)
        _column_grad_sums(x, dy, y, lo, hi, shift, p1, p2, epilogue)
    d = np.empty(c, x.dtype)
    cm = np.empty(c, x.dtype)
    k1 = np.empty(c, x.dtype)
    k2 = np.empty(c, x.dtype)
    _grad_constants(parts, weight, mean_shifted, rstd, train, m, dw, db, d, cm, k1, k2)
    if not need_x:
        return
    unit = np.empty(0, x.dtype)
    for k in prange(nb):
        lo, hi = _block(k, m, nb)
        if streaming:
            for i in range(lo, hi):
                _stream_grad(x[i], dy[i], y[i], dx[i], dres[i], shift, d, cm, k1, k2, epilogue)
            stream.fence()
        else:
            _column_grad_affine(x, dy, y, dx, dres, lo, hi, shift, d, unit, cm, k1, k2, epilogue)


# ---------------------------------------------------------------------------------------------------
# Per-row statistics on (R, K) contiguous rows: GroupNorm, InstanceNorm and LayerNorm.
# Row r belongs to group g = r mod G; its K values are cg runs of hw values, run k scaled by parameter
# g·cg + k. GroupNorm: (G, C/G, H·W); InstanceNorm: (C, 1, H·W); LayerNorm: (1, K, 1), one parameter
# per value.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **_FLAGS)
def _forward_row(x, weight, bias, eps, train, groups, hw, stats, y, r, streaming):
    """Row ``r`` of :func:`row_forward`: its statistics, then its output."""
    kk = x.shape[1]
    cg = kk // hw
    cast = x.dtype.type
    shift, mean_shifted, var, rstd = stats[0], stats[1], stats[2], stats[3]
    xr = x[r]
    yr = y[r]
    s1, s2 = _sums(xr, np.float64(xr[0])) if train else (0.0, 0.0)
    d, rs = _statistic(r, xr[0], s1, s2, kk, eps, train, shift, mean_shifted, var, rstd)
    p0 = (r % groups) * cg
    sh_x, d_x, r_x = shift[r], cast(d), cast(rs)
    if hw == 1:
        wr = weight[p0:p0 + kk]
        br = bias[p0:p0 + kk]
        if streaming:
            _stream_layer(xr, yr, sh_x, d_x, r_x, wr, br)
        else:
            _layer_values(xr, yr, sh_x, d_x, r_x, wr, br, 0, kk)
    else:
        for k in range(cg):
            lo = k * hw
            a = cast(np.float64(weight[p0 + k]) * rs)
            if streaming:
                _stream_centred(xr[lo:lo + hw], yr[lo:lo + hw], sh_x, d_x, a, bias[p0 + k])
            else:
                _affine(xr[lo:lo + hw], yr[lo:lo + hw], sh_x, d_x, a, bias[p0 + k])


@njit(**_PARALLEL)
def row_forward(x, weight, bias, eps, train, groups, hw, stats, y, blocks, streaming):
    """Forward with one statistic per row of ``x`` ((R, K)), parallel over rows.

    Memory passes: each row is read once for its float64 sums and once more from cache (a row is at
    most a few hundred KiB for the usual shapes) to write ``y``: x and y cross main memory once.
    ``streaming`` writes ``y`` with streaming stores (see :mod:`normlab.kernels.stream`), parallel over
    ``blocks`` blocks of rows (one per thread), each ended by a fence.
    """
    rows = x.shape[0]
    if streaming:
        nb = max(1, min(blocks, rows))
        for k in prange(nb):
            lo, hi = _block(k, rows, nb)
            for r in range(lo, hi):
                _forward_row(x, weight, bias, eps, train, groups, hw, stats, y, r, True)
            stream.fence()
        return
    for r in prange(rows):
        _forward_row(x, weight, bias, eps, train, groups, hw, stats, y, r, False)


@njit(inline="always", **_FLAGS)
def _row_centre(shift, mean_shifted, rstd, r, train):
    """(μ, rstd) of row ``r`` in float64, μ = shift + mean_shifted (0 for fixed statistics)."""
    return np.float64(shift[r]) + (np.float64(mean_shifted[r]) if train else 0.0), np.float64(rstd[r])


@njit(inline="always", **_FLAGS)
def _row_terms(shift, mean_shifted, rstd, r, train):
    """(shift, mean_shifted, rstd) of row ``r`` in float64 (mean_shifted 0 for fixed statistics)."""
    return np.float64(shift[r]), np.float64(mean_shifted[r]) if train else 0.0, np.float64(rstd[r])


@njit(**_FLAGS)
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


@njit(**_SUM_FLAGS)
def _four_row_sums(x, dy, w, i, shift, mean_shifted, rstd, train, pb, pw, sums):
    """Rows i to i + 3 of (R, K) ``x`` and ``dy`` where every value has its own parameter ``w[j]`` (LayerNorm)
    in one read: dy and dy · x̂ added into the float64 accumulators of dβ and dγ (``pb``, ``pw``), and
    each row's Σ w · dy and Σ w · dy · (x − shift) written to ``sums[k]`` (k = 0..3), all in float64.

    Reading the four rows once for both kinds of sums, rather than once for the parameters' and again per
    row, made the LayerNorm backward kernel 1.1-1.24x faster on (4096, 1024), (12544, 768), (64, 4096) and
    (1001, 256) rows (2 threads, interleaved A/B). In float64 every
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


@njit(**_PARALLEL)
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
        pb, pw, lo, hi = _block_parts(parts, blk, rows)
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
                    sg, sgx = _weighted_grad_sums(xr, dyr, wr, sh)
            else:
                sg = 0.0
                sgx = 0.0
                for k in range(cg):
                    s = k * hw
                    s1, s2 = _grad_sums(xr[s:s + hw], dyr[s:s + hw], sh)
                    w = np.float64(weight[p0 + k])
                    pb[p0 + k] += s1
                    pw[p0 + k] += rs * (s2 - d * s1)
                    sg += w * s1
                    sgx += w * s2
            if not need_x:
                continue
            # Per row, g = γ · dy: its mean is sg / K, and Σ g · x̂ = rs · (sgx − d · sg).
            _, cm, _, k2 = _closed_form(1.0, rs, d, sg, sgx, kk, train)
            sh_x, d_x, c_x, r_x, k2_x = shift[r], cast(d), cast(cm), cast(rs), cast(k2)
            if hw == 1 and streaming:
                _stream_weighted_grad(xr, dyr, dxr, wr, sh_x, d_x, c_x, r_x, k2_x)
            elif hw == 1:
                _weighted_grad_values(xr, dyr, dxr, wr, sh_x, d_x, c_x, r_x, k2_x, 0, kk)
            else:
                for k in range(cg):
                    s = k * hw
                    xs, dys, dxs, wk = xr[s:s + hw], dyr[s:s + hw], dxr[s:s + hw], weight[p0 + k]
                    if streaming:
                        _stream_weighted_grad(xs, dys, dxs, wk, sh_x, d_x, c_x, r_x, k2_x)
                    else:
                        _weighted_grad_values(xs, dys, dxs, wk, sh_x, d_x, c_x, r_x, k2_x, 0, hw)
        if streaming:
            stream.fence()


# ---------------------------------------------------------------------------------------------------
# GroupNorm / InstanceNorm on channels_last data, (N, S, C) with C contiguous: per sample, G groups of
# cg = C/G adjacent channels.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **_FLAGS)
def _group_shifts(xs, shift, i, groups, from_data):
    """Per channel of sample ``i`` ((S, C) ``xs``), its group's shift: the group's first value
    (``from_data``) or the one in ``shift`` (indexed by sample · groups + group)."""
    c = xs.shape[1]
    cg = c // groups
    sh = np.empty(c, xs.dtype)
    for ch in range(c):
        sh[ch] = xs[0, (ch // cg) * cg] if from_data else shift[i * groups + ch // cg]
    return sh


@njit(**_PARALLEL)
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
            dg, rs = _statistic(i * groups + g, sh[g * cg], s1, s2, s * cg, eps, train, shift, mean_shifted, var,
                                rstd)
            for ch in range(g * cg, (g + 1) * cg):
                a[ch] = np.float64(weight[ch]) * rs
                b[ch] = np.float64(bias[ch]) - dg * np.float64(weight[ch]) * rs
        if train:  # normalize about the shifts the statistics were saved with (each group's rounded mean)
            sh = _group_shifts(xs, shift, i, groups, False)
        if streaming:
            ys = y[i]
            for j in range(s):
                _stream_affine(xs[j], ys[j], xs[j], sh, a, b, NONE)
            stream.fence()
        else:
            _column_affine(xs, y[i], xs, 0, s, sh, a, b, NONE)


@njit(**_PARALLEL)
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
        p1, p2, _, _ = _block_parts(parts, i, n)
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
                p2[ch] = rs * (p2[ch] - dg * p1[ch])
            # g = γ · dy within the group: its mean is sg / m and Σ g · x̂ = rs · (sgx − dg · sg).
            _, cg_mean, _, kb = _closed_form(1.0, rs, dg, sg, sgx, s * cg, train)
            for ch in range(g * cg, (g + 1) * cg):
                d[ch] = dg
                cm[ch] = cg_mean
                k1[ch] = rs
                k2[ch] = kb
        if need_x and streaming:
            dxs = dx[i]
            for j in range(s):
                _stream_weighted_grad(xs[j], dys[j], dxs[j], weight, sh, d, cm, k1, k2)
            stream.fence()
        elif need_x:
            _column_grad_affine(xs, dys, xs, dx[i], dx[i], 0, s, sh, d, weight, cm, k1, k2, NONE)
