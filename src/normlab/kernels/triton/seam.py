"""The Triton backend's statistics seam (BatchNorm plans): BatchNorm's training step as partial statistics →
the caller's combine → apply (:mod:`normlab.core.stats` states the steps; :class:`normlab.core.backend.Backend`
the methods).

Each step runs the fused path's own passes (:class:`~normlab.kernels.triton.backend.TritonBackend`): the
moments kernel and the merge of its split partials (:func:`~normlab.kernels.triton.device._pack_moments`,
the merge ``_finish_moments`` does), the statistics from merged moments (``_finish_moments`` with
``MERGED``) and the normalizing pass; the backward's sums kernel, ``_finish_sums`` and the dx pass. With
one place and the identity combine the results are the fused path's, bit for bit.
"""

from __future__ import annotations

import torch

from normlab.core.conventions import accumulation_dtype
from normlab.core.guard import commit
from normlab.core.plan import Plan
from normlab.kernels.layout import ChannelShape
from normlab.kernels.triton.launch import Launch, cdiv, flat_param, flat_stat, on_device, options, pow2
from normlab.kernels.triton.runtime import kernels

__all__ = ["StatisticsSeam"]


def _seam_launch(x: torch.Tensor, plan: Plan) -> Launch:
    lay = Launch(x, plan)
    if not isinstance(lay.shape, ChannelShape):
        raise ValueError(f"the statistics seam takes BatchNorm plans (one statistic per channel), got {plan}")
    return lay


def _tl_acc(k, acc: torch.dtype):
    return k["tl"].float64 if acc == torch.float64 else k["tl"].float32


def _count(count: float) -> int | float:
    """A count as the kernels take it: an integer where it is one (as the fused path passes it)."""
    return int(count) if float(count).is_integer() else float(count)


