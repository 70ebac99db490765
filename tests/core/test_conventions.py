"""The conventions every backend follows, decided once in normlab.core.conventions."""

import numpy as np
import pytest
import torch

import normlab.functional as F
from normlab.core.conventions import (
    EMPTY_STATISTICS, accumulation_dtype, channels_last_format, fill_empty_statistics, is_channels_last,
)


@pytest.mark.parametrize("dtype, acc", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                        (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_accumulation_dtype(dtype, acc):
    assert accumulation_dtype(dtype) == acc


def test_channels_last_detection():
    x = torch.randn(2, 3, 4, 5)
    assert channels_last_format(x) is None and not is_channels_last(x)
    assert channels_last_format(x.contiguous(memory_format=torch.channels_last)) == torch.channels_last
    x5 = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    assert channels_last_format(x5) == torch.channels_last_3d
    # one channel (or 1x1 maps): channels_last and contiguous at once, which counts as contiguous
    assert not is_channels_last(torch.randn(2, 1, 4, 5).contiguous(memory_format=torch.channels_last))
    assert not is_channels_last(torch.randn(2, 3, 1, 1).contiguous(memory_format=torch.channels_last))
    assert not is_channels_last(torch.randn(2, 3)) and not is_channels_last(torch.randn(2, 3, 4))


@pytest.mark.parametrize("make", [lambda: np.full((4, 3), np.nan), lambda: torch.full((4, 3), float("nan"))])
def test_fill_empty_statistics_writes_the_rows_of_shift_mean_and_variance(make):
    stats = make()
    fill_empty_statistics(stats)
    for row, value in enumerate(EMPTY_STATISTICS):
        assert (stats[row] == value).all()
    assert np.isnan(np.asarray(stats[3])).all()  # rstd is the caller's: 1/sqrt(var + eps)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_empty_batch_leaves_running_statistics_and_gives_an_empty_output(backend, monkeypatch):
    if backend == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("NORMLAB_BACKEND", backend)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = F.batch_norm(x, rm, rv, training=True)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
