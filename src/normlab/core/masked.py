r"""Batch statistics over the valid positions of a padded batch.

Padded sequences (N, C, L) come with a mask (N, L), True where a position holds data. BatchNorm with a
mask takes its per-channel statistics over the valid positions only, which is BatchNorm of the valid
positions gathered into rows::

    rows = x[valid] ∈ R^{M×C}     (M = number of valid positions)
    y[valid] = BatchNorm(rows),    y[padded] = 0

and that is how it is computed: the valid positions are gathered (one indexed read), normalized by the
engine as a BatchNorm1d batch of M rows (on whichever backend runs it, with its running-statistics update
over exactly those M values per channel), and placed back into a tensor of the input's shape and memory
layout whose padded positions are set to 0 (each value written once). The backward is the composition's: BatchNorm's closed form over the M valid rows, whose
statistics see only them, scattered back; the padded positions get a zero gradient (their output is the
constant 0). With fixed statistics (eval mode) every position is normalized and the padded ones are set
to 0, the same output as gathering would give.

Padded outputs are 0 rather than "normalized with the batch's statistics" so that whatever a padded
position held (zeros, garbage, the previous sequence's values) cannot leak into the next layer.
"""

from __future__ import annotations

import torch

from normlab.core.conventions import is_channels_last

__all__ = ["check_mask", "gather_valid", "mask_like", "positions", "scatter_valid"]


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
