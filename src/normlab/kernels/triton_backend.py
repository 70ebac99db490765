"""The ``triton`` backend: the engine's forward and closed-form backward on CUDA tensors, run by Triton
kernels.

Results follow the engine's conventions (:func:`normlab.core.engine.forward_torch`): ``y`` and ``dx`` in
the input's dtype, shape and memory format; statistics in ``plan.stat_shape`` and in the accumulation
dtype (float32 for float32/float16/bfloat16, float64 for float64); ``(shift, mean_shifted)`` with
μ = shift + mean_shifted, ``shift`` being μ rounded to the accumulation dtype in training (the fixed mean
otherwise) and ``mean_shifted`` the remainder; dγ and dβ flat, in the
accumulation dtype. float16 and bfloat16 are loaded as they are and computed in float32 inside the
kernels; nothing is converted in memory.

Triton is imported on the first call, not before. On CPU tensors the kernels run under Triton's
interpreter (the tests do this), which needs ``TRITON_INTERPRET=1`` set before triton is imported and
before the kernels' first use: the kernels are built once per process, for the GPU or for the
interpreter, whichever that first use asked for.

Numerics
--------
* Statistics are taken on ``x − origin``, never on ``x``: the difference is exact for data within a
  factor of two of the origin, so 1e4 + N(0, 1e-2) in float32 keeps its variance. The origin is the
  median of the statistic's first, middle and last values, so that one outlier among them (a first
  sample far out in the tail) is not what the rest are measured from. Where a statistic's
  values are streamed through several tiles, every lane of a tile keeps a Welford running
  (count, mean, M2) of the shifted values it sees, and lanes, then programs, are merged (in float64)
  with the exact pairwise rule M2 = Σ M2_j + Σ n_j (mean_j − mean)²: no Σx² − (Σx)² cancellation
  anywhere. Where a whole row fits in registers it is centred in one read: the mean of x − first value,
  then, about that mean rounded, the mean and Σ(t − mean)².
* The shift saved, and normalized about, forward and backward, is the mean rounded to the accumulation
  dtype, with the exact remainder as ``mean_shifted`` (:func:`_recentre`): x − shift then loses nothing
  to an outlier either. 1e-2 · N(0, 1) with a first sample of 1e5 (BatchNorm on (8192, 4) rows, on
  (512, 4, 4, 4) in both layouts; LayerNorm(512) with every row's first value 1e5): off the float64
  answer by 3e-9 to 4e-8 away from the outlier, where about the first value with float32 merges it was
  2e-6 to 2.7e-5 (ATen: 4e-7 on the rows); measured under Triton's interpreter.
* Normalizing computes ``y = (x − shift) · a + b`` with ``a = γ · rstd`` and ``b = β − mean_shifted · a``,
  in the accumulation dtype, then the fused epilogue (ReLU, or add a residual then ReLU) and one
  rounding to the output dtype.
* The backward is the engine's closed form with the per-statistic constants hoisted:
  ``dx = (γ' · dy' − c) · k1 + ((x − shift) − mean_shifted) · k2``, where ``dy'`` is ``dy`` masked by
  ``y > 0`` after a fused ReLU. BatchNorm (γ constant over a statistic): γ' = 1, k1 = γ · rstd,
  c = Σdy'/m, k2 = −γ · rstd² · dγ / m. Per-row plans: γ' = γ of the value, k1 = rstd, c = Σg/m,
  k2 = −rstd³ · Σ g·(x − μ) / m with g = γ' · dy. With fixed statistics c = k2 = 0 and ``x`` is not read.
  The sums multiply ``dy'`` by the centred ``(x − shift) − mean_shifted``, so they do not cancel either.

Kernels and their passes over memory
------------------------------------
Which kernels run is chosen per call from the plan's :func:`~normlab.kernels.layout.classify` shape:

* **BatchNorm, (N, C, S) contiguous** (S > 1). One *unit* per channel: its N·S values are an (N, S)
  block with rows C·S apart. Forward: ``_moments_planar`` (grid: channel × split; each program streams
  its share of the channel's tiles, grid-stride, into Welford partials), ``_finish_moments`` (merges the
  split partials per channel; with fixed statistics it reads the running statistics instead), then
  ``_apply_planar`` (grid: channel × split; normalize and epilogue). x is read twice, y written once.
  Backward: ``_planar_sums`` (Σdy' and Σdy'·x̂ per channel, split like the moments), ``_finish_sums``
  (dβ, dγ and the dx constants), ``_dx_planar`` (reads x, dy and the ReLU mask, writes dx and the
  residual's gradient). With fixed statistics and no dγ/dβ wanted the sums are skipped and x is not read.
* **BatchNorm, (M, C) rows with C contiguous** (2D input, channels_last, 1×1 maps). Tiles of
  BM rows × BC channels: ``_moments_cols`` (grid: channel block × split of the rows), ``_finish_moments``,
  ``_apply_cols`` (grid: row block × channel block); backward ``_cols_sums``, ``_finish_sums``,
  ``_dx_cols``. Same passes as above, every load coalesced along C.
* **Per-row plans (LayerNorm, GroupNorm, InstanceNorm)**: R contiguous rows of K values; a row is a
  (per_row, run) block whose row j is scaled by parameter ``(r mod groups) · per_row + j``.
  channels_last input is made contiguous first (one copy each way).
  - A row that fits in :data:`ROW_TILE` values (half that in float64) is handled whole in registers:
    ``_row_forward_tile`` (one program per row; x read once, y written once) and
    ``_row_backward_tile`` (programs grid-stride over rows of one group, so each keeps its dγ/dβ
    partial sums in registers; x and dy read once, dx written once), then ``_finish_sums`` adds the
    programs' partials.
  - Longer rows are split like BatchNorm channels: ``_moments_planar``, ``_finish_moments``,
    ``_apply_planar``; backward ``_planar_sums`` (Σγ·dy and Σγ·dy·(x − μ) per row), ``_finish_sums``
    (the per-row dx constants), ``_dx_planar``; dγ/dβ by ``_planar_sums`` over each parameter's
    values across rows (or ``_cols_sums`` when every value has its own parameter, as in LayerNorm),
    then ``_finish_sums``.

Split reductions: a statistic with many values is cut into ``split`` programs so that about
:data:`PROGRAMS_PER_SM` programs per multiprocessor run; their partials (a few per statistic) are merged by
a second, small kernel. No kernel loops over channels in Python; every launch covers all of them.

The tile sizes (:data:`BLOCK`, :data:`COLUMNS`, :data:`ROW_TILE`) are module attributes read at every
call. They have not been tuned on a GPU. Every kernel takes one warp per 256 values of its tile (1 to 16):
:mod:`normlab.kernels.triton_compile` compiles every specialization the benchmark's shapes reach for a
GPU architecture without a GPU and reports registers and spills from ptxas (none under pressure on
sm_90).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import struct
import sys
import threading

import torch

from normlab.core.plan import Plan
from normlab.kernels.layout import ChannelShape, RowShape, classify

__all__ = ["TritonBackend", "built_for", "installed", "BLOCK", "COLUMNS", "ROW_TILE", "MAX_SPLIT",
           "PROGRAMS_PER_SM", "INTERPRETER_PROGRAMS"]

BLOCK = 2048
"""Values per tile in the streaming kernels (a power of two)."""
COLUMNS = 64
"""Channels per tile in the (M, C) BatchNorm kernels (a power of two)."""
ROW_TILE = 8192
"""Longest row (padded to powers of two per axis) that the per-row kernels keep whole in registers (half
that for float64)."""
MAX_SPLIT = 256
"""Most programs one statistic is split across."""
PROGRAMS_PER_SM = 4
"""Programs per multiprocessor that the split reductions aim for."""
INTERPRETER_PROGRAMS = 4
"""The number of programs the split reductions aim for under Triton's interpreter (on CPU tensors)."""
_OPTIONS = dict(enable_fp_fusion=True)
"""Compiler options of every launch. Multiply-adds are contracted into FMAs, as in the CPU kernels
(``fastmath={"contract"}``); set here rather than left to Triton's default, which Triton 3.10 turns off
(3.9 warns that it will)."""

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

