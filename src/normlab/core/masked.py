r"""Batch statistics over the valid positions of a padded batch.

Padded sequences (N, C, L) come with a mask (N, L), True where a position holds data. BatchNorm with a
mask takes its per-channel statistics over the valid positions only: the M valid positions of a channel
are its batch. It is computed as a step of the statistics seam (:mod:`normlab.core.stats`), on the
input read as rows (R, C) (a view for channels-last storage: (N, L, C) sequences, channels_last images,
(N, C); a copy otherwise)::

    partial   (n, s, d, M2) over the valid rows    :func:`~normlab.core.stats.masked_partial_moments`
    combine   one place: the identity
    merge     Chan et al.                          :func:`~normlab.core.stats.merge_moments`
    apply     y = γ (x − μ) · rstd + β at the valid rows,  y = 0 at the padded ones

Nothing is gathered: the padded rows are set to 0 before each sum (whatever they hold, NaN included,
takes no part) and in the output. The backward is BatchNorm's closed form over the valid rows
(:func:`~normlab.core.stats.partial_grad_sums`, :func:`~normlab.core.stats.apply_backward`, count M),
with the padded rows of ∂L/∂y ignored and a zero gradient at the padded positions (their output is the
constant 0). A double backward recomputes the same steps with differentiable operations. With fixed
statistics (eval mode) every position is normalized and the padded ones are set to 0.

The result equals BatchNorm of the valid positions gathered into rows and placed back into zeros
(outputs, gradients, running statistics), which is how the tests check it. A kernel backend whose seam
takes a mask (:func:`~normlab.core.backend.seam_takes`: the numba kernels) runs the same steps with its
own kernels: partial moments and gradient sums over the runs of valid rows, an applying pass that writes
0 at the padded rows, the padded rows' values never read. A kernel backend without it gathers the valid
positions (:func:`gather_valid`, one indexed read), normalizes them with its fused BatchNorm kernels as M
rows, and places them back (:func:`scatter_valid`, each value written once). On the torch engine the
seam is 2–4x faster than gathering (``benchmarks/masked_seam.py``).

Padded outputs are 0 rather than "normalized with the batch's statistics" so that whatever a padded
position held (zeros, garbage, the previous sequence's values) cannot leak into the next layer.
"""

from __future__ import annotations

import torch

from normlab.core import stats
from normlab.core.backend import seam_takes
from normlab.core.conventions import channels_last_format, is_channels_last
from normlab.core.engine import _param, accumulation_dtype
from normlab.core.guard import commit
from normlab.core.plan import Plan, batch_plan

__all__ = ["check_mask", "gather_valid", "mask_like", "normalize_masked", "positions", "rows_of", "scatter_valid"]


def check_mask(mask, x: torch.Tensor, op: str, channel_dim: int) -> None:
    """``mask`` is a bool tensor on ``x``'s device whose shape is ``x``'s without the channel axis."""
    expected = tuple(s for d, s in enumerate(x.shape) if d != channel_dim % x.dim())
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a bool tensor of shape {expected}, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{op}: mask must have dtype torch.bool (True = a valid position, False = padding), got {mask.dtype}. "
            f"Convert it, e.g. mask.bool() or (lengths[:, None] > torch.arange(L))."
        )
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{op}: mask has shape {tuple(mask.shape)}, but input of shape {tuple(x.shape)} needs a mask of shape "
            f"{expected}: one entry per sample and position, without the channel axis."
        )
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but the input is on {x.device}; move it, e.g. "
                         f"mask.to(input.device).")


def positions(mask: torch.Tensor | None):
    """``(valid, padded, mask)``: the flat indices of the True and of the False entries of ``mask``, and the
    mask; ``None`` for no mask."""
    if mask is None:
        return None
    flat = mask.reshape(-1)
    return flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1), mask


