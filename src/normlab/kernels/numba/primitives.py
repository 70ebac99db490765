"""Shared primitives of the numba kernels: compile flags, the per-value formulas, sums over one run,
and the per-statistic constants.

The rule: every per-value formula is written once, here, as an inlined scalar function that every loop
of every layout calls (:func:`normalized`, :func:`relu`, :func:`masked`, :func:`dx_value`); the streaming
stores spell the same formulas once in LLVM IR (:mod:`.stream`). Inlining (``inline="always"``) happens in
numba's IR, before LLVM sees the loop, so a loop compiles as if the formula were written in it.

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
  float64 remainder (see :func:`statistic`): μ itself is never used in the input dtype.
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
  update the running averages (``running_mean``, ``running_var``) once they have every channel's
  statistics, so a training step needs no further pass over them; guarded, they skip the update when a
  channel's are not finite.
* ``epilogue`` selects what follows the affine map: 0 nothing, 1 ReLU, 2 add ``residual`` then ReLU.
* Where a kernel does not use an array argument (the residual without ``epilogue`` 2, the mask ``y``
  without ReLU, ``mean_shifted`` with fixed statistics) the caller passes any array of the right shape.

Every kernel is compiled on its first call for the dtype it is called with and cached on disk
(``cache=True``: in ``__pycache__`` next to its file, or, where that folder is not writable, in numba's
per-user cache directory; ``NUMBA_CACHE_DIR`` overrides both).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

# The GIL stays held: numba's fallback threading layer (workqueue, where OpenMP and TBB are missing)
# aborts the process when two threads launch parallel kernels at once.
FLAGS = dict(cache=True, error_model="numpy", fastmath={"contract"})
PARALLEL = dict(parallel=True, **FLAGS)
# Only the sums may be reassociated (which lets LLVM vectorize them): the elementwise passes must keep
# their order, or ((x − shift) − mean_shifted) · a could become x · a − (shift + mean_shifted) · a and
# lose the shifted precision. Fast-math flags stay on the instructions they were compiled with, so the
# summing helpers are separate functions with their own flags rather than inlined into the kernels.
# (The column sums of the row-major layouts vectorize across columns and need no reassociation.)
# NaN and inf keep their IEEE behaviour everywhere.
SUM_FLAGS = dict(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})

NONE, RELU, ADD_RELU = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# The per-value formulas: each written once, inlined into every loop that computes it.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **FLAGS)
def normalized(t, sh, a, b):
    """The normalize map of one value: (t − sh) · a + b. With ``t = x − shift`` and ``sh = mean_shifted``
    it is the centred form ((x − shift) − mean_shifted) · a + b."""
    return (t - sh) * a + b


@njit(inline="always", **FLAGS)
def relu(v, zero):
    """``v`` below ``zero`` clipped to it; NaN kept, as torch.relu keeps it."""
    return zero if v < zero else v


@njit(inline="always", **FLAGS)
def masked(g, y, zero):
    """dy' of one value: the gradient ``g`` where a fused ReLU let its output ``y`` through, else ``zero``."""
    return g if y > 0.0 else zero


@njit(inline="always", **FLAGS)
def dx_value(g, x, sh, d, c, k1, k2):
    """The backward's map of one value: dx = (g − c) · k1 + ((x − sh) − d) · k2 (module docstring)."""
    return (g - c) * k1 + ((x - sh) - d) * k2


# ---------------------------------------------------------------------------------------------------
# Building blocks on one contiguous run of values.
# ---------------------------------------------------------------------------------------------------


@njit(inline="always", **FLAGS)
def shifted_moments(s1, s2, m):
    """(mean_shifted, var) in float64 from the shifted sums Σt and Σt² over ``m`` values."""
    d = s1 / m
    return d, max(s2 / m - d * d, 0.0)


@njit(inline="always", **FLAGS)
def inverse_std(v, eps):
    """rstd = 1 / √(var + eps) in float64."""
    return 1.0 / np.sqrt(v + eps)


@njit(inline="always", **FLAGS)
def save_mean(k, first, d, v, shift, mean_shifted, var):
    """Save statistic ``k`` of data shifted by ``first`` (mean_shifted ``d``, variance ``v``): the shift
    saved (and used to normalize, forward and backward) is not ``first`` but the mean μ = first + d
    rounded to the input dtype, and ``mean_shifted`` the float64 remainder μ − shift: a first value far
    from the rest (an outlier) then costs ``x − shift`` no digits, as it would if the data were
    normalized about it. Returns that remainder."""
    mu = np.float64(first) + d
    sh = shift.dtype.type(mu)
    if not np.isfinite(sh):  # μ beyond the input dtype's range, or NaN data: keep the first value
        sh = first
    shift[k] = sh
    d = mu - np.float64(sh)
    mean_shifted[k] = d
    var[k] = v
    return d


@njit(inline="always", **FLAGS)
def statistic(k, first, s1, s2, m, eps, train, shift, mean_shifted, var, rstd):
    """Statistic ``k``: in training from the sums ``s1``, ``s2`` shifted by ``first``, written to
    ``shift``, ``mean_shifted`` and ``var`` (:func:`save_mean`); otherwise from the fixed variance
    ``var[k]``. Writes ``rstd[k]`` and returns (mean_shifted, rstd) in float64."""
    if train:
        d, v = shifted_moments(s1, s2, m)
        r = inverse_std(v, eps)
        d = save_mean(k, first, d, v, shift, mean_shifted, var)
    else:
        d = 0.0
        r = inverse_std(np.float64(var[k]), eps)
    rstd[k] = r
    return d, r


