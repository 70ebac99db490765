"""Recycled memory for the kernels' outputs (``y`` forward, ``dx`` backward).

A tensor of more than 32 MiB gets fresh pages from the operating system at every allocation (glibc
serves it with ``mmap`` and returns it with ``munmap``), and writing those pages the first time costs
more than the normalization itself; smaller outputs come from glibc's heap, but in a layer's forward
and backward, between other allocations, not always from pages already touched (benchmarks/README.md,
"Recycled output memory").

So outputs of at least :data:`MIN_BYTES` are carved from blocks that this module keeps: a block is handed
out as a tensor (through a NumPy view that holds a reference to it) and is free again as soon as no
tensor or view of it is left. Blocks of the exact size asked for are reused; the pool holds at most
``NORMLAB_BUFFER_POOL_MB`` MiB (default 1024; 0 turns it off), dropping free blocks, oldest first, to make
room, and allocating as torch does when every block is in use and no room is left. :func:`release`
returns the free blocks to the system.

On Linux, blocks of at least :data:`HUGE_BYTES` start on a 2 MiB boundary and ask the kernel for
transparent huge pages (``madvise(MADV_HUGEPAGE)``, where the system's THP setting is ``madvise``): a
16 MiB output then takes 8 TLB entries rather than 4096. Where the kernel refuses, the block stays an
ordinary one.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import numpy as np
import torch

__all__ = ["HUGE_BYTES", "MIN_BYTES", "empty_like", "pool_limit", "release"]

MIN_BYTES = 256 << 10
"""Smaller outputs are allocated by torch: glibc recycles them, and the pool's bookkeeping would cost
more than it could save."""

HUGE_BYTES = 4 << 20
"""Blocks this large are aligned to a huge page and advised to use huge pages (Linux)."""

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
# Each entry is (memory, offset, nbytes): the block is memory[offset:offset + nbytes]. Views handed out
# reference ``memory`` (NumPy's views point at the array that owns the memory), so a block is free when
# nothing but its entry refers to it.
_blocks: list[tuple[np.ndarray, int, int]] = []
_held = [0]  # bytes in _blocks


def pool_limit() -> int:
    """The pool's capacity in bytes, from ``NORMLAB_BUFFER_POOL_MB`` (read at every allocation)."""
    return _mib_to_bytes(os.environ.get("NORMLAB_BUFFER_POOL_MB", "1024"))


@functools.lru_cache(maxsize=8)
def _mib_to_bytes(text: str) -> int:
    return int(float(text) * (1 << 20))


def _free(i: int) -> bool:
    # A free block's memory is referenced by its entry and by getrefcount's own argument only.
    return sys.getrefcount(_blocks[i][0]) == 2


def _view(entry: tuple[np.ndarray, int, int]) -> np.ndarray:
    memory, offset, nbytes = entry
    return memory[offset:offset + nbytes]


def _madvise():
    """libc's ``madvise``, or ``None`` where there is none to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def _footprint(nbytes: int) -> int:
    """The bytes a new block of ``nbytes`` takes: room to align it to a huge page from :data:`HUGE_BYTES` on."""
    return nbytes + _HUGE_PAGE if nbytes >= HUGE_BYTES and _MADVISE is not None else nbytes


def _new_entry(nbytes: int) -> tuple[np.ndarray, int, int]:
    """Fresh memory for a block of ``nbytes``: huge-page aligned and advised from :data:`HUGE_BYTES` on."""
    if _footprint(nbytes) == nbytes:
        return np.empty(nbytes, dtype=np.uint8), 0, nbytes
    memory = np.empty(_footprint(nbytes), dtype=np.uint8)
    offset = -memory.ctypes.data % _HUGE_PAGE
    _MADVISE(memory.ctypes.data + offset, nbytes, _MADV_HUGEPAGE)  # a refusal leaves ordinary pages
    return memory, offset, nbytes


def _block(nbytes: int) -> np.ndarray | None:
    """A free block of ``nbytes`` bytes (moved to the end of the list: most recently used), or ``None``."""
    limit = pool_limit()
    if _held[0] > limit:
        _trim(limit)
    for i in range(len(_blocks)):
        if _blocks[i][2] == nbytes and _free(i):
            _blocks.append(_blocks.pop(i))
            return _view(_blocks[-1])
    need = _footprint(nbytes)
    if _held[0] + need > limit and _trim(limit - need) + need > limit:
        return None
    _blocks.append(_new_entry(nbytes))
    _held[0] += _blocks[-1][0].nbytes
    return _view(_blocks[-1])


def _trim(limit: int) -> int:
    """Drop free blocks, oldest first, until the pool holds at most ``limit`` bytes (or none is free);
    returns the bytes still held."""
    i = 0
    while _held[0] > limit and i < len(_blocks):
        if _free(i):
            _held[0] -= _blocks.pop(i)[0].nbytes
        else:
            i += 1
    return _held[0]


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` for a float32/float64 CPU tensor that is contiguous or channels_last,
    served from the pool when it is large enough."""
    nbytes = t.numel() * t.element_size()
    if nbytes < MIN_BYTES:
        return torch.empty_like(t)
    block = _block(nbytes) if t.dtype in _NUMPY else None
    if block is None:
        return torch.empty_like(t)
    # t is dense (contiguous or channels_last): its own strides lay the block out the same way
    return torch.from_numpy(block.view(_NUMPY[t.dtype])).as_strided(t.shape, t.stride())


def release() -> None:
    """Drop every free block: its memory goes back to the system."""
    _trim(0)
