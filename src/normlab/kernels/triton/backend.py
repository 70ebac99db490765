"""The ``triton`` backend: the engine's forward and closed-form backward on CUDA tensors (or on CPU tensors
under Triton's interpreter, ``TRITON_INTERPRET=1``), run by the kernels of :mod:`.device` and
:mod:`.device_backward` with the tiles and splits of :mod:`.launch`.

Results follow the engine's conventions (:class:`normlab.core.backend.Backend`): ``y`` and ``dx`` in the
input's dtype, shape and memory format; statistics in ``plan.stat_shape`` and in the accumulation dtype;
``(shift, mean_shifted)`` with μ = shift + mean_shifted, ``shift`` being μ rounded to the accumulation
dtype in training (the fixed mean otherwise); dγ and dβ flat, in the accumulation dtype. float16 and
bfloat16 are loaded as they are and computed in float32 inside the kernels; nothing is converted in memory.

Which kernels run is chosen per call from the plan's :func:`~normlab.kernels.layout.family`:

* **BatchNorm, (N, C, S) contiguous** (S > 1; ``CHANNEL_PLANES``). One *unit* per channel: its N·S
  values are an (N, S) block with rows C·S apart. Forward: ``_moments_planar`` (grid: channel × split;
  each program streams its share of the channel's tiles, grid-stride, into Welford partials), ``_finish_moments`` (merges the
  split partials per channel; with fixed statistics it reads the running statistics instead), then
  ``_apply_planar`` (grid: channel × split; normalize and epilogue). x is read twice, y written once.
  Backward: ``_planar_sums`` (Σdy' and Σdy'·x̂ per channel, split like the moments), ``_finish_sums``
  (dβ, dγ and the dx constants), ``_dx_planar`` (reads x, dy and the ReLU mask, writes dx and the
  residual's gradient). With fixed statistics and no dγ/dβ wanted the sums are skipped and x is not read.
* **BatchNorm, (M, C) rows with C contiguous** (2D input, channels_last, 1×1 maps; ``CHANNEL_ROWS``).
  Tiles of BM rows × BC channels: ``_moments_cols`` (grid: channel block × split of the rows), ``_finish_moments``,
  ``_apply_cols`` (grid: row block × channel block); backward ``_cols_sums``, ``_finish_sums``,
  ``_dx_cols``. Same passes as above, every load coalesced along C.
* **Per-row plans (LayerNorm, GroupNorm, InstanceNorm; ``ROW``)**: R contiguous rows of K values; a
  row is a (per_row, run) block whose row j is scaled by parameter ``(r mod groups) · per_row + j``.
  channels_last input is made contiguous first (one copy each way).
  - A row that fits in :data:`.launch.ROW_TILE` values (half that in float64) is handled whole in
    registers: ``_row_forward_tile`` (one program per row; x read once, y written once) and
    ``_row_backward_tile`` (programs grid-stride over rows of one group, so each keeps its dγ/dβ
    partial sums in registers; x and dy read once, dx written once), then ``_finish_sums`` adds the
    programs' partials.
  - Longer rows are split like BatchNorm channels: ``_moments_planar``, ``_finish_moments``,
    ``_apply_planar``; backward ``_planar_sums`` (Σγ·dy and Σγ·dy·(x − μ) per row), ``_finish_sums``
    (the per-row dx constants), ``_dx_planar``; dγ/dβ by ``_planar_sums`` over each parameter's
    values across rows (or ``_cols_sums`` when every value has its own parameter, as in LayerNorm),
    then ``_finish_sums``.

Split reductions: a statistic with many values is cut into ``split`` programs so that about
:data:`.launch.PROGRAMS_PER_SM` programs per multiprocessor run; their partials (a few per statistic) are
merged by a second, small kernel. No kernel loops over channels in Python; every launch covers all of them.
Tile sizes, splits and warps: :mod:`.launch`.
"""

from __future__ import annotations

import torch

from normlab.core.conventions import accumulation_dtype, fill_empty_statistics
from normlab.core.plan import Plan
from normlab.kernels.layout import CHANNEL_PLANES, ROW, ChannelShape, RowShape, classify
from normlab.kernels.triton import launch
from normlab.kernels.triton.launch import (
    Launch, block2d, cdiv, eps_parts, flat_param, flat_stat, on_device, options, origin_offsets, pow2, split_programs,
    whole_rows,
)
from normlab.kernels.triton.runtime import gpu_problem, installed, interpreter_problem, kernels
from normlab.kernels.triton.seam import StatisticsSeam

