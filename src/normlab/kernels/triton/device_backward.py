"""Triton device code, part 2: the backward's kernels: per-statistic sums (Σdy', Σdy'·x̂), their
constants and dγ/dβ (``_finish_sums``), and dx. Built with the kernels of :mod:`.device`, whose helpers
they call; see :mod:`.backend` for which run when.
"""

from __future__ import annotations

from normlab.kernels.triton.device import (  # noqa: F401  (Triton resolves these by name when it compiles)
    _div, _param, _masked_grad, _tile, _cols_tile, jit,
)

tl = None  # triton.language, bound when the kernels are built (runtime.kernels)


# ---------------------------------------------------------------------------------------------------
# Backward: sums, their constants, dx.
# ---------------------------------------------------------------------------------------------------


@jit
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


@jit
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


@jit
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


@jit
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


@jit
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


@jit
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