class StatisticsSeam:
    """The seam's four methods, on the passes of :class:`~normlab.kernels.triton.backend.TritonBackend`."""

    def partial_moments(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """This place's per-channel ``(n, s, d, M2)`` as a (1, 4, C) float64 tensor, in the layout of
        :func:`normlab.core.stats.partial_moments`: the moments kernel's partials merged about the origin
        it chose (one of the channel's values), as the fused forward merges them."""
        lay = _seam_launch(x, plan)
        c = lay.units
        packed = torch.zeros(1, 4, c, dtype=torch.float64, device=x.device)
        if x.numel():
            k = kernels()
            acc = accumulation_dtype(x.dtype)
            xa = lay.prepare(x)
            origin = torch.empty(c, dtype=acc, device=x.device)
            with on_device(x):
                part, split = self._bn_partials(k, lay, xa, origin, _tl_acc(k, acc))
                bs = pow2(split)
                bu = max(1, min(pow2(c), 4096 // bs))
                k["_pack_moments"][(cdiv(c, bu),)](part, origin, packed, c, split, BU=bu, BS=bs,
                                                    **options(bu * bs))
            packed[0, 0] = xa.numel() // c
        return packed

    def apply_moments(self, x, weight, bias, merged, plan: Plan, eps: float, residual: torch.Tensor | None = None,
                      relu: bool = False, running=None):
        """:meth:`forward`'s results with the batch's statistics given: ``merged``, ``(N, K, D, σ²)`` per
        channel as :func:`normlab.core.stats.merge_moments` returns them. ``running`` (as the engine
        takes it) is updated with them through :func:`normlab.core.guard.commit`, the variance corrected
        with the whole batch's count N."""
        lay = _seam_launch(x, plan)
        c = lay.units
        acc = accumulation_dtype(x.dtype)
        k = kernels()
        tl_acc = _tl_acc(k, acc)
        xa = lay.prepare(x)
        given = torch.stack([torch.as_tensor(t).to(device=x.device, dtype=torch.float64).reshape(-1)
                             for t in merged]).contiguous()
        stats = torch.empty(4, c, dtype=acc, device=x.device)
        y = torch.empty_like(xa)
        with on_device(x):
            self._finish_moments(k, given, xa, xa, stats, c, 1, True, eps, tl_acc, merged=True)
            if x.numel():
                w, has_w = flat_param(weight, xa)
                b, has_b = flat_param(bias, xa)
                epi = 0 if not relu else 1 if residual is None else 2
                res = lay.prepare(residual) if epi == 2 else xa
                self._bn_apply(k, lay, xa, res, y, stats, w, has_w, b, has_b, epi, tl_acc)
        shift, mean_shifted, var, rstd = stats.view(4, *plan.stat_shape).unbind(0)
        total = int(given[0].max().item()) if c else 0
        if running is not None and total > 0:
            commit(running, shift + mean_shifted, var, total)
        return lay.finish(y), shift, mean_shifted, var, rstd

    def partial_grad_sums(self, dy, x, shift, mean_shifted, rstd, plan: Plan, y: torch.Tensor | None = None):
        """This place's per-channel ``(Σ dy', Σ dy' · x̂)`` as a (2, C) float64 tensor (its share of dβ and
        dγ, as the fused backward sums them); ``dy'`` is ``dy`` masked by ``y > 0`` after a fused ReLU."""
        lay = _seam_launch(x, plan)
        c = lay.units
        sums = torch.zeros(2, c, dtype=torch.float64, device=x.device)
        if x.numel():
            k = kernels()
            acc = accumulation_dtype(x.dtype)
            tl_acc = _tl_acc(k, acc)
            xa, dya = lay.prepare(x), lay.prepare(dy)
            ya = lay.prepare(y) if y is not None else xa
            sh, ms, rs = (flat_stat(t, acc, c) for t in (shift, mean_shifted, rstd))
            out = torch.empty(2, c, dtype=acc, device=x.device)
            with on_device(x):
                part, split = self._bn_grad_partials(k, lay, xa, dya, ya, y is not None, xa, False, sh, ms, rs, True,
                                                     tl_acc)
                self._finish_sums(k, part, c * split, split, 1, split, c, xa, False, rs, out[0], out[1], out[0],
                                  xa.numel() // c, 0, True, tl_acc)
            sums.copy_(out)
        return sums

    def apply_grad(self, dy, x, weight, shift, mean_shifted, rstd, totals: torch.Tensor, count: float, plan: Plan,
                   y: torch.Tensor | None = None, residual: bool = False):
        """∂L/∂x from the whole batch's ``totals`` (the combined :meth:`partial_grad_sums`) over ``count``
        values per channel; with ``y`` (a fused ReLU's output) ``(dx, dres)``, the residual's gradient
        after a fused add (``residual``) or ``None``."""
        lay = _seam_launch(x, plan)
        c = lay.units
        acc = accumulation_dtype(x.dtype)
        xa = lay.prepare(x)
        dx = torch.empty_like(xa)
        dres = torch.empty_like(xa) if residual else None
        if x.numel():
            k = kernels()
            tl_acc = _tl_acc(k, acc)
            dya = lay.prepare(dy)
            ya = lay.prepare(y) if y is not None else xa
            w, has_w = flat_param(weight, xa)
            sh, ms, rs = (flat_stat(t, acc, c) for t in (shift, mean_shifted, rstd))
            given = totals.to(device=x.device, dtype=acc).reshape(2, c).contiguous()
            consts = torch.empty(3, c, dtype=acc, device=x.device)
            scratch = torch.empty(2, c, dtype=acc, device=x.device)
            with on_device(x):  # the constants from the totals: the sum of one partial per channel is itself
                self._finish_sums(k, given, c, 1, 1, 1, c, w, has_w, rs, scratch[0], scratch[1], consts,
                                  _count(count), 1, True, tl_acc)
                self._bn_dx(k, lay, xa, dya, ya, y is not None, dx, dres, w, has_w, sh, ms, consts, True, tl_acc)
        dx = lay.finish(dx)
        return dx if y is None else (dx, dres if dres is None else lay.finish(dres))