__all__ = ["TritonBackend"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class TritonBackend(StatisticsSeam):
    """Engine backend on Triton kernels, with the statistics seam of :mod:`.seam`; see the module docstring."""

    name = "triton"

    def unsupported(self, x: torch.Tensor, plan: Plan) -> str | None:
        """Why this backend cannot run ``x`` with ``plan``, or ``None`` if it can."""
        if not installed():
            return "triton is not installed"
        if x.device.type == "cpu":
            problem = interpreter_problem()
            if problem is not None:
                return f"the triton backend runs on CUDA tensors ({problem})"
        elif x.device.type != "cuda":
            return f"the triton backend runs on CUDA tensors, got a tensor on {x.device}"
        else:
            problem = gpu_problem()
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
        lay = Launch(x, plan)
        if relu and lay.family == ROW:
            raise ValueError("the triton backend fuses ReLU into BatchNorm only")
        acc = accumulation_dtype(x.dtype)
        train = fixed_mean is None
        xa = lay.prepare(x)
        y = torch.empty_like(xa)
        stats = torch.empty(4, lay.units, dtype=acc, device=x.device)  # shift, mean_shifted, var, rstd
        if x.numel() == 0:  # an empty batch: the torch engine's statistics of nothing
            if train:
                fill_empty_statistics(stats)
            else:
                stats[0] = flat_stat(fixed_mean, acc, lay.units)
                stats[1] = 0.0
                stats[2] = flat_stat(fixed_var, acc, lay.units)
            torch.rsqrt(stats[2] + eps, out=stats[3])
        else:
            k = kernels()
            w, has_w = flat_param(weight, xa)
            b, has_b = flat_param(bias, xa)
            fm = xa if train else fixed_mean.detach().contiguous().reshape(-1)
            fv = xa if train else fixed_var.detach().contiguous().reshape(-1)
            epi = 0 if not relu else 1 if residual is None else 2
            res = lay.prepare(residual) if epi == 2 else xa
            tl_acc = k["tl"].float64 if acc == torch.float64 else k["tl"].float32
            with on_device(x):
                if lay.family == ROW:
                    self._rows_forward(k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, tl_acc)
                else:
                    self._bn_forward(k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, res, epi,
                                     tl_acc)
        shift, mean_shifted, var, rstd = stats.view(4, *plan.stat_shape).unbind(0)
        return lay.finish(y), shift, mean_shifted if train else None, var, rstd

    @staticmethod
    def _finish_moments(k, part, fm, fv, stats, units, split, train, eps, tl_acc, merged=False):
        bs = pow2(split) if train else 1
        bu = max(1, min(pow2(units), 4096 // bs))
        k["_finish_moments"][(cdiv(units, bu),)](
            part, fm, fv, stats, units, split, fm.numel() if not train else 1, *eps_parts(eps),
            TRAIN=train, BU=bu, BS=bs, ACC=tl_acc, MERGED=merged, **options(bu * bs))

    @staticmethod
    def _planar_partials(k, xa, stats, units, p, q, s_unit, s_p, tl_acc):
        """Welford partials ``(part, split)`` of ``units`` (p, q) blocks, split over programs; each block's
        origin is written to ``stats[0]``."""
        bp, bq = block2d(p, q, launch.BLOCK)
        split = split_programs(units, cdiv(p, bp) * cdiv(q, bq), launch.target_programs(xa))
        part = torch.empty(3, units, split, dtype=stats.dtype, device=xa.device)
        k["_moments_planar"][(units, split)](xa, part, stats, units, p, q, s_unit, s_p, split,
                                             *origin_offsets(p, q, s_p),
                                             BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
        return part, split

    def _planar_moments(self, k, xa, stats, fm, fv, units, p, q, s_unit, s_p, train, eps, tl_acc):
        """Statistics of ``units`` (p, q) blocks (split reduction, or the fixed statistics)."""
        part, split = self._planar_partials(k, xa, stats, units, p, q, s_unit, s_p, tl_acc) if train else (stats, 1)
        self._finish_moments(k, part, fm, fv, stats, units, split, train, eps, tl_acc)

    def _apply_planar(self, k, xa, res, y, stats, w, has_w, b, has_b, units, p, q, s_unit, s_p, groups, per_row,
                      param_p, epi, tl_acc):
        bp, bq = block2d(p, q, launch.BLOCK)
        split = split_programs(units, cdiv(p, bp) * cdiv(q, bq), launch.target_programs(xa))
        k["_apply_planar"][(units, split)](
            xa, res, y, stats[0], stats[1], stats[3], w, b, p, q, s_unit, s_p, groups, per_row, split,
            PARAM_P=param_p, HAS_W=has_w, HAS_B=has_b, EPI=epi, BP=bp, BQ=bq, ACC=tl_acc,
            **options(bp * bq))

    @staticmethod
    def _cols_tiles(m: int, c: int) -> tuple[int, int, int]:
        """``(BM, BC, column blocks)`` of the (M, C) BatchNorm kernels."""
        bc = min(pow2(c), launch.COLUMNS)
        bm = max(1, min(pow2(m), launch.BLOCK // bc))
        return bm, bc, cdiv(c, bc)

    def _bn_partials(self, k, lay, xa, stats, tl_acc):
        """BatchNorm's Welford partials ``(part, split)`` per channel, the origins in ``stats[0]``."""
        s: ChannelShape = lay.shape
        c = s.channels
        if lay.family == CHANNEL_PLANES:
            return self._planar_partials(k, xa, stats, c, s.n, s.spatial, s.spatial, c * s.spatial, tl_acc)
        m = xa.numel() // c
        bm, bc, col_blocks = self._cols_tiles(m, c)
        split = split_programs(col_blocks, cdiv(m, bm), launch.target_programs(xa))
        part = torch.empty(3, c, split, dtype=stats.dtype, device=xa.device)
        k["_moments_cols"][(col_blocks, split)](xa, part, stats, m, c, split, *origin_offsets(m, 1, c),
                                                BM=bm, BC=bc, ACC=tl_acc, **options(bm * bc))
        return part, split

    def _bn_apply(self, k, lay, xa, res, y, stats, w, has_w, b, has_b, epi, tl_acc):
        """BatchNorm's normalizing pass (and epilogue) with the statistics in ``stats``."""
        s: ChannelShape = lay.shape
        c = s.channels
        if lay.family == CHANNEL_PLANES:
            self._apply_planar(k, xa, res, y, stats, w, has_w, b, has_b, c, s.n, s.spatial, s.spatial,
                               c * s.spatial, c, 1, False, epi, tl_acc)
            return
        m = xa.numel() // c
        bm, bc, col_blocks = self._cols_tiles(m, c)
        k["_apply_cols"][(cdiv(m, bm) * col_blocks,)](
            xa, res, y, stats[0], stats[1], stats[3], w, b, m, c,
            HAS_W=has_w, HAS_B=has_b, EPI=epi, BM=bm, BC=bc, ACC=tl_acc, **options(bm * bc))

    def _bn_forward(self, k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, res, epi, tl_acc):
        part, split = self._bn_partials(k, lay, xa, stats, tl_acc) if train else (stats, 1)
        self._finish_moments(k, part, fm, fv, stats, lay.units, split, train, eps, tl_acc)
        self._bn_apply(k, lay, xa, res, y, stats, w, has_w, b, has_b, epi, tl_acc)

    def _rows_forward(self, k, lay, xa, y, stats, w, has_w, b, has_b, fm, fv, train, eps, tl_acc):
        s: RowShape = lay.shape
        bp, bq = pow2(s.per_row), pow2(s.run)
        if whole_rows(bp, bq, xa.dtype):
            k["_row_forward_tile"][(s.rows,)](
                xa, y, stats, w, b, fm, fv, s.rows, s.size, s.per_row, s.run, s.groups,
                1 if train else fm.numel(), *eps_parts(eps),
                TRAIN=train, HAS_W=has_w, HAS_B=has_b, BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
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
        lay = Launch(x, plan)
        if y is not None and lay.family == ROW:
            raise ValueError("the triton backend fuses ReLU into BatchNorm only")
        need_x, need_w, need_b = need
        acc = accumulation_dtype(x.dtype)
        xa = lay.prepare(x)
        nparam = lay.shape.channels if lay.family != ROW else lay.shape.groups * lay.shape.per_row
        dx = torch.empty_like(xa) if need_x else None
        dres = torch.empty_like(xa) if residual else None
        dw, db = torch.zeros(2, nparam, dtype=acc, device=x.device).unbind(0)
        if x.numel():
            k = kernels()
            tl_acc = k["tl"].float64 if acc == torch.float64 else k["tl"].float32
            dya = lay.prepare(dy)
            ya = lay.prepare(y) if y is not None else xa
            w, has_w = flat_param(weight, xa)
            sh = flat_stat(shift, acc, lay.units)
            ms = flat_stat(mean_shifted, acc, lay.units) if batch_stats else sh
            rs = flat_stat(rstd, acc, lay.units)
            args = (k, lay, xa, dya, ya, y is not None, dx, dres, dw, db, w, has_w, sh, ms, rs, batch_stats, need,
                    tl_acc)
            with on_device(x):
                if lay.family == ROW:
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
        bw = min(pow2(max(width, 1)), 256)
        bu = max(1, min(pow2(units), 4096 // bw))
        k["_finish_sums"][(cdiv(units, bu),)](
            part, half, s_unit, s_part, width, units, w, rstd, out1, out2, consts, count,
            MODE=mode, TRAIN=train, HAS_W=has_w, BU=bu, BW=bw, ACC=tl_acc, **options(bu * bw))

    def _bn_grad_partials(self, k, lay, xa, dya, ya, mask, w, has_w, sh, ms, rs, train, tl_acc):
        """BatchNorm's partial sums ``(part, split)`` per channel: Σdy' and Σdy'·x̂, split over programs."""
        s: ChannelShape = lay.shape
        c = s.channels
        target = launch.target_programs(xa)
        if lay.family == CHANNEL_PLANES:
            n, sp = s.n, s.spatial
            bp, bq = block2d(n, sp, launch.BLOCK)
            split = split_programs(c, cdiv(n, bp) * cdiv(sp, bq), target)
            part = torch.empty(2, c, split, dtype=rs.dtype, device=xa.device)
            k["_planar_sums"][(c, split)](
                xa, dya, ya, w, sh, ms, rs, part, c, n, sp, 0, sp, c, c * sp, c, 1, split,
                STAT_P=False, WEIGHT=False, SCALE=True, TRAIN=train, MASK=mask, HAS_W=has_w,
                BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
            return part, split
        m = xa.numel() // c
        bm, bc, col_blocks = self._cols_tiles(m, c)
        split = split_programs(col_blocks, cdiv(m, bm), target)
        part = torch.empty(2, c, split, dtype=rs.dtype, device=xa.device)
        k["_cols_sums"][(col_blocks, split)](
            xa, dya, ya, sh, ms, rs, part, m, c, split, 1, 1,
            STAT_ROW=False, TRAIN=train, MASK=mask, BM=bm, BC=bc, ACC=tl_acc, **options(bm * bc))
        return part, split

    def _bn_dx(self, k, lay, xa, dya, ya, mask, dx, dres, w, has_w, sh, ms, consts, train, tl_acc):
        """BatchNorm's dx pass from the per-channel constants ``consts`` (and the residual's gradient)."""
        s: ChannelShape = lay.shape
        c = s.channels
        if lay.family == CHANNEL_PLANES:
            n, sp = s.n, s.spatial
            bp, bq = block2d(n, sp, launch.BLOCK)
            split = split_programs(c, cdiv(n, bp) * cdiv(sp, bq), launch.target_programs(xa))
            k["_dx_planar"][(c, split)](
                xa, dya, ya, dx, dres if dres is not None else dx, w, sh, ms, consts, c, n, sp, sp, c * sp, c, 1,
                split, WEIGHT=False, TRAIN=train, MASK=mask, DRES=dres is not None, HAS_W=has_w,
                BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
            return
        m = xa.numel() // c
        bm, bc, col_blocks = self._cols_tiles(m, c)
        k["_dx_cols"][(cdiv(m, bm) * col_blocks,)](
            xa, dya, ya, dx, dres if dres is not None else dx, sh, ms, consts, m, c,
            TRAIN=train, MASK=mask, DRES=dres is not None, BM=bm, BC=bc, ACC=tl_acc, **options(bm * bc))

    def _bn_backward(self, k, lay, xa, dya, ya, mask, dx, dres, dw, db, w, has_w, sh, ms, rs, train, need,
                     tl_acc):
        c = lay.units
        consts = torch.empty(3, c, dtype=dw.dtype, device=xa.device)
        part, split = consts, 0
        if train or need[1] or need[2]:
            part, split = self._bn_grad_partials(k, lay, xa, dya, ya, mask, w, has_w, sh, ms, rs, train, tl_acc)
        self._finish_sums(k, part, c * max(split, 1), max(split, 1), 1, split, c, w, has_w, rs, db, dw, consts,
                          xa.numel() // c, 1, train, tl_acc)
        if dx is not None:
            self._bn_dx(k, lay, xa, dya, ya, mask, dx, dres, w, has_w, sh, ms, consts, train, tl_acc)

    def _rows_backward(self, k, lay, xa, dya, ya, mask, dx, dres, dw, db, w, has_w, sh, ms, rs, train, need,
                       tl_acc):
        s: RowShape = lay.shape
        need_x, need_p = need[0], need[1] or need[2]
        nparam = s.groups * s.per_row
        target = launch.target_programs(xa)
        bp, bq = pow2(s.per_row), pow2(s.run)
        if whole_rows(bp, bq, xa.dtype):
            per_group = max(1, min(s.rows // s.groups, cdiv(target, s.groups)))
            nprog = per_group * s.groups
            part = torch.empty(2, nprog, s.per_row, dtype=dw.dtype, device=xa.device) if need_p else dw
            k["_row_backward_tile"][(nprog,)](
                xa, dya, dx if dx is not None else xa, w, sh, ms, rs, part, s.rows, s.size, s.per_row, s.run,
                s.groups, nprog, TRAIN=train, NEED_X=need_x, NEED_P=need_p, HAS_W=has_w, BP=bp, BQ=bq, ACC=tl_acc,
                **options(bp * bq))
            if need_p:
                self._finish_sums(k, part, nprog * s.per_row, 1, nparam, per_group, nparam, w, has_w, rs, db, dw,
                                  dw, 1, 0, train, tl_acc)
            return
        bp, bq = block2d(s.per_row, s.run, launch.BLOCK)
        tiles = cdiv(s.per_row, bp) * cdiv(s.run, bq)
        if need_x:
            consts = torch.empty(3, s.rows, dtype=dw.dtype, device=xa.device)
            part, split = consts, 0
            if train:
                split = split_programs(s.rows, tiles, target)
                part = torch.empty(2, s.rows, split, dtype=dw.dtype, device=xa.device)
                k["_planar_sums"][(s.rows, split)](
                    xa, dya, xa, w, sh, ms, rs, part, s.rows, s.per_row, s.run, s.size, 0, 1, s.run,
                    s.groups, s.per_row, split, STAT_P=False, WEIGHT=True, SCALE=False, TRAIN=True, MASK=False,
                    HAS_W=has_w, BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
            self._finish_sums(k, part, s.rows * max(split, 1), max(split, 1), 1, split, s.rows, w, has_w, rs, dw,
                              dw, consts, s.size, 2, train, tl_acc)
            split = split_programs(s.rows, tiles, target)
            k["_dx_planar"][(s.rows, split)](
                xa, dya, xa, dx, dx, w, sh, ms, consts, s.rows, s.per_row, s.run, s.size, s.run, s.groups,
                s.per_row, split, WEIGHT=True, TRAIN=train, MASK=False, DRES=False, HAS_W=has_w,
                BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
        if not need_p:
            return
        outer = s.rows // s.groups  # samples: parameter (g, j) has one run of values in each
        if s.run == 1:  # every value its own parameter: column sums of the (outer, groups·per_row) matrix
            bc = min(pow2(nparam), launch.COLUMNS)
            bm = max(1, min(pow2(outer), launch.BLOCK // bc))
            col_blocks = cdiv(nparam, bc)
            split = split_programs(col_blocks, cdiv(outer, bm), target)
            part = torch.empty(2, nparam, split, dtype=dw.dtype, device=xa.device)
            k["_cols_sums"][(col_blocks, split)](
                xa, dya, xa, sh, ms, rs, part, outer, nparam, split, s.groups, s.per_row,
                STAT_ROW=True, TRAIN=train, MASK=False, BM=bm, BC=bc, ACC=tl_acc, **options(bm * bc))
        else:  # parameter (g, j): an (outer, run) block with rows groups·K apart
            bp, bq = block2d(outer, s.run, launch.BLOCK)
            split = split_programs(nparam, cdiv(outer, bp) * cdiv(s.run, bq), target)
            part = torch.empty(2, nparam, split, dtype=dw.dtype, device=xa.device)
            k["_planar_sums"][(nparam, split)](
                xa, dya, xa, w, sh, ms, rs, part, nparam, outer, s.run, s.size, s.run, s.per_row,
                s.groups * s.size, s.groups, s.per_row, split, STAT_P=True, WEIGHT=False, SCALE=True,
                TRAIN=train, MASK=False, HAS_W=has_w, BP=bp, BQ=bq, ACC=tl_acc, **options(bp * bq))
        self._finish_sums(k, part, nparam * split, split, 1, split, nparam, w, has_w, rs, db, dw, dw, 1, 0, train,
                          tl_acc)