@njit(inline="always", **FLAGS)
def grad_factors(gam, r, s1, dgamma, m, train):
    """The constants (c, k1, k2) of dx = (dy' − c) · k1 + ((x − shift) − d) · k2, in float64, from
    ``s1 = Σ dy'`` and ``dgamma = Σ dy' · x̂`` over the ``m`` values of one statistic (with fixed
    statistics c and k2 are 0)."""
    if not train:
        return 0.0, gam * r, 0.0
    return s1 / m, gam * r, -gam * r * r * dgamma / m


@njit(inline="always", **FLAGS)
def xhat_grad_sum(r, d, s1, s2):
    """Σ dy' · x̂ = r · (s2 − d · s1) from ``s1 = Σ dy'`` and ``s2 = Σ dy' · (x − shift)`` (d = mean_shifted)."""
    return r * (s2 - d * s1)


@njit(inline="always", **FLAGS)
def closed_form(gam, r, d, s1, s2, m, train):
    """dγ and the constants (c, k1, k2) of :func:`grad_factors`, in float64.

    ``s1 = Σ dy'`` and ``s2 = Σ dy' · (x − shift)`` over the ``m`` values of one statistic, so that
    Σ dy' · x̂ = r · (s2 − d · s1) is dγ. Where γ varies within a statistic (GroupNorm, LayerNorm) the
    caller passes ``gam = 1`` and sums of g = γ · dy in place of dy, and uses γ · dy in place of dy'.
    """
    dgamma = xhat_grad_sum(r, d, s1, s2)
    c, k1, k2 = grad_factors(gam, r, s1, dgamma, m, train)
    return dgamma, c, k1, k2


@njit(inline="always", **FLAGS)
def block_range(k, rows, blocks):
    """Rows [lo, hi) of block ``k`` when ``rows`` rows are cut into ``blocks`` near-equal blocks."""
    return k * rows // blocks, (k + 1) * rows // blocks


@njit(**SUM_FLAGS)
def run_sums(xr, sh):
    """Σ(x − sh) and Σ(x − sh)² over the run ``xr``, in float64."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        t = np.float64(xr[j]) - sh
        s1 += t
        s2 += t * t
    return s1, s2


@njit(**SUM_FLAGS)
def run_grad_sums(xr, dyr, sh):
    """Σ dy and Σ dy · (x − sh) over one run, in float64."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        g = np.float64(dyr[j])
        s1 += g
        s2 += g * (np.float64(xr[j]) - sh)
    return s1, s2


@njit(**SUM_FLAGS)
def run_weighted_grad_sums(xr, dyr, wr, sh):
    """Σ w · dy and Σ w · dy · (x − sh) over one run, in float64."""
    s1 = 0.0
    s2 = 0.0
    for j in range(xr.shape[0]):
        g = np.float64(wr[j]) * np.float64(dyr[j])
        s1 += g
        s2 += g * (np.float64(xr[j]) - sh)
    return s1, s2


def at(v, j):
    """``v[j]`` for an array, ``v`` itself for a scalar: one loop body for per-run and per-value factors."""
    raise NotImplementedError("numba only")


@overload(at, inline="always")
def _at_overload(v, j):
    if isinstance(v, types.Array):
        return lambda v, j: v[j]
    return lambda v, j: v


@njit(inline="always", **FLAGS)
def moved(a, q, n, r0, sh):
    """Float64 sums a = Σ(x − r0) and q = Σ(x − r0)² over ``n`` values, moved to the shift ``sh``:
    Σ(x − sh) = a + n·δ and Σ(x − sh)² = q + δ·(2a + n·δ), with δ = r0 − sh."""
    delta = np.float64(r0) - np.float64(sh)
    return a + n * delta, q + delta * (2.0 * a + n * delta)


@njit(inline="always", **FLAGS)
def moved_grad(a, q, r0, sh):
    """Float64 sums a = Σ dy' and q = Σ dy' · (x − r0), moved to the shift ``sh``:
    Σ dy' · (x − sh) = q + δ·a, with δ = r0 − sh."""
    return q + (np.float64(r0) - np.float64(sh)) * a


@njit(inline="always", **FLAGS)
def combine_parts(parts, ch):
    """Σ over blocks of the two partial sums of column ``ch`` of ``parts`` ((B, 2, C) float64)."""
    s1 = 0.0
    s2 = 0.0
    for k in range(parts.shape[0]):
        s1 += parts[k, 0, ch]
        s2 += parts[k, 1, ch]
    return s1, s2


@njit(inline="always", **FLAGS)
def block_parts(parts, k, rows):
    """Block ``k`` of ``rows`` rows cut into ``parts.shape[0]`` near-equal blocks: its two zeroed float64
    accumulators ``parts[k, 0]`` and ``parts[k, 1]``, and its rows [lo, hi)."""
    p1 = parts[k, 0]
    p2 = parts[k, 1]
    p1[:] = 0.0
    p2[:] = 0.0
    lo, hi = block_range(k, rows, parts.shape[0])
    return p1, p2, lo, hi

