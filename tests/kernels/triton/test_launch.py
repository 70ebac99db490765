"""The Triton backend's launch heuristics and layout decision (normlab.kernels.triton.launch); plain Python,
no triton needed."""

import pytest
import torch

from normlab.core.plan import batch_plan, group_plan, layer_plan
from normlab.kernels.layout import CHANNEL_PLANES, CHANNEL_ROWS, ROW
from normlab.kernels.triton import launch
from normlab.kernels.triton.launch import Launch, block2d, eps_parts, origin_offsets, split_programs, whole_rows

CL = torch.channels_last


@pytest.mark.parametrize("plan, fmt, expected", [
    (batch_plan((8, 4, 5, 5)), None, CHANNEL_PLANES),
    (batch_plan((8, 4, 5, 5)), CL, CHANNEL_ROWS),
    (group_plan((2, 6, 3, 3), 3), CL, ROW),  # no in-place kernels for ROW_CHANNELS_LAST: copied, read as ROW
    (layer_plan((4, 7), (7,)), None, ROW),
])
def test_triton_launch_uses_the_layout_families(plan, fmt, expected):
    x = torch.randn(plan.input_shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    launch = Launch(x, plan)
    assert launch.family == expected
    assert launch.finish(launch.prepare(x)).is_contiguous(memory_format=fmt or torch.contiguous_format)


def test_tiles_and_splits():
    assert block2d(3, 1000, 2048) == (2, 1024)  # as wide as the columns allow, power-of-two tiles
    assert block2d(100, 3, 16) == (4, 4)
    assert split_programs(units=4, tiles=100, target=64) == 16
    assert split_programs(units=4, tiles=3, target=64) == 3  # at most one program per tile
    assert split_programs(units=1, tiles=10 ** 6, target=10 ** 6) == launch.MAX_SPLIT


def test_whole_rows_limit():
    assert whole_rows(1, launch.ROW_TILE, torch.float32) and not whole_rows(2, launch.ROW_TILE, torch.float32)
    assert not whole_rows(1, launch.ROW_TILE, torch.float64) and whole_rows(1, launch.ROW_TILE // 2, torch.float64)
    assert not whole_rows(launch.ROW_TILE // 4, 4, torch.float32)  # tall, narrow tiles: half the limit
    assert whole_rows(launch.ROW_TILE // 8, 4, torch.float32)


def test_origin_offsets_and_eps_parts():
    assert origin_offsets(3, 4, 10) == (10 + 2, 20 + 3)  # middle value 6 → row 1, col 2; last 11 → row 2, col 3
    hi, lo = eps_parts(1e-5)
    assert hi + lo == 1e-5 and hi == float(torch.tensor(1e-5, dtype=torch.float32))