# triton.language, bound when the kernels are built (see _kernels); the kernels below are plain Python
# functions until then, so that this module imports without triton.
tl = None
_JIT: list[str] = []
_built = {"interpret": None}
_build_lock = threading.Lock()


def _jit(fn):
    """Mark ``fn`` as a Triton function (jitted, under its own name, when the kernels are built)."""
    _JIT.append(fn.__name__)
    return fn


@functools.cache
def installed() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_problem() -> str | None:
    """Why CPU tensors cannot run under Triton's interpreter in this process, or ``None``.

    Triton builds its own library functions (``tl.sum``, ``tl.cdiv``, ...) when it is imported, for the
    interpreter only if ``TRITON_INTERPRET=1`` is set then; this module builds its kernels on first use.
    """
    if not _interpret_requested():
        return "CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1"
    if _built["interpret"] is False:
        return "this process built the triton kernels for the GPU before TRITON_INTERPRET=1 was set"
    if _library_interpreted() is False:
        return "triton was imported before TRITON_INTERPRET=1 was set, so its library runs on the GPU only"
    return None


def _library_interpreted() -> bool | None:
    """Whether triton's own library functions (``tl.cdiv``, ...) were built for the interpreter when it was
    imported; ``None`` before it is imported."""
    triton = sys.modules.get("triton")
    if triton is None:
        return None
    return type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"


def _gpu_problem() -> str | None:
    """Why CUDA tensors cannot run compiled kernels in this process, or ``None``: where the kernels were (or
    would now be) built for Triton's interpreter, which would copy every tensor to the host and back at
    every launch."""
    if _built["interpret"] or (_built["interpret"] is None and _interpret_requested()):
        return ("TRITON_INTERPRET=1: this process builds the triton kernels for Triton's interpreter, which "
                "would run CUDA tensors on the host; unset TRITON_INTERPRET to run them on the GPU")
    if _library_interpreted():
        return ("triton was imported with TRITON_INTERPRET=1, so its library runs under the interpreter only; "
                "start a process without it to run CUDA tensors on the GPU")
    return None


def built_for() -> str | None:
    """What this process's kernels were built for: ``"interpreter"``, ``"gpu"``, or ``None`` before their
    first use."""
    mode = _built["interpret"]
    return None if mode is None else "interpreter" if mode else "gpu"


def _kernels():
    """Import triton and jit every kernel of this module, once per process."""
    with _build_lock:
        if _built["interpret"] is None:
            import triton
            import triton.language

            namespace = globals()
            namespace["tl"] = triton.language
            for name in _JIT:
                namespace[name] = triton.jit(namespace[name])
            _built["interpret"] = _interpret_requested()
    return globals()


# ---------------------------------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------------------------------


@_jit
def _div(num, den, ACC: tl.constexpr):
    """num / den correctly rounded (IEEE division, as on the CPU), in ``num``'s dtype; ``den`` may be an
    integer. Compiled float32 ``/`` is an approximation within 2 ulp (PTX ``div.full.f32``); this is
    for the once-per-statistic quotients (means, variances, rstd, the backward's constants), not for
    per-value arithmetic. ``num`` is of dtype ``ACC``; float64 ``/`` is IEEE division already (and
    ``div_rn`` takes float32 only)."""
    if ACC == tl.float64:
        q = num / den
    else:
        q = tl.div_rn(num, num * 0.0 + den)
    return q


@_jit
def _rsqrt(v, ACC: tl.constexpr):
    """1 / sqrt(v), the square root and the division each correctly rounded, in float32 and float64."""
    if ACC == tl.float64:
        s = tl.sqrt(v)
    else:
        s = tl.sqrt_rn(v)
    return _div(s * 0.0 + 1.0, s, ACC)


@_jit
def _welford_add(v, valid, cnt, mean, m2):
    """Add one value per lane into the lanes' running (count, mean, M2); lanes not ``valid`` keep theirs."""
    cnt = cnt + valid.to(cnt.dtype)
    delta = v - mean
    # per value: the GPU's approximate float32 division (within 2 ulp) moves the mean by less than the
    # rounding of the sum it tracks, and the IEEE one would cost more than the loop's other work
    mean = mean + tl.where(valid, delta / tl.maximum(cnt, 1.0), 0.0)
    m2 = m2 + tl.where(valid, delta * (v - mean), 0.0)
    return cnt, mean, m2


@_jit
def _merge_moments(cnt, mean, m2, AXIS: tl.constexpr):
    """Merge (count, mean, M2) partials along ``AXIS``: n = Σn_j, mean = Σ n_j·mean_j / n,
    M2 = Σ M2_j + Σ n_j·(mean_j − mean)², summed in float64 and returned in the partials' dtype.

    float64 because the partial means can differ by orders of magnitude (a few lanes holding outliers):
    a float32 sum then loses the many small terms once it holds the large ones, by how much depending
    on the order of the reduction (summed in order, 496 lanes of −0.04 after 16 of 1e5 moved a mean by
    7e-6 of itself). Products of float32 values are exact in float64."""
    c = cnt.to(tl.float64)
    mn = mean.to(tl.float64)
    n = tl.sum(c, AXIS)
    mu = tl.sum(c * mn, AXIS) / tl.maximum(n, 1.0)
    dev = mn - tl.expand_dims(mu, AXIS)
    m2 = tl.sum(m2.to(tl.float64), AXIS) + tl.sum(c * dev * dev, AXIS)
    return n.to(mean.dtype), mu.to(mean.dtype), m2.to(mean.dtype)


@_jit
def _median3(a, b, c):
    """The median of three values (elementwise)."""
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))


@_jit
def _recentre(first, d):
    """The shift to save and normalize about, and the remainder: μ = first + d rounded to the accumulation
    dtype, and (first + d) − μ exactly (Knuth's two-sum, additions only), so that μ + remainder is
    first + d to twice that precision. Where μ is not finite (data beyond the dtype's range, or NaN),
    ``first`` and ``d`` themselves."""
    mu = first + d
    b = mu - first
    rem = (first - (mu - b)) + (d - b)
    ok = tl.abs(mu) < float("inf")
    return tl.where(ok, mu, first), tl.where(ok, rem, d)


@_jit
def _param(ptr, idx, mask, default, HAS: tl.constexpr, ACC: tl.constexpr):
    """γ or β at ``idx`` in the accumulation dtype, or ``default`` where the layer has none."""
    if HAS:
        v = tl.load(ptr + idx, mask=mask, other=default).to(ACC)
    else:
        v = tl.full(idx.shape, default, ACC)
    return v


@_jit
def _epilogue(v, res, offs, valid, EPI: tl.constexpr, ACC: tl.constexpr):
    """EPI 0: nothing; 1: ReLU; 2: add the residual, then ReLU (NaN stays NaN)."""
    if EPI == 2:
        v = v + tl.load(res + offs, mask=valid, other=0.0).to(ACC)
    if EPI >= 1:
        v = tl.where(v < 0.0, 0.0, v)
    return v


@_jit
def _masked_grad(dy, y, dres, offs, valid, MASK: tl.constexpr, DRES: tl.constexpr, ACC: tl.constexpr):
    """dy', the incoming gradient masked by y > 0 after a fused ReLU; stored as the residual's gradient
    when DRES."""
    g = tl.load(dy + offs, mask=valid, other=0.0).to(ACC)
    if MASK:
        g = tl.where(tl.load(y + offs, mask=valid, other=0.0) > 0.0, g, 0.0)
    if DRES:
        tl.store(dres + offs, g.to(dres.dtype.element_ty), mask=valid)
    return g


