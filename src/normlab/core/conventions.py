"""The conventions every backend follows, decided here once: the dtype statistics accumulate in, which
memory format a result keeps, and what an empty batch's statistics are.

* Accumulation: float64 stays float64; float32, float16 and bfloat16 accumulate in float32 (half
  precision is computed in float32 and returned in its own dtype).
* Memory format: a result has its input's shape, dtype and memory format. An input is *channels_last*
  when it is stored so (4D ``torch.channels_last``, 5D ``torch.channels_last_3d``) and not also
  contiguous (a tensor with one channel, or 1x1 maps, is both: it counts as contiguous).
* Empty batch: the statistics of nothing are shift 0, mean 0 and variance 1 (so rstd = 1/sqrt(1 + eps)
  and no NaN appears); they are never written to running statistics.
"""

from __future__ import annotations

import torch

__all__ = ["CHANNELS_LAST", "EMPTY_STATISTICS", "accumulation_dtype", "channels_last_format", "fill_empty_statistics",
           "is_channels_last"]

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
"""The channels_last memory format of an input of each number of dimensions that has one."""

EMPTY_STATISTICS = (0.0, 0.0, 1.0)
"""``(shift, mean_shifted, var)`` of an empty batch."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channels_last_format(x: torch.Tensor) -> torch.memory_format | None:
    """``x``'s channels_last memory format if it is stored channels_last (and not also contiguous), else
    ``None``: the format a result computed for ``x`` must be given back in."""
    fmt = CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return None


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is stored channels_last (and not also contiguous); see :func:`channels_last_format`."""
    return channels_last_format(x) is not None


def fill_empty_statistics(stats) -> None:
    """Write an empty batch's ``(shift, mean_shifted, var)`` into rows 0 to 2 of ``stats`` (an array or tensor
    with one row per statistic)."""
    for row, value in enumerate(EMPTY_STATISTICS):
        stats[row] = value
