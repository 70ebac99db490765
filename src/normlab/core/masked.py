r"""Batch statistics over the valid positions of a padded batch.

Padded sequences (N, C, L) come with a mask (N, L), True where a position holds data. BatchNorm with a
mask takes its per-channel statistics over the valid positions only, which is BatchNorm of the valid
positions gathered into rows::

    rows = x[valid] ∈ R^{M×C}     (M = number of valid positions)
    y[valid] = BatchNorm(rows),    y[padded] = 0

and that is how it is computed: the valid positions are gathered (one indexed read), normalized by the
engine as a BatchNorm1d batch of M rows (on whichever backend runs it, with its running-statistics update
over exactly those M values per channel), and written back into a zero tensor of the input's shape and
memory layout. The backward is the composition's: BatchNorm's closed form over the M valid rows, whose
statistics see only them, scattered back; the padded positions get a zero gradient (their output is the
constant 0). With fixed statistics (eval mode) every position is normalized and the padded ones are set
to 0, the same output as gathering would give.

Padded outputs are 0 rather than "normalized with the batch's statistics" so that whatever a padded
position held (zeros, garbage, the previous sequence's values) cannot leak into the next layer.
"""

from __future__ import annotations

import torch

__all__ = ["check_mask", "gather_valid", "scatter_valid", "mask_like"]


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


def gather_valid(x: torch.Tensor, mask: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """The valid positions of ``x`` as rows (M, C); ``mask=None``: every position (a view where the
    layout allows)."""
    moved = x.movedim(channel_dim, -1)
    if mask is None:
        return moved.reshape(-1, x.shape[channel_dim])
    return moved[mask]


def scatter_valid(rows: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A tensor of ``like``'s shape and memory layout (``rows``' dtype): ``rows`` at the valid positions,
    0 at the others. Differentiable in ``rows``."""
    if mask is None:
        shape = tuple(like.movedim(channel_dim, -1).shape)
        return rows.reshape(shape).movedim(-1, channel_dim)
    out = torch.zeros_like(like, dtype=rows.dtype)
    out.movedim(channel_dim, -1)[mask] = rows
    return out


def mask_like(mask: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``mask`` with the channel axis put back (size 1), to broadcast against ``x``."""
    return mask.unsqueeze(channel_dim % x.dim())
