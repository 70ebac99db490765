"""Triton device code, part 1: the shared device helpers, the statistics kernels and the normalizing
kernels (``@jit`` functions, compiled when :func:`normlab.kernels.triton.runtime.kernels` builds them).
The backward's kernels are in :mod:`.device_backward`; the host code that launches both in :mod:`.backend`.

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
"""

from __future__ import annotations

# triton.language, bound when the kernels are built (runtime.kernels); the kernels below are plain Python
# functions until then, so that this module imports without triton.
tl = None
JIT: list[tuple[str, str]] = []
"""(module, name) of every Triton function, in definition order; jitted by runtime.kernels."""


def jit(fn):
    """Mark ``fn`` as a Triton function (jitted, under its own name, when the kernels are built)."""
    JIT.append((fn.__module__, fn.__name__))
    return fn


# ---------------------------------------------------------------------------------------------------
# Device helpers.
# ---------------------------------------------------------------------------------------------------


@jit
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


@jit
def _rsqrt(v, ACC: tl.constexpr):
    """1 / sqrt(v), the square root and the division each correctly rounded, in float32 and float64."""
    if ACC == tl.float64:
        s = tl.sqrt(v)
    else:
        s = tl.sqrt_rn(v)
    return _div(s * 0.0 + 1.0, s, ACC)


@jit
def _welford_add(v, valid, cnt, mean, m2):
    """Add one value per lane into the lanes' running (count, mean, M2); lanes not ``valid`` keep theirs."""
    cnt = cnt + valid.to(cnt.dtype)
    delta = v - mean
    # per value: the GPU's approximate float32 division (within 2 ulp) moves the mean by less than the
    # rounding of the sum it tracks, and the IEEE one would cost more than the loop's other work
    mean = mean + tl.where(valid, delta / tl.maximum(cnt, 1.0), 0.0)
    m2 = m2 + tl.where(valid, delta * (v - mean), 0.0)
    return cnt, mean, m2


@jit
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


@jit
def _median3(a, b, c):
    """The median of three values (elementwise)."""
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))


@jit
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


@jit
def _param(ptr, idx, mask, default, HAS: tl.constexpr, ACC: tl.constexpr):
    """γ or β at ``idx`` in the accumulation dtype, or ``default`` where the layer has none."""
    if HAS:
        v = tl.load(ptr + idx, mask=mask, other=default).to(ACC)
    else:
        v = tl.full(idx.shape, default, ACC)
    return v


@jit
def _epilogue(v, res, offs, valid, EPI: tl.constexpr, ACC: tl.constexpr):
    """EPI 0: nothing; 1: ReLU; 2: add the residual, then ReLU (NaN stays NaN)."""
    if EPI == 2:
        v = v + tl.load(res + offs, mask=valid, other=0.0).to(ACC)
    if EPI >= 1:
        v = tl.where(v < 0.0, 0.0, v)
    return v


@jit
def _masked_grad(dy, y, dres, offs, valid, MASK: tl.constexpr, DRES: tl.constexpr, ACC: tl.constexpr):
    """dy', the incoming gradient masked by y > 0 after a fused ReLU; stored as the residual's gradient
    when DRES."""
    g = tl.load(dy + offs, mask=valid, other=0.0).to(ACC)
    if MASK:
        g = tl.where(tl.load(y + offs, mask=valid, other=0.0) > 0.0, g, 0.0)
    if DRES:
        tl.store(dres + offs, g.to(dres.dtype.element_ty), mask=valid)
    return g


@jit
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


@jit
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


@jit
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


@jit
def _split_moments(part, i, live, units, split, BS: tl.constexpr):
    """(count, mean, M2) of units ``i`` from their ``split`` Welford partials in ``part`` ((3, units,
    split)), merged (:func:`_merge_moments`)."""
    j = tl.arange(0, BS)
    valid = live[:, None] & (j < split)[None, :]
    idx = i[:, None] * split + j[None, :]
    total = units * split
    n = tl.load(part + idx, mask=valid, other=0.0)
    mu = tl.load(part + total + idx, mask=valid, other=0.0)
    m2 = tl.load(part + 2 * total + idx, mask=valid, other=0.0)
    return _merge_moments(n, mu, m2, 1)


@jit
def _finish_moments(part, fixed_mean, fixed_var, stats, units, split, period, eps_hi, eps_lo,
                    TRAIN: tl.constexpr, BU: tl.constexpr, BS: tl.constexpr, ACC: tl.constexpr,
                    MERGED: tl.constexpr = False):
    """Statistics ``stats`` ((4, units): shift, mean_shifted, var, rstd) of units [pid·BU, (pid+1)·BU):
    in training from the merged Welford partials of the values shifted by the origin the moments kernel
    wrote to ``stats[0]``, the shift saved being their mean, rounded (:func:`_recentre`); with MERGED
    from ``part`` holding the whole batch's merged moments ((4, units) float64: N, K, D, σ² as
    :func:`normlab.core.stats.merge_moments` gives them), the shift saved being K + D, rounded; otherwise
    from the fixed statistics of entry ``u mod period``."""
    i = tl.program_id(0) * BU + tl.arange(0, BU)
    live = i < units
    if MERGED:
        k = tl.load(part + units + i, mask=live, other=0.0).to(ACC)
        var = tl.load(part + 3 * units + i, mask=live, other=1.0).to(ACC)
        shift, d = _recentre(k, tl.load(part + 2 * units + i, mask=live, other=0.0).to(ACC))
    elif TRAIN:
        n, d, m2 = _split_moments(part, i, live, units, split, BS)
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


@jit
def _pack_moments(part, origin, packed, units, split, BU: tl.constexpr, BS: tl.constexpr):
    """The statistics seam's partial moments of units [pid·BU, (pid+1)·BU): ``packed`` ((4, units)
    float64) gets s = the origin the moments kernel wrote to ``origin`` and the merged partials' mean
    d and M2 about it, as :func:`_finish_moments` merges them (the count, row 0, is the caller's)."""
    i = tl.program_id(0) * BU + tl.arange(0, BU)
    live = i < units
    _, d, m2 = _split_moments(part, i, live, units, split, BS)
    tl.store(packed + units + i, tl.load(origin + i, mask=live, other=0.0).to(tl.float64), mask=live)
    tl.store(packed + 2 * units + i, d.to(tl.float64), mask=live)
    tl.store(packed + 3 * units + i, m2.to(tl.float64), mask=live)


# ---------------------------------------------------------------------------------------------------
# Normalizing.
# ---------------------------------------------------------------------------------------------------


@jit
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


@jit
def _cols_tile(C, BM: tl.constexpr, BC: tl.constexpr):
    """The rows and columns of this program's BM × BC tile of (M, C) data: one program per tile on a 1-D
    grid, the column blocks of a row block adjacent (CUDA caps a grid's second axis at 65535, which a 2-D
    grid of column blocks would pass at 4M channels)."""
    pid = tl.program_id(0)
    blocks_c = tl.cdiv(C, BC)
    return (pid // blocks_c) * BM + tl.arange(0, BM), (pid % blocks_c) * BC + tl.arange(0, BC)


@jit
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


@jit
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


