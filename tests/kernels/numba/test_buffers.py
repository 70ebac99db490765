"""The pool that recycles the memory of large kernel outputs."""

import sys

import pytest
import torch

from normlab.kernels.numba import buffers

BIG = (buffers.MIN_BYTES // 4 // 64, 4, 4, 4)  # float32, exactly MIN_BYTES


@pytest.fixture(autouse=True)
def empty_pool():
    buffers.release()
    yield
    buffers.release()


def test_memory_is_reused_only_once_free():
    x = torch.empty(BIG)
    a = buffers.empty_like(x)
    b = buffers.empty_like(x)
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    view = a[1:]
    del a
    assert buffers.empty_like(x).data_ptr() not in (ptr, b.data_ptr())  # a's view keeps it
    del view
    assert buffers.empty_like(x).data_ptr() == ptr


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layout_and_dtype_are_those_of_the_model(fmt, dtype):
    x = torch.empty(BIG, dtype=dtype).contiguous(memory_format=fmt)
    y = buffers.empty_like(x)
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == dtype
    y.copy_(torch.arange(x.numel(), dtype=dtype).reshape(x.shape))
    assert torch.equal(y, torch.arange(x.numel(), dtype=dtype).reshape(x.shape))


def test_small_outputs_and_a_full_pool_fall_back_to_torch(monkeypatch):
    small = torch.empty(10, 3)
    assert buffers.empty_like(small).shape == small.shape
    assert not buffers._blocks
    monkeypatch.setenv("NORMLAB_BUFFER_POOL_MB", str(buffers.MIN_BYTES / 2**20 * 1.5))
    x = torch.empty(BIG)
    a = buffers.empty_like(x)
    b = buffers.empty_like(x)  # no room left: torch's own memory
    assert len(buffers._blocks) == 1 and b.shape == x.shape
    del a
    buffers.empty_like(x)
    monkeypatch.setenv("NORMLAB_BUFFER_POOL_MB", "0")
    buffers.empty_like(x)
    assert not buffers._blocks  # the free block was dropped to respect the new limit


def test_large_blocks_start_on_a_huge_page_and_are_recycled_like_the_others():
    x = torch.empty(buffers.HUGE_BYTES // 4)
    a = buffers.empty_like(x)
    if sys.platform.startswith("linux"):
        assert a.data_ptr() % (2 << 20) == 0
    a.fill_(3.0)
    ptr = a.data_ptr()
    view = a[5:]
    del a
    b = buffers.empty_like(x)
    ptr_b = b.data_ptr()
    assert ptr_b != ptr  # the view keeps the first block in use
    del view, b
    assert buffers.empty_like(x).data_ptr() in (ptr, ptr_b)
    assert len(buffers._blocks) == 2
    buffers.release()
    assert not buffers._blocks and buffers._held[0] == 0


def test_the_pool_limit_counts_the_alignment_room(monkeypatch):
    x = torch.empty(buffers.HUGE_BYTES // 4)
    monkeypatch.setenv("NORMLAB_BUFFER_POOL_MB", str(buffers.HUGE_BYTES / 2**20 + 0.5))
    assert buffers.empty_like(x).shape == x.shape
    assert not buffers._blocks  # a block and its alignment room would not fit: torch's own memory