@_jit
def _tile(t, tiles_q, P, Q, s_p, BP: tl.constexpr, BQ: tl.constexpr):
    """Offsets (relative to a unit's first value) and validity of tile ``t`` of a (P, Q) block whose
    rows are ``s_p`` apart and whose columns are contiguous; also the tile's row indices."""
    p = (t // tiles_q) * BP + tl.arange(0, BP)
    q = (t % tiles_q) * BQ + tl.arange(0, BQ)
    valid = (p < P)[:, None] & (q < Q)[None, :]
    offs = (p.to(tl.int64) * s_p)[:, None] + q[None, :]
    return p, offs, valid


# ---------------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------------


@_jit
def _moments_planar(x, part, origin, units, P, Q, s_unit, s_p, split, mid, last,
                    BP: tl.constexpr, BQ: tl.constexpr, ACC: tl.constexpr):
    """Welford partials of unit ``u``'s values (a (P, Q) block at ``u · s_unit``), shifted by the median
    of its first, middle and last values (offsets 0, ``mid`` and ``last``; written to ``origin[u]``);
    program (u, k) takes tiles k, k + split, ... and writes (count, mean, M2) to ``part[:, u, k]``
    ((3, units, split))."""
    u = tl.program_id(0)
    k = tl.program_id(1)
    base = x + u.to(tl.int64) * s_unit
    shift = _median3(tl.load(base).to(ACC), tl.load(base + mid).to(ACC), tl.load(base + last).to(ACC))
    if k == 0:
        tl.store(origin + u, shift)
    tiles_q = tl.cdiv(Q, BQ)
    cnt = tl.zeros([BP, BQ], ACC)
    mean = tl.zeros([BP, BQ], ACC)
    m2 = tl.zeros([BP, BQ], ACC)
    for t in range(k, tl.cdiv(P, BP) * tiles_q, split):
        p, offs, valid = _tile(t, tiles_q, P, Q, s_p, BP, BQ)
        v = tl.load(base + offs, mask=valid, other=0.0).to(ACC) - shift
        cnt, mean, m2 = _welford_add(v, valid, cnt, mean, m2)
    n, mu, m2 = _merge_moments(cnt, mean, m2, 1)
    n, mu, m2 = _merge_moments(n, mu, m2, 0)
    out = u * split + k
    total = units * split
    tl.store(part + out, n)
    tl.store(part + total + out, mu)
    tl.store(part + 2 * total + out, m2)


@_jit
def _moments_cols(x, part, origin, M, C, split, mid, last, BM: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Welford partials per column of (M, C) ``x``, shifted by the median of the column's first, middle
    and last values (rows 0, ``mid`` and ``last``, offsets ``mid`` · C and ``last`` · C given; written to
    ``origin[c]``); program (j, k) takes columns [j·BC, (j+1)·BC) and row tiles k, k + split, ...;
    writes ``part[:, c, k]``."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    k = tl.program_id(1)
    live = c < C
    shift = _median3(tl.load(x + c, mask=live, other=0.0).to(ACC), tl.load(x + mid + c, mask=live, other=0.0).to(ACC),
                     tl.load(x + last + c, mask=live, other=0.0).to(ACC))
    if k == 0:
        tl.store(origin + c, shift, mask=live)
    cnt = tl.zeros([BM, BC], ACC)
    mean = tl.zeros([BM, BC], ACC)
    m2 = tl.zeros([BM, BC], ACC)
    for t in range(k, tl.cdiv(M, BM), split):
        m = t * BM + tl.arange(0, BM)
        valid = (m < M)[:, None] & live[None, :]
        v = tl.load(x + (m.to(tl.int64) * C)[:, None] + c[None, :], mask=valid, other=0.0).to(ACC)
        cnt, mean, m2 = _welford_add(v - shift[None, :], valid, cnt, mean, m2)
    n, mu, m2 = _merge_moments(cnt, mean, m2, 0)
    out = c * split + k
    total = C * split
    tl.store(part + out, n, mask=live)
    tl.store(part + total + out, mu, mask=live)
    tl.store(part + 2 * total + out, m2, mask=live)


@_jit
def _finish_moments(part, fixed_mean, fixed_var, stats, units, split, period, eps_hi, eps_lo,
                    TRAIN: tl.constexpr, BU: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr):
    """Statistics ``stats`` ((4, units): shift, mean_shifted, var, rstd) of units [pid·BU, (pid+1)·BU):
    in training from the merged Welford partials of the values shifted by the origin the moments kernel
    wrote to ``stats[0]``, the shift saved being their mean, rounded (:func:`_recentre`); otherwise from
    the fixed statistics of entry ``u mod period``."""
    i = tl.program_id(0) * BU + tl.arange(0, BU)
    live = i < units
    if TRAIN:
        j = tl.arange(0, BS)
        valid = live[:, None] & (j < split)[None, :]
        idx = i[:, None] * split + j[None, :]
        total = units * split
        n = tl.load(part + idx, mask=valid, other=0.0)
        mu = tl.load(part + total + idx, mask=valid, other=0.0)
        m2 = tl.load(part + 2 * total + idx, mask=valid, other=0.0)
        n, d, m2 = _merge_moments(n, mu, m2, 1)
        var = _div(m2, tl.maximum(n, 1.0), ACC)
        shift, d = _recentre(tl.load(stats + i, mask=live, other=0.0), d)
    else:
        shift = tl.load(fixed_mean + i % period, mask=live, other=0.0).to(ACC)
        d = tl.zeros([BU], ACC)
        var = tl.load(fixed_var + i % period, mask=live, other=1.0).to(ACC)
    tl.store(stats + i, shift, mask=live)
    tl.store(stats + units + i, d, mask=live)
    tl.store(stats + 2 * units + i, var, mask=live)
    tl.store(stats + 3 * units + i, _rsqrt(var + eps_hi + eps_lo, ACC), mask=live)


# ---------------------------------------------------------------------------------------------------
# Normalizing.
# ---------------------------------------------------------------------------------------------------


@_jit
def _apply_planar(x, res, y, shift, mshift, rstd, w, b, P, Q, s_unit, s_p, groups, per_row, split,
                  PARAM_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, EPI: tl.constexpr,
                  BP: tl.constexpr, BQ: tl.constexpr, ACC: tl.constexpr):
    """y = (x − shift)·a + b over unit ``u``'s (P, Q) block, then the epilogue; program (u, k) takes
    tiles k, k + split, .... The parameter of block row p is ``(u mod groups)·per_row + p`` (PARAM_P,
    the per-row plans) or ``u mod groups`` for the whole unit (BatchNorm)."""
    u = tl.program_id(0)
    k = tl.program_id(1)
    base = u.to(tl.int64) * s_unit
    sh = tl.load(shift + u)
    d = tl.load(mshift + u)
    r = tl.load(rstd + u)
    if not PARAM_P:
        pu = u % groups
        a0 = r
        if HAS_W:
            a0 = r * tl.load(w + pu).to(ACC)
        b0 = -d * a0
        if HAS_B:
            b0 = tl.load(b + pu).to(ACC) - d * a0
    tiles_q = tl.cdiv(Q, BQ)
    for t in range(k, tl.cdiv(P, BP) * tiles_q, split):
        p, offs, valid = _tile(t, tiles_q, P, Q, s_p, BP, BQ)
        xs = tl.load(x + base + offs, mask=valid, other=0.0).to(ACC) - sh
        if PARAM_P:
            prm = (u % groups) * per_row + p
            a = r * _param(w, prm, p < P, 1.0, HAS_W, ACC)
            bb = _param(b, prm, p < P, 0.0, HAS_B, ACC) - d * a
            v = xs * a[:, None] + bb[:, None]
        else:
            v = xs * a0 + b0
        v = _epilogue(v, res + base, offs, valid, EPI, ACC)
        tl.store(y + base + offs, v.to(y.dtype.element_ty), mask=valid)


@_jit
def _cols_tile(C, BM: tl.constexpr, BC: tl.constexpr):
    """The rows and columns of this program's BM × BC tile of (M, C) data: one program per tile on a 1-D
    grid, the column blocks of a row block adjacent (CUDA caps a grid's second axis at 65535, which a 2-D
    grid of column blocks would pass at 4M channels)."""
    pid = tl.program_id(0)
    blocks_c = tl.cdiv(C, BC)
    return (pid // blocks_c) * BM + tl.arange(0, BM), (pid % blocks_c) * BC + tl.arange(0, BC)


@_jit
def _apply_cols(x, res, y, shift, mshift, rstd, w, b, M, C,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, EPI: tl.constexpr,
                BM: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """y = (x − shift)·a + b on a BM × BC tile of (M, C) ``x``, every factor per column, then the
    epilogue. Tiles as :func:`_cols_tile` numbers them."""
    m, c = _cols_tile(C, BM, BC)
    live = c < C
    sh = tl.load(shift + c, mask=live, other=0.0)
    d = tl.load(mshift + c, mask=live, other=0.0)
    a = tl.load(rstd + c, mask=live, other=0.0) * _param(w, c, live, 1.0, HAS_W, ACC)
    bb = _param(b, c, live, 0.0, HAS_B, ACC) - d * a
    valid = (m < M)[:, None] & live[None, :]
    offs = (m.to(tl.int64) * C)[:, None] + c[None, :]
    v = (tl.load(x + offs, mask=valid, other=0.0).to(ACC) - sh[None, :]) * a[None, :] + bb[None, :]
    v = _epilogue(v, res, offs, valid, EPI, ACC)
    tl.store(y + offs, v.to(y.dtype.element_ty), mask=valid)


@_jit
def _row_forward_tile(x, y, stats, w, b, fixed_mean, fixed_var, R, K, per_row, run, groups, period, eps_hi, eps_lo,
                      TRAIN: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      BP: tl.constexpr, BQ: tl.constexpr, ACC: tl.constexpr):
    """Row ``r`` of (R, K) ``x`` whole, as a (per_row, run) tile: its statistics and y, from one read.
    Centred twice in registers: the mean of x − first value, rounded, becomes the shift (so that an
    outlier as the first value costs x − shift no digits), then the mean of x − shift, then
    Σ(x − shift − mean)²."""
    r = tl.program_id(0)
    p = tl.arange(0, BP)
    q = tl.arange(0, BQ)
    valid = (p < per_row)[:, None] & (q < run)[None, :]
    offs = r.to(tl.int64) * K + (p * run)[:, None] + q[None, :]
    xv = tl.load(x + offs, mask=valid, other=0.0).to(ACC)
    if TRAIN:
        first = tl.load(x + r.to(tl.int64) * K).to(ACC)
        d0 = _div(tl.sum(tl.sum(tl.where(valid, xv - first, 0.0), 1), 0), K, ACC)
        sh, _ = _recentre(first, d0)
        t = tl.where(valid, xv - sh, 0.0)
        d = _div(tl.sum(tl.sum(t, 1), 0), K, ACC)
        dev = tl.where(valid, t - d, 0.0)
        var = _div(tl.sum(tl.sum(dev * dev, 1), 0), K, ACC)
    else:
        sh = tl.load(fixed_mean + r % period).to(ACC)
        d = sh * 0.0
        dev = xv - sh
        var = tl.load(fixed_var + r % period).to(ACC)
    rs = _rsqrt(var + eps_hi + eps_lo, ACC)
    prm = (r % groups) * per_row + p
    a = _param(w, prm, p < per_row, 1.0, HAS_W, ACC) * rs
    bb = _param(b, prm, p < per_row, 0.0, HAS_B, ACC)
    tl.store(y + offs, (dev * a[:, None] + bb[:, None]).to(y.dtype.element_ty), mask=valid)
    tl.store(stats + r, sh)
    tl.store(stats + R + r, d)
    tl.store(stats + 2 * R + r, var)
    tl.store(stats + 3 * R + r, rs)


# ---------------------------------------------------------------------------------------------------
# Backward: sums, their constants, dx.
# ---------------------------------------------------------------------------------------------------


@_jit
def _planar_sums(x, dy, y, w, shift, mshift, rstd, part, units, P, Q, s_outer, s_inner, unit_groups, s_p,
                 groups, per_row, split,
                 STAT_P: tl.constexpr, WEIGHT: tl.constexpr, SCALE: tl.constexpr, TRAIN: tl.constexpr,
                 MASK: tl.constexpr, HAS_W: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
                 ACC: tl.constexpr):
    """Partial sums S1 = Σ ω·dy' and S2 = Σ ω·dy'·((x − shift) − mean_shifted)·σ over unit ``u``'s (P, Q)
    block (at ``(u // unit_groups)·s_outer + (u mod unit_groups)·s_inner``), program (u, k) taking tiles
    k, k + split, ...; written to ``part[:, u, k]`` ((2, units, split)).

    ω is γ of the value's parameter ``(u mod groups)·per_row + p`` with WEIGHT (a row's Σγ·dy and
    Σγ·dy·(x − μ) for its dx), else 1; σ is the value's rstd with SCALE (dβ and dγ), else 1. The value's
    statistic is the unit's own, or, with STAT_P, ``p·groups + u // unit_groups`` (a parameter's values
    across the rows of a per-row plan).
    """
    u = tl.program_id(0)
    k = tl.program_id(1)
    base = (u // unit_groups).to(tl.int64) * s_outer + (u % unit_groups).to(tl.int64) * s_inner
    if not STAT_P:
        sh = tl.load(shift + u)
        d = sh * 0.0
        if TRAIN:
            d = tl.load(mshift + u)
        r = tl.load(rstd + u)
    acc1 = tl.zeros([BP, BQ], ACC)
    acc2 = tl.zeros([BP, BQ], ACC)
    tiles_q = tl.cdiv(Q, BQ)
    for t in range(k, tl.cdiv(P, BP) * tiles_q, split):
        p, offs, valid = _tile(t, tiles_q, P, Q, s_p, BP, BQ)
        g = _masked_grad(dy + base, y + base, dy, offs, valid, MASK, False, ACC)
        xs = tl.load(x + base + offs, mask=valid, other=0.0).to(ACC)
        if STAT_P:
            st = p * groups + u // unit_groups
            live = p < P
            sh_p = tl.load(shift + st, mask=live, other=0.0)
            xc = xs - sh_p[:, None]
            if TRAIN:
                xc = xc - tl.load(mshift + st, mask=live, other=0.0)[:, None]
            if SCALE:
                xc = xc * tl.load(rstd + st, mask=live, other=0.0)[:, None]
        else:
            xc = (xs - sh) - d
            if SCALE:
                xc = xc * r
        if WEIGHT:
            g = g * _param(w, (u % groups) * per_row + p, p < P, 1.0, HAS_W, ACC)[:, None]
        acc1 += g
        acc2 += tl.where(valid, g * xc, 0.0)
    out = u * split + k
    tl.store(part + out, tl.sum(tl.sum(acc1, 1), 0))
    tl.store(part + units * split + out, tl.sum(tl.sum(acc2, 1), 0))


@_jit
def _cols_sums(x, dy, y, shift, mshift, rstd, part, M, C, split, groups, per_row,
               STAT_ROW: tl.constexpr, TRAIN: tl.constexpr, MASK: tl.constexpr,
               BM: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Partial sums per column of (M, C) data: S1 = Σ dy' and S2 = Σ dy'·x̂, program (j, k) taking
    columns [j·BC, (j+1)·BC) and row tiles k, k + split, ...; written to ``part[:, c, k]``. The value's
    statistic is its column's (BatchNorm) or, with STAT_ROW, ``m·groups + c // per_row`` (per-row plans
    whose every value has its own parameter)."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    k = tl.program_id(1)
    live = c < C
    if not STAT_ROW:
        sh = tl.load(shift + c, mask=live, other=0.0)[None, :]
        d = sh * 0.0
        if TRAIN:
            d = tl.load(mshift + c, mask=live, other=0.0)[None, :]
        r = tl.load(rstd + c, mask=live, other=0.0)[None, :]
    acc1 = tl.zeros([BM, BC], ACC)
    acc2 = tl.zeros([BM, BC], ACC)
    for t in range(k, tl.cdiv(M, BM), split):
        m = t * BM + tl.arange(0, BM)
        valid = (m < M)[:, None] & live[None, :]
        offs = (m.to(tl.int64) * C)[:, None] + c[None, :]
        if STAT_ROW:
            st = m[:, None] * groups + (c // per_row)[None, :]
            sh = tl.load(shift + st, mask=valid, other=0.0)
            d = sh * 0.0
            if TRAIN:
                d = tl.load(mshift + st, mask=valid, other=0.0)
            r = tl.load(rstd + st, mask=valid, other=0.0)
        g = _masked_grad(dy, y, dy, offs, valid, MASK, False, ACC)
        xc = ((tl.load(x + offs, mask=valid, other=0.0).to(ACC) - sh) - d) * r
        acc1 += g
        acc2 += tl.where(valid, g * xc, 0.0)
    out = c * split + k
    tl.store(part + out, tl.sum(acc1, 0), mask=live)
    tl.store(part + C * split + out, tl.sum(acc2, 0), mask=live)


@_jit
def _finish_sums(part, half, s_unit, s_part, width, units, w, rstd, out1, out2, consts, count,
                 MODE: tl.constexpr, TRAIN: tl.constexpr, HAS_W: tl.constexpr,
                 BU: tl.constexpr, BW: tl.constexpr, ACC: tl.constexpr):
    """Add up ``width`` partials per unit: S1 at ``part[u·s_unit + j·s_part]``, S2 ``half`` further on.

    MODE 0 writes ``out1`` = S1 and ``out2`` = S2 (dβ, dγ). MODE 1 (BatchNorm) also writes the dx
    constants ``consts`` ((3, units): c, k1, k2) from γ, rstd and the sums; MODE 2 (per-row plans) writes
    only the constants, from S1 = Σγ·dy and S2 = Σγ·dy·(x − μ). ``count`` is the number of values per
    statistic.
    """
    i = tl.program_id(0) * BU + tl.arange(0, BU)
    live = i < units
    s1 = tl.zeros([BU], ACC)
    s2 = tl.zeros([BU], ACC)
    for j0 in range(0, width, BW):
        j = j0 + tl.arange(0, BW)
        valid = live[:, None] & (j < width)[None, :]
        idx = (i.to(tl.int64) * s_unit)[:, None] + (j.to(tl.int64) * s_part)[None, :]
        s1 += tl.sum(tl.load(part + idx, mask=valid, other=0.0), 1)
        s2 += tl.sum(tl.load(part + half + idx, mask=valid, other=0.0), 1)
    if MODE < 2:
        tl.store(out1 + i, s1, mask=live)
        tl.store(out2 + i, s2, mask=live)
    if MODE >= 1:
        r = tl.load(rstd + i, mask=live, other=0.0)
        if MODE == 1:
            k1 = r * _param(w, i, live, 1.0, HAS_W, ACC)
            k2 = _div(-k1 * r * s2, count, ACC)
        else:
            k1 = r
            k2 = _div(-r * r * r * s2, count, ACC)
        cm = _div(s1, count, ACC)
        if not TRAIN:
            cm = cm * 0.0
            k2 = k2 * 0.0
        tl.store(consts + i, cm, mask=live)
        tl.store(consts + units + i, k1, mask=live)
        tl.store(consts + 2 * units + i, k2, mask=live)


@_jit
def _dx_planar(x, dy, y, dx, dres, w, shift, mshift, consts, units, P, Q, s_unit, s_p, groups, per_row, split,
               WEIGHT: tl.constexpr, TRAIN: tl.constexpr, MASK: tl.constexpr, DRES: tl.constexpr,
               HAS_W: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, ACC: tl.constexpr):
    """dx = (γ'·dy' − c)·k1 + ((x − shift) − mean_shifted)·k2 over unit ``u``'s (P, Q) block (γ' = γ of
    the block row's parameter with WEIGHT, else 1), program (u, k) taking tiles k, k + split, ...; with
    DRES also the residual's gradient dy'. With fixed statistics x is not read."""
    u = tl.program_id(0)
    k = tl.program_id(1)
    base = u.to(tl.int64) * s_unit
    cm = tl.load(consts + u)
    k1 = tl.load(consts + units + u)
    k2 = tl.load(consts + 2 * units + u)
    sh = tl.load(shift + u)
    d = sh * 0.0
    if TRAIN:
        d = tl.load(mshift + u)
    tiles_q = tl.cdiv(Q, BQ)
    for t in range(k, tl.cdiv(P, BP) * tiles_q, split):
        p, offs, valid = _tile(t, tiles_q, P, Q, s_p, BP, BQ)
        g = _masked_grad(dy + base, y + base, dres + base, offs, valid, MASK, DRES, ACC)
        if WEIGHT:
            g = g * _param(w, (u % groups) * per_row + p, p < P, 1.0, HAS_W, ACC)[:, None]
        out = (g - cm) * k1
        if TRAIN:
            out += ((tl.load(x + base + offs, mask=valid, other=0.0).to(ACC) - sh) - d) * k2
        tl.store(dx + base + offs, out.to(dx.dtype.element_ty), mask=valid)


@_jit
def _dx_cols(x, dy, y, dx, dres, shift, mshift, consts, M, C,
             TRAIN: tl.constexpr, MASK: tl.constexpr, DRES: tl.constexpr,
             BM: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """dx = (dy' − c)·k1 + ((x − shift) − mean_shifted)·k2 on a BM × BC tile of (M, C) data, every
    factor per column; with DRES also the residual's gradient dy'. Tiles as :func:`_cols_tile` numbers
    them."""
    m, c = _cols_tile(C, BM, BC)
    live = c < C
    cm = tl.load(consts + c, mask=live, other=0.0)[None, :]
    k1 = tl.load(consts + C + c, mask=live, other=0.0)[None, :]
    valid = (m < M)[:, None] & live[None, :]
    offs = (m.to(tl.int64) * C)[:, None] + c[None, :]
    g = _masked_grad(dy, y, dres, offs, valid, MASK, DRES, ACC)
    out = (g - cm) * k1
    if TRAIN:
        k2 = tl.load(consts + 2 * C + c, mask=live, other=0.0)[None, :]
        sh = tl.load(shift + c, mask=live, other=0.0)[None, :]
        d = tl.load(mshift + c, mask=live, other=0.0)[None, :]
        out += ((tl.load(x + offs, mask=valid, other=0.0).to(ACC) - sh) - d) * k2
    tl.store(dx + offs, out.to(dx.dtype.element_ty), mask=valid)


@_jit
def _row_backward_tile(x, dy, dx, w, shift, mshift, rstd, part, R, K, per_row, run, groups, nprog,
                       TRAIN: tl.constexpr, NEED_X: tl.constexpr, NEED_P: tl.constexpr, HAS_W: tl.constexpr,
                       BP: tl.constexpr, BQ: tl.constexpr, ACC: tl.constexpr):
    """Rows k, k + nprog, ... of (R, K) data, each whole as a (per_row, run) tile: dx from the row's
    closed form, and (NEED_P) the program's partial dβ, dγ per parameter row, written to
    ``part[:, k, :]`` ((2, nprog, per_row)). ``nprog`` is a multiple of ``groups``, so all rows of a
    program share one group's parameters."""
    k = tl.program_id(0)
    p = tl.arange(0, BP)
    q = tl.arange(0, BQ)
    valid = (p < per_row)[:, None] & (q < run)[None, :]
    inner = (p * run)[:, None] + q[None, :]
    gam = _param(w, (k % groups) * per_row + p, p < per_row, 1.0, HAS_W, ACC)[:, None]
    acc_b = tl.zeros([BP, BQ], ACC)
    acc_w = tl.zeros([BP, BQ], ACC)
    for r in range(k, R, nprog):
        offs = tl.cast(r, tl.int64) * K + inner
        sh = tl.load(shift + r)
        rs = tl.load(rstd + r)
        xc = tl.load(x + offs, mask=valid, other=0.0).to(ACC) - sh
        if TRAIN:
            xc = xc - tl.load(mshift + r)
        xc = tl.where(valid, xc, 0.0)
        g0 = tl.load(dy + offs, mask=valid, other=0.0).to(ACC)
        if NEED_P:
            acc_b += g0
            acc_w += g0 * xc * rs
        if NEED_X:
            g = g0 * gam
            if TRAIN:
                sg = tl.sum(tl.sum(g, 1), 0)
                sgx = tl.sum(tl.sum(g * xc, 1), 0)
                out = (g - _div(sg, K, ACC)) * rs + xc * _div(-rs * rs * rs * sgx, K, ACC)
            else:
                out = g * rs
            tl.store(dx + offs, out.to(dx.dtype.element_ty), mask=valid)
    if NEED_P:
        live = p < per_row
        tl.store(part + k * per_row + p, tl.sum(acc_b, 1), mask=live)
        tl.store(part + nprog * per_row + k * per_row + p, tl.sum(acc_w, 1), mask=live)


# ---------------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block2d(p: int, q: int, block: int) -> tuple[int, int]:
    """Tile shape (BP, BQ) for a (p, q) block with contiguous columns: as wide as the columns allow."""
    bq = min(_pow2(q), block)
    return max(1, min(_pow2(p), block // bq)), bq


def _whole_rows(bp: int, bq: int, dtype: torch.dtype) -> bool:
    """Whether rows padded to (bp, bq) tiles (parameters x values per parameter) go to the whole-row
    kernels: up to :data:`ROW_TILE` values, half that in float64 (twice the registers per value), and
    half again for tiles of 2 to 8 values per parameter, whose backward (the per-parameter sums of a tall,
    narrow tile) spilled 450-790 bytes per thread at the full size on sm_90 (GroupNorm(1) on
    (N, 2048, 2, 2), 2048 x 4; none at 8192 x 1 or 512 x 16), 84-120 in float64 at 4096 values."""
    limit = ROW_TILE // 2 if dtype == torch.float64 else ROW_TILE
    if 1 < bq < 16:
        limit //= 2
    return bp * bq <= limit


def _warps(elements: int) -> int:
    return max(1, min(16, elements // 256))


def _launch(elements: int) -> dict:
    """The options of a launch whose tile holds ``elements`` values: one warp per 256 of them (1 to 16),
    and :data:`_OPTIONS`."""
    return dict(num_warps=_warps(elements), **_OPTIONS)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(x: torch.Tensor) -> int:
    if x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_SM * _multiprocessors(index)
    return INTERPRETER_PROGRAMS


def _split(units: int, tiles: int, target: int) -> int:
    """Programs per unit so that ``units · split`` is about ``target`` (at most one per tile)."""
    return max(1, min(tiles, MAX_SPLIT, _cdiv(target, units)))


def _origin_offsets(p: int, q: int, s_p: int) -> tuple[int, int]:
    """Offsets of the middle and last values of a (p, q) block whose rows are ``s_p`` apart (Python
    integers: Triton passes them as 64-bit where they need it)."""
    mid, last = (p * q) // 2, p * q - 1
    return (mid // q) * s_p + mid % q, (last // q) * s_p + last % q


def _eps_parts(eps: float) -> tuple[float, float]:
    """``eps`` as two float32 scalars whose sum is ``eps`` to about 48 bits (Triton passes floats as
    float32), so that float64 statistics use it at float64 precision."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last(x: torch.Tensor) -> bool:
    fmt = _CHANNELS_LAST.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _device(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _flat_param(p: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (dummy, False) if p is None else (p.detach().contiguous().reshape(-1), True)


def _stat(t: torch.Tensor | None, acc: torch.dtype, count: int) -> torch.Tensor | None:
    """A saved statistic as a flat ``count``-long tensor in ``acc`` (per-channel fixed statistics repeated
    for every row where each sample has its own)."""
    if t is None:
        return None
    t = t.detach().reshape(-1).to(acc).contiguous()
    return t if t.numel() == count else t.repeat(count // t.numel())


class _Layout:
    """How one call's tensors are laid out for the kernels (see the module docstring)."""

    def __init__(self, x: torch.Tensor, plan: Plan):
        shape = classify(plan)
        self.shape = shape
        self.channels_last = _is_channels_last(x)
        if isinstance(shape, ChannelShape):
            self.kind = "cols" if self.channels_last or shape.spatial == 1 else "planar"
            self.units = shape.channels
        elif isinstance(shape, RowShape):
            self.kind = "rows"
            self.units = shape.rows
        else:
            raise ValueError(f"plan not handled by the triton kernels: {plan}")

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the memory layout the kernels read: channels_last kept for BatchNorm, else contiguous."""
        t = t.detach()
        if self.kind == "cols" and self.channels_last:
            return t.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
        return t.contiguous()

    def finish(self, t: torch.Tensor) -> torch.Tensor:
        """A kernel output back in the input's memory format (per-row plans compute on contiguous data)."""
        if self.kind == "rows" and self.channels_last:
            return t.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
        return t


class TritonBackend:
    """Engine backend on Triton kernels; see the module docstring."""

    name = "triton"

    def unsupported(self, x: torch.Tensor, plan: Plan) -> str | None:
        """Why this backend cannot run ``x`` with ``plan``, or ``None`` if it can."""
        if not installed():
            return "triton is not installed"
        if x.device.type == "cpu":
            problem = _interpreter_problem()
            if problem is not None:
                return f"the triton backend runs on CUDA tensors ({problem})"
        elif x.device.type != "cuda":
            return f"the triton backend runs on CUDA tensors, got a tensor on {x.device}"
        else:
            problem = _gpu_problem()
            if problem is not None:
                return f"the triton backend cannot run CUDA tensors here ({problem})"
        if x.dtype not in _DTYPES:
            return f"the triton backend does not handle dtype {x.dtype}"
        if classify(plan) is None:
            return f"the triton backend does not handle a plan reducing axes {plan.reduce} of {plan.view_shape}"
        return None

    def fuses(self, plan: Plan) -> bool:
        """Whether ReLU and a residual add can be fused into the normalization (BatchNorm plans)."""
        return isinstance(classify(plan), ChannelShape)

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float,
                residual: torch.Tensor | None = None, relu: bool = False):
        """``(y, shift, mean_shifted, var, rstd)`` as :func:`normlab.core.engine.forward_torch` returns them.

        ``relu`` (and ``residual``) fuse ``relu(y + residual)`` into the normalizing pass (BatchNorm only).
        """
        lay = _Layout(x, plan)
        if relu and lay.kind == "rows":
            raise ValueError("the triton backend fuses ReLU into BatchNorm only")
        acc = _acc(x.dtype)
        train = fixed_mean is None
        xa = lay.prepare(x)
        y = torch.empty_like(xa)
        stats = torch.empty(4, lay.units, dtype=acc, device=x.device)  # shift, mean_shifted, var, rstd
        if x.numel() == 0:  # an empty batch: the torch engine's statistics of nothing
            if train:
                stats[:2] = 0.0
                stats[2] = 1.0
            else:
                stats[0] = _stat(fixed_mean, acc, lay.units)
                stats[1] = 0.0
                stats[2] = _stat(fixed_var, acc, lay.units)
            torch.rsqrt(stats[2] + eps, out=stats[3])
        else:
            k = _kernels()
            w, has_w = _flat_param(weight, xa)
            b, has_b = _flat_param(bias, xa)
            fm = xa if train else fixed_mean.detach().contiguous().reshape(-1)
            fv = xa if train else fixed_var.detach().contiguous().reshape(-1)
            epi = 0 if not relu else 1 if residual is None else 2
            res = lay.prepare(residual) if epi == 2 else xa
            tl_acc = k["tl"].float64 if acc == torch.float64 else k["tl"].float32
            with _device(x):
                if lay.kind == "rows":
                    self._rows_forward(k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, tl_acc)
                else:
                    self._bn_forward(k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, res, epi,
                                     tl_acc)
        shift, mean_shifted, var, rstd = stats.view(4, *plan.stat_shape).unbind(0)
        return lay.finish(y), shift, mean_shifted if train else None, var, rstd

    @staticmethod
    def _finish_moments(k, part, fm, fv, stats, units, split, train, eps, tl_acc):
        bs = _pow2(split) if train else 1
        bu = max(1, min(_pow2(units), 4096 // bs))
        k["_finish_moments"][(_cdiv(units, bu),)](
            part, fm, fv, stats, units, split, fm.numel() if not train else 1, *_eps_parts(eps),
            TRAIN=train, BU=bu, BS=bs, ACC=tl_acc, **_launch(bu * bs))

    def _planar_moments(self, k, xa, stats, fm, fv, units, p, q, s_unit, s_p, train, eps, tl_acc):
        """Statistics of ``units`` (p, q) blocks (split reduction, or the fixed statistics)."""
        bp, bq = _block2d(p, q, BLOCK)
        split = _split(units, _cdiv(p, bp) * _cdiv(q, bq), _target_programs(xa)) if train else 1
        part = stats
        if train:
            part = torch.empty(3, units, split, dtype=stats.dtype, device=xa.device)
            k["_moments_planar"][(units, split)](xa, part, stats, units, p, q, s_unit, s_p, split,
                                                 *_origin_offsets(p, q, s_p),
                                                 BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
        self._finish_moments(k, part, fm, fv, stats, units, split, train, eps, tl_acc)

    def _apply_planar(self, k, xa, res, y, stats, w, has_w, b, has_b, units, p, q, s_unit, s_p, groups, per_row,
                      param_p, epi, tl_acc):
        bp, bq = _block2d(p, q, BLOCK)
        split = _split(units, _cdiv(p, bp) * _cdiv(q, bq), _target_programs(xa))
        k["_apply_planar"][(units, split)](
            xa, res, y, stats[0], stats[1], stats[3], w, b, p, q, s_unit, s_p, groups, per_row, split,
            PARAM_P=param_p, HAS_W=has_w, HAS_B=has_b, EPI=epi, BP=bp, BQ=bq, ACC=tl_acc,
            **_launch(bp * bq))

    def _bn_forward(self, k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, res, epi, tl_acc):
        s: ChannelShape = lay.shape
        c = s.channels
        if lay.kind == "planar":
            self._planar_moments(k, xa, stats, fm, fv, c, s.n, s.spatial, s.spatial, c * s.spatial, train, eps,
                                 tl_acc)
            self._apply_planar(k, xa, res, y, stats, w, has_w, b, has_b, c, s.n, s.spatial, s.spatial,
                               c * s.spatial, c, 1, False, epi, tl_acc)
            return
        m = xa.numel() // c
        bc = min(_pow2(c), COLUMNS)
        bm = max(1, min(_pow2(m), BLOCK // bc))
        col_blocks = _cdiv(c, bc)
        split = 1
        part = stats
        if train:
            split = _split(col_blocks, _cdiv(m, bm), _target_programs(xa))
            part = torch.empty(3, c, split, dtype=stats.dtype, device=xa.device)
            k["_moments_cols"][(col_blocks, split)](xa, part, stats, m, c, split, *_origin_offsets(m, 1, c),
                                                    BM=bm, BC=bc, ACC=tl_acc,
                                                    **_launch(bm * bc))
        self._finish_moments(k, part, fm, fv, stats, c, split, train, eps, tl_acc)
        k["_apply_cols"][(_cdiv(m, bm) * col_blocks,)](
            xa, res, y, stats[0], stats[1], stats[3], w, b, m, c,
            HAS_W=has_w, HAS_B=has_b, EPI=epi, BM=bm, BC=bc, ACC=tl_acc, **_launch(bm * bc))

    def _rows_forward(self, k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, tl_acc):
        s: RowShape = lay.shape
        bp, bq = _pow2(s.per_row), _pow2(s.run)
        if _whole_rows(bp, bq, xa.dtype):
            k["_row_forward_tile"][(s.rows,)](
                xa, y, stats, w, b, fm, fv, s.rows, s.size, s.per_row, s.run, s.groups,
                1 if train else fm.numel(), *_eps_parts(eps),
                TRAIN=train, HAS_W=has_w, HAS_B=has_b, BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
            return
        self._planar_moments(k, xa, stats, fm, fv, s.rows, s.per_row, s.run, s.size, s.run, train, eps, tl_acc)
        self._apply_planar(k, xa, xa, y, stats, w, has_w, b, has_b, s.rows, s.per_row, s.run, s.size, s.run,
                           s.groups, s.per_row, True, 0, tl_acc)

    # -- backward -------------------------------------------------------------------------------------

    def backward(self, dy, x, weight, shift, mean_shifted, rstd, plan: Plan, batch_stats: bool,
                 need: tuple[bool, bool, bool], y: torch.Tensor | None = None, residual: bool = False):
        """``(dx, dγ, dβ)``: dx in ``x``'s dtype, shape and layout, dγ and dβ flat, in the accumulation dtype.

        ``y`` is the output of a fused ReLU (its mask), ``residual`` whether a residual was added before
        it; then a fourth result, the residual's gradient, follows.
        """
        lay = _Layout(x, plan)
        if y is not None and lay.kind == "rows":
            raise ValueError("the triton backend fuses ReLU into BatchNorm only")
        need_x, need_w, need_b = need
        acc = _acc(x.dtype)
        xa = lay.prepare(x)
        nparam = lay.shape.channels if lay.kind != "rows" else lay.shape.groups * lay.shape.per_row
        dx = torch.empty_like(xa) if need_x else None
        dres = torch.empty_like(xa) if residual else None
        dw, db = torch.zeros(2, nparam, dtype=acc, device=x.device).unbind(0)
        if x.numel():
            k = _kernels()
            tl_acc = k["tl"].float64 if acc == torch.float64 else k["tl"].float32
            dya = lay.prepare(dy)
            ya = lay.prepare(y) if y is not None else xa
            w, has_w = _flat_param(weight, xa)
            sh = _stat(shift, acc, lay.units)
            ms = _stat(mean_shifted, acc, lay.units) if batch_stats else sh
            rs = _stat(rstd, acc, lay.units)
            args = (k, lay, xa, dya, ya, y is not None, dx, dres, dw, db, w, has_w, sh, ms, rs, batch_stats, need,
                    tl_acc)
            with _device(x):
                if lay.kind == "rows":
                    self._rows_backward(*args)
                else:
                    self._bn_backward(*args)
        if dx is not None:
            dx = lay.finish(dx)
        grads = (dx, dw if need_w else None, db if need_b else None)
        return grads if y is None else (*grads, dres)

    @staticmethod
    def _finish_sums(k, part, half, s_unit, s_part, width, units, w, has_w, rstd, out1, out2, consts, count,
                     mode, train, tl_acc):
        bw = min(_pow2(max(width, 1)), 256)
        bu = max(1, min(_pow2(units), 4096 // bw))
        k["_finish_sums"][(_cdiv(units, bu),)](
            part, half, s_unit, s_part, width, units, w, rstd, out1, out2, consts, count,
            MODE=mode, TRAIN=train, HAS_W=has_w, BU=bu, BW=bw, ACC=tl_acc, **_launch(bu * bw))

    def _bn_backward(self, k, lay, xa, dya, ya, mask, dx, dres, dw, db, w, has_w, sh, ms, rs, train, need,
                     tl_acc):
        s: ChannelShape = lay.shape
        c = s.channels
        count = xa.numel() // c
        sums = train or need[1] or need[2]
        consts = torch.empty(3, c, dtype=dw.dtype, device=xa.device)
        target = _target_programs(xa)
        part, split = consts, 0
        if lay.kind == "planar":
            n, sp = s.n, s.spatial
            bp, bq = _block2d(n, sp, BLOCK)
            tiles = _cdiv(n, bp) * _cdiv(sp, bq)
            if sums:
                split = _split(c, tiles, target)
                part = torch.empty(2, c, split, dtype=dw.dtype, device=xa.device)
                k["_planar_sums"][(c, split)](
                    xa, dya, ya, w, sh, ms, rs, part, c, n, sp, 0, sp, c, c * sp, c, 1, split,
                    STAT_P=False, WEIGHT=False, SCALE=True, TRAIN=train, MASK=mask, HAS_W=has_w,
                    BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
            self._finish_sums(k, part, c * max(split, 1), max(split, 1), 1, split, c, w, has_w, rs, db, dw, consts,
                              count, 1, train, tl_acc)
            if dx is not None:
                split = _split(c, tiles, target)
                k["_dx_planar"][(c, split)](
                    xa, dya, ya, dx, dres if dres is not None else dx, w, sh, ms, consts, c, n, sp, sp, c * sp, c, 1,
                    split, WEIGHT=False, TRAIN=train, MASK=mask, DRES=dres is not None, HAS_W=has_w,
                    BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
            return
        m = count
        bc = min(_pow2(c), COLUMNS)
        bm = max(1, min(_pow2(m), BLOCK // bc))
        col_blocks = _cdiv(c, bc)
        if sums:
            split = _split(col_blocks, _cdiv(m, bm), target)
            part = torch.empty(2, c, split, dtype=dw.dtype, device=xa.device)
            k["_cols_sums"][(col_blocks, split)](
                xa, dya, ya, sh, ms, rs, part, m, c, split, 1, 1,
                STAT_ROW=False, TRAIN=train, MASK=mask, BM=bm, BC=bc, ACC=tl_acc, **_launch(bm * bc))
        self._finish_sums(k, part, c * max(split, 1), max(split, 1), 1, split, c, w, has_w, rs, db, dw, consts,
                          count, 1, train, tl_acc)
        if dx is not None:
            k["_dx_cols"][(_cdiv(m, bm) * col_blocks,)](
                xa, dya, ya, dx, dres if dres is not None else dx, sh, ms, consts, m, c,
                TRAIN=train, MASK=mask, DRES=dres is not None, BM=bm, BC=bc, ACC=tl_acc, **_launch(bm * bc))

    def _rows_backward(self, k, lay, xa, dya, ya, mask, dx, dres, dw, db, w, has_w, sh, ms, rs, train, need,
                       tl_acc):
        s: RowShape = lay.shape
        need_x, need_p = need[0], need[1] or need[2]
        nparam = s.groups * s.per_row
        target = _target_programs(xa)
        bp, bq = _pow2(s.per_row), _pow2(s.run)
        if _whole_rows(bp, bq, xa.dtype):
            per_group = max(1, min(s.rows // s.groups, _cdiv(target, s.groups)))
            nprog = per_group * s.groups
            part = torch.empty(2, nprog, s.per_row, dtype=dw.dtype, device=xa.device) if need_p else dw
            k["_row_backward_tile"][(nprog,)](
                xa, dya, dx if dx is not None else xa, w, sh, ms, rs, part, s.rows, s.size, s.per_row, s.run,
                s.groups, nprog, TRAIN=train, NEED_X=need_x, NEED_P=need_p, HAS_W=has_w, BP=bp, BQ=bq, ACC=tl_acc,
                **_launch(bp * bq))
            if need_p:
                self._finish_sums(k, part, nprog * s.per_row, 1, nparam, per_group, nparam, w, has_w, rs, db, dw,
                                  dw, 1, 0, train, tl_acc)
            return
        bp, bq = _block2d(s.per_row, s.run, BLOCK)
        tiles = _cdiv(s.per_row, bp) * _cdiv(s.run, bq)
        if need_x:
            consts = torch.empty(3, s.rows, dtype=dw.dtype, device=xa.device)
            part, split = consts, 0
            if train:
                split = _split(s.rows, tiles, target)
                part = torch.empty(2, s.rows, split, dtype=dw.dtype, device=xa.device)
                k["_planar_sums"][(s.rows, split)](
                    xa, dya, xa, w, sh, ms, rs, part, s.rows, s.per_row, s.run, s.size, 0, 1, s.run,
                    s.groups, s.per_row, split, STAT_P=False, WEIGHT=True, SCALE=False, TRAIN=True, MASK=False,
                    HAS_W=has_w, BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
            self._finish_sums(k, part, s.rows * max(split, 1), max(split, 1), 1, split, s.rows, w, has_w, rs, dw,
                              dw, consts, s.size, 2, train, tl_acc)
            split = _split(s.rows, tiles, target)
            k["_dx_planar"][(s.rows, split)](
                xa, dya, xa, dx, dx, w, sh, ms, consts, s.rows, s.per_row, s.run, s.size, s.run, s.groups,
                s.per_row, split, WEIGHT=True, TRAIN=train, MASK=False, DRES=False, HAS_W=has_w,
                BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
        if not need_p:
            return
        outer = s.rows // s.groups  # samples: parameter (g, j) has one run of values in each
        if s.run == 1:  # every value its own parameter: column sums of the (outer, groups·per_row) matrix
            bc = min(_pow2(nparam), COLUMNS)
            bm = max(1, min(_pow2(outer), BLOCK // bc))
            col_blocks = _cdiv(nparam, bc)
            split = _split(col_blocks, _cdiv(outer, bm), target)
            part = torch.empty(2, nparam, split, dtype=dw.dtype, device=xa.device)
            k["_cols_sums"][(col_blocks, split)](
                xa, dya, xa, sh, ms, rs, part, outer, nparam, split, s.groups, s.per_row,
                STAT_ROW=True, TRAIN=train, MASK=False, BM=bm, BC=bc, ACC=tl_acc, **_launch(bm * bc))
        else:  # parameter (g, j): an (outer, run) block with rows groups·K apart
            bp, bq = _block2d(outer, s.run, BLOCK)
            split = _split(nparam, _cdiv(outer, bp) * _cdiv(s.run, bq), target)
            part = torch.empty(2, nparam, split, dtype=dw.dtype, device=xa.device)
            k["_planar_sums"][(nparam, split)](
                xa, dya, xa, w, sh, ms, rs, part, nparam, outer, s.run, s.size, s.run, s.per_row,
                s.groups * s.size, s.groups, s.per_row, split, STAT_P=True, WEIGHT=False, SCALE=True,
                TRAIN=train, MASK=False, HAS_W=has_w, BP=bp, BQ=bq, ACC=tl_acc, **_launch(bp * bq))
        self._finish_sums(k, part, nparam * split, split, 1, split, nparam, w, has_w, rs, db, dw, dw, 1, 0, train,
                          tl_acc)