def rows_of(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``x`` as rows (R, C), the channels last: a view where the storage has them last, else a copy."""
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


def _dense_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (``x``'s shape) in ``x``'s memory format: channels_last where ``x`` is, else contiguous."""
    fmt = channels_last_format(x)
    return t.contiguous() if fmt is None else t.contiguous(memory_format=fmt)


def _forward(rows, weight, bias, valid, padded, eps: float, plan: Plan, out=None):
    """The seam's steps on the rows: ``(y, shift, mean_shifted, var, rstd, total)``, ``y`` 0 at the padded
    rows (written into ``out`` if given; ``out=None``: differentiable operations), the statistics in
    ``plan.stat_shape`` and the accumulation dtype."""
    acc = accumulation_dtype(rows.dtype)
    packed, xs = stats.masked_partial_moments(rows.to(acc), valid, padded, out)
    total, common, mean, var = stats.merge_moments(stats.identity(packed))  # one place: xs is x − shift there
    shift, mean_shifted, var = (t.to(acc).reshape(plan.stat_shape) for t in (common, mean, var))
    rstd = torch.rsqrt(var + eps)
    # y = γ ((x − shift) − mean_shifted) rstd + β (the engine's normalize), in one pass over the shifted rows
    scale = rstd if weight is None else rstd * _param(weight, plan, acc)
    offset = -mean_shifted * scale
    if bias is not None:
        offset = offset + _param(bias, plan, acc)
    y = torch.addcmul(offset, xs, scale, out=out).index_fill_(0, padded, 0.0)
    return y, shift, mean_shifted, var, rstd, float(total.max().item())


def seam_takes_masks(backend, x: torch.Tensor, channels: int) -> bool:
    """Whether ``backend`` computes the masked statistics of ``x``'s rows (:func:`rows_of`, ``channels``
    wide) through its statistics seam: ``partial_moments`` … ``apply_grad`` taking ``mask=`` (an optional
    capability of :class:`~normlab.core.backend.Backend`), on a case it runs."""
    if not seam_takes(backend, "mask"):
        return False
    return backend.unsupported(x, batch_plan((max(2, x.numel() // max(1, channels)), channels))) is None


def _forward_seam(backend, rows, weight, bias, mask, eps: float, plan: Plan, running):
    """The seam's steps on ``backend``'s kernels: ``(y, shift, mean_shifted, rstd, total)``, ``running``
    updated (in the applying pass where the backend can) when some row is valid."""
    merged = stats.merge_moments(stats.identity(backend.partial_moments(rows, plan, mask=mask)))
    total = float(merged[0].max().item())
    if total <= 0:
        running = None
    folded = running is not None and getattr(backend, "updates_running", None) is not None and (
        backend.updates_running(rows, plan, running[0], running[1]))
    y, shift, mean_shifted, var, rstd = backend.apply_moments(rows, weight, bias, merged, plan, eps,
                                                              running=running if folded else None, mask=mask)
    if running is not None and not folded:
        commit(running, shift + mean_shifted, var, int(total))
    return y, shift, mean_shifted, rstd, total


class MaskedNormalize(torch.autograd.Function):
    """``y = MaskedNormalize.apply(rows, γ, β, valid, padded, eps, running, empty_like, backend)``: BatchNorm's
    training step on the rows (R, C) listed in ``valid``; the rows in ``padded`` give 0. ``running`` (a
    :class:`~normlab.core.guard.RunningUpdate`, or ``None``) is updated with the statistics of the valid
    rows when there is one. ``empty_like`` gives the memory of the output and of the input's gradient (a
    backend's recycled memory, or ``torch.empty_like``). ``backend``: one whose seam takes masks
    (:func:`seam_takes_masks`), whose kernels then run the steps, or ``None`` for the torch operations.
    See the module docstring."""

    @staticmethod
    def forward(ctx, rows, weight, bias, valid, padded, eps: float, running, empty_like, backend=None):
        plan = batch_plan(tuple(rows.shape))
        ctx.plan, ctx.eps, ctx.empty_like, ctx.backend = plan, eps, empty_like, backend
        if backend is not None:
            mask = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device).index_fill_(0, valid, True)
            y, shift, mean_shifted, rstd, total = _forward_seam(backend, rows, weight, bias, mask, eps, plan, running)
            ctx.save_for_backward(rows, weight, bias, valid, padded, shift, mean_shifted, rstd, mask)
            ctx.total = total
            return y
        out = empty_like(torch.empty(rows.shape, dtype=accumulation_dtype(rows.dtype), device=rows.device))
        y, shift, mean_shifted, var, rstd, total = _forward(rows, weight, bias, valid, padded, eps, plan, out)
        if running is not None and total > 0:
            commit(running, shift + mean_shifted, var, int(total))
        ctx.save_for_backward(rows, weight, bias, valid, padded, shift, mean_shifted, rstd)
        ctx.total = total
        return y.to(rows.dtype)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # read once: a checkpointed segment unpacks each saved tensor only once
        rows, weight, bias, valid, padded, shift, mean_shifted, rstd = saved[:8]
        plan: Plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a graph of the gradients is wanted: differentiate the steps themselves
            return _double_backward(ctx, saved, dy) + (None,) * 6
        if ctx.backend is not None:
            return _backward_seam(ctx, saved, dy) + (None,) * 6
        acc = accumulation_dtype(rows.dtype)
        dym, padded_sum = _valid_grad(dy.to(acc), padded, ctx.empty_like)
        xhat = ctx.empty_like(torch.empty(rows.shape, dtype=acc, device=rows.device))
        xhat = torch.sub(rows, shift, out=xhat)
        xhat = torch.addcmul(-(mean_shifted * rstd), xhat, rstd, out=xhat).index_fill_(0, padded, 0.0)
        sums = stats.partial_grad_sums(dym, xhat, None, plan)  # (Σ ∂L/∂y, Σ ∂L/∂y·x̂), the first over every row
        if padded_sum is not None:
            sums[0] -= padded_sum  # now both over the valid rows: ∂L/∂β and ∂L/∂γ
        dx = dw = db = None
        if need_x:
            w = _param(weight, plan, acc)
            total = stats.identity(sums if w is None else sums * w.reshape(-1))
            dx = stats.apply_backward(dym, xhat, rstd, w, total, max(ctx.total, 1.0), plan, out=xhat)
            dx = dx.index_fill_(0, padded, 0.0).to(rows.dtype)
        if need_w:
            dw = sums[1].to(weight.dtype)
        if need_b:
            db = sums[0].to(bias.dtype)
        return dx, dw, db, None, None, None, None, None, None


def _backward_seam(ctx, saved, dy):
    """:meth:`MaskedNormalize.backward` on the backend's kernels: the gradient sums over the valid rows
    (∂L/∂β, ∂L/∂γ), then ∂L/∂x from them (0 at the padded rows); ∂L/∂y at the padded rows is never read."""
    rows, weight, bias, _, _, shift, mean_shifted, rstd, mask = saved
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    backend, plan = ctx.backend, ctx.plan
    sums = backend.partial_grad_sums(dy, rows, shift, mean_shifted, rstd, plan, mask=mask)
    dx = dw = db = None
    if need_x:
        dx = backend.apply_grad(dy, rows, weight, shift, mean_shifted, rstd, stats.identity(sums),
                                max(ctx.total, 1.0), plan, mask=mask)
    if need_w:
        dw = sums[1].to(weight.dtype)
    if need_b:
        db = sums[0].to(bias.dtype)
    return dx, dw, db


def _valid_grad(dy: torch.Tensor, padded: torch.Tensor, empty_like) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g, padded_sum)``: ∂L/∂y as the backward reads it, and the per-channel sum of its padded rows, to take
    off Σ g (``None``: nothing to take off). Where the padded rows are finite, ``g`` is ``dy`` itself (they
    meet x̂ = 0 in Σ g·x̂ and their ∂L/∂x is set to 0 afterwards); else a copy with them set to 0."""
    pad = dy.index_select(0, padded)
    if bool(torch.isfinite(pad).all()):
        return dy, pad.sum(dim=0)
    return empty_like(torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)).copy_(dy).index_fill_(0, padded,
                                                                                                   0.0), None


def _double_backward(ctx, saved, dy):
    """The first derivatives as a differentiable function of the inputs (``create_graph=True``)."""
    rows, weight, bias, valid, padded = saved[:5]
    inputs = [t for t, need in zip((rows, weight, bias), ctx.needs_input_grad[:3]) if need]
    y = _forward(rows, weight, bias, valid, padded, ctx.eps, ctx.plan)[0].to(rows.dtype)
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:3])


def normalize_masked(x: torch.Tensor, index, channel_dim: int, weight, bias, eps: float, running=None,
                     empty_like=torch.empty_like, backend=None):
    """BatchNorm training forward of ``x`` over the positions ``index`` (from :func:`positions`) marks valid,
    channels on ``channel_dim``: an output of ``x``'s shape and memory format, 0 at the padded positions;
    ``running`` (or ``None``) updated with the valid positions' statistics. Differentiable in ``x``, γ, β;
    the output and the input's gradient are written into ``empty_like`` memory. ``backend``: one whose
    seam takes masks (:func:`seam_takes_masks`), or ``None``: the torch operations."""
    valid, padded, _ = index
    rows = rows_of(x, channel_dim)
    y = MaskedNormalize.apply(rows, weight, bias, valid, padded, float(eps), running, empty_like, backend)
    return _dense_like(y.reshape(x.movedim(channel_dim, -1).shape).movedim(-1, channel_dim), x)


def _take(t: torch.Tensor, index, channel_dim: int, empty_like) -> torch.Tensor:
    """The valid positions of ``t`` as (M, C) rows, read once (into ``empty_like`` memory)."""
    valid, _, mask = index
    moved = t.movedim(channel_dim, -1)
    if moved.is_contiguous():
        c = t.shape[channel_dim]
        out = empty_like(torch.empty((valid.numel(), c), dtype=t.dtype, device=t.device))
        return torch.index_select(moved.reshape(-1, c), 0, valid, out=out)
    return moved[mask]


def _place(rows: torch.Tensor, index, shape: torch.Size, strides: tuple[int, ...], channel_dim: int,
           empty_like) -> torch.Tensor:
    """A tensor of ``shape`` and ``strides`` (``rows``' dtype) with ``rows`` at the valid positions and 0 at
    the padded ones: every value written once, no zero-filled pass first."""
    valid, padded, mask = index
    out = empty_like(torch.empty_strided(shape, strides, dtype=rows.dtype, device=rows.device))
    moved = out.movedim(channel_dim, -1)
    if moved.is_contiguous():
        flat = moved.view(-1, rows.shape[1])
        flat.index_copy_(0, valid, rows)
        flat.index_fill_(0, padded, 0.0)
    else:
        moved[mask] = rows
        moved[~mask] = 0.0
    return out


class _Gather(torch.autograd.Function):
    """``rows = x[valid]`` as (M, C); the backward places the rows' gradient back (0 at padded positions)."""

    @staticmethod
    def forward(ctx, x, index, channel_dim, empty_like):
        ctx.index, ctx.channel_dim, ctx.empty_like = index, channel_dim, empty_like
        ctx.shape, ctx.strides = x.shape, x.stride()
        return _take(x, index, channel_dim, empty_like)

    @staticmethod
    def backward(ctx, grad_rows):
        grad = _Scatter.apply(grad_rows, ctx.index, ctx.shape, ctx.strides, ctx.channel_dim, ctx.empty_like)
        return grad, None, None, None


class _Scatter(torch.autograd.Function):
    """The inverse placement: ``rows`` at the valid positions of a tensor of ``shape``, 0 elsewhere."""

    @staticmethod
    def forward(ctx, rows, index, shape, strides, channel_dim, empty_like):
        ctx.index, ctx.channel_dim, ctx.empty_like = index, channel_dim, empty_like
        return _place(rows, index, shape, strides, channel_dim, empty_like)

    @staticmethod
    def backward(ctx, grad):
        return _Gather.apply(grad, ctx.index, ctx.channel_dim, ctx.empty_like), None, None, None, None, None


def _dense_strides(x: torch.Tensor) -> tuple[int, ...]:
    """``x``'s strides where it is channels_last, else the contiguous ones."""
    if is_channels_last(x):
        return x.stride()
    return torch.empty(x.shape, device="meta").stride()


def gather_valid(x: torch.Tensor, index, channel_dim: int, empty_like=torch.empty_like) -> torch.Tensor:
    """The valid positions of ``x`` as rows (M, C) (``index`` from :func:`positions`; ``None``: every
    position, a view where the layout allows). Differentiable; the backward writes ``empty_like`` memory."""
    if index is None:
        return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    return _Gather.apply(x, index, channel_dim, empty_like)


def scatter_valid(rows: torch.Tensor, index, like: torch.Tensor, channel_dim: int,
                  empty_like=torch.empty_like) -> torch.Tensor:
    """A tensor of ``like``'s shape and memory layout (``rows``' dtype): ``rows`` at the valid positions, 0
    at the others. Differentiable in ``rows``."""
    if index is None:
        return rows.reshape(like.movedim(channel_dim, -1).shape).movedim(-1, channel_dim)
    return _Scatter.apply(rows, index, like.shape, _dense_strides(like), channel_dim, empty_like)


def mask_like(mask: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``mask`` with the channel axis put back (size 1), to broadcast against ``x``."""
    return mask.unsqueeze(channel_dim % x.dim())
