"""Launch heuristics of the Triton backend: tile sizes, programs per statistic, warps per program, and how
a call's tensors are laid out for the kernels (:class:`Launch`, in :mod:`normlab.kernels.layout`'s families).

The tile sizes and program counts are module attributes read at every call (the tests shrink them). They
have not been tuned on a GPU; see benchmarks/README.md ("Triton: tiles and registers") for what
:mod:`.compile` measured of them.
"""

from __future__ import annotations

import contextlib
import functools
import struct

import torch

from normlab.core.conventions import CHANNELS_LAST, is_channels_last
from normlab.core.plan import Plan
from normlab.kernels.layout import CHANNEL_ROWS, ROW, ROW_CHANNELS_LAST, ChannelShape, classify, family

__all__ = [
    "BLOCK", "COLUMNS", "ROW_TILE", "MAX_SPLIT", "PROGRAMS_PER_SM", "INTERPRETER_PROGRAMS", "Launch", "on_device",
    "flat_param", "flat_stat",
]

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


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block2d(p: int, q: int, block: int) -> tuple[int, int]:
    """Tile shape (BP, BQ) for a (p, q) block with contiguous columns: as wide as the columns allow."""
    bq = min(pow2(q), block)
    return max(1, min(pow2(p), block // bq)), bq


def whole_rows(bp: int, bq: int, dtype: torch.dtype) -> bool:
    """Whether rows padded to (bp, bq) tiles (parameters x values per parameter) go to the whole-row
    kernels: up to :data:`ROW_TILE` values, half that in float64 (twice the registers per value), and
    half again for tiles of 2 to 8 values per parameter, whose backward (the per-parameter sums of a tall,
    narrow tile) spills at the full size (benchmarks/README.md, "Triton: tiles and registers")."""
    limit = ROW_TILE // 2 if dtype == torch.float64 else ROW_TILE
    if 1 < bq < 16:
        limit //= 2
    return bp * bq <= limit


def warps(elements: int) -> int:
    return max(1, min(16, elements // 256))


def options(elements: int) -> dict:
    """The options of a launch whose tile holds ``elements`` values: one warp per 256 of them (1 to 16),
    and :data:`_OPTIONS`."""
    return dict(num_warps=warps(elements), **_OPTIONS)


@functools.cache
def multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(x: torch.Tensor) -> int:
    if x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_SM * multiprocessors(index)
    return INTERPRETER_PROGRAMS


def split_programs(units: int, tiles: int, target: int) -> int:
    """Programs per unit so that ``units · split`` is about ``target`` (at most one per tile)."""
    return max(1, min(tiles, MAX_SPLIT, cdiv(target, units)))


def origin_offsets(p: int, q: int, s_p: int) -> tuple[int, int]:
    """Offsets of the middle and last values of a (p, q) block whose rows are ``s_p`` apart (Python
    integers: Triton passes them as 64-bit where they need it)."""
    mid, last = (p * q) // 2, p * q - 1
    return (mid // q) * s_p + mid % q, (last // q) * s_p + last % q


def eps_parts(eps: float) -> tuple[float, float]:
    """``eps`` as two float32 scalars whose sum is ``eps`` to about 48 bits (Triton passes floats as
    float32), so that float64 statistics use it at float64 precision."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi



def on_device(x: torch.Tensor):
    """The context in which to launch kernels on ``x``: its CUDA device (nothing for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def flat_param(p: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """γ or β flat and contiguous, and whether there is one (``dummy`` stands in for none)."""
    return (dummy, False) if p is None else (p.detach().contiguous().reshape(-1), True)


def flat_stat(t: torch.Tensor | None, acc: torch.dtype, count: int) -> torch.Tensor | None:
    """A saved statistic as a flat ``count``-long tensor in ``acc`` (per-channel fixed statistics repeated
    for every row where each sample has its own)."""
    if t is None:
        return None
    t = t.detach().reshape(-1).to(acc).contiguous()
    return t if t.numel() == count else t.repeat(count // t.numel())


class Launch:
    """How one call's tensors are laid out for the kernels: the plan's :func:`~normlab.kernels.layout.classify`
    shape and its :func:`~normlab.kernels.layout.family` (:data:`~normlab.kernels.layout.ROW_CHANNELS_LAST`
    input, which these kernels do not read in place, is copied to contiguous and read as ``ROW``)."""

    def __init__(self, x: torch.Tensor, plan: Plan):
        shape = classify(plan)
        if shape is None:
            raise ValueError(f"plan not handled by the triton kernels: {plan}")
        self.shape = shape
        self.channels_last = is_channels_last(x)
        kind = family(plan, self.channels_last)
        self.family = ROW if kind == ROW_CHANNELS_LAST else kind
        self.units = shape.channels if isinstance(shape, ChannelShape) else shape.rows

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the memory layout the kernels read: channels_last kept for BatchNorm, else contiguous."""
        t = t.detach()
        if self.family == CHANNEL_ROWS and self.channels_last:
            return t.contiguous(memory_format=CHANNELS_LAST[t.dim()])
        return t.contiguous()

    def finish(self, t: torch.Tensor) -> torch.Tensor:
        """A kernel output back in the input's memory format (per-row plans compute on contiguous data)."""
        if self.family == ROW and self.channels_last:
            return t.contiguous(memory_format=CHANNELS_LAST[t.dim()])
        return t
