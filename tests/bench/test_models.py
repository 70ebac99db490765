"""End-to-end timings: the small CNN's training step."""

from __future__ import annotations

import pytest
import torch

import normlab.nn
from normlab.demo import small_cnn
from normlab import bench


def test_train_step_record():
    rec = bench.train_step(batch=8, repeats=1, warmup=0, threads=1)
    assert rec["op"] == "small_cnn" and rec["mode"] == "train_step" and rec["shape"] == [8, 1, 28, 28]
    assert rec["normlab_ms"] > 0 and rec["torch_ms"] > 0 and rec["threads"] == 1
    assert rec["ratio"] == pytest.approx(rec["torch_ms"] / rec["normlab_ms"])
    assert rec["fused_ms"] > 0 and rec["ratio_fused"] == pytest.approx(rec["torch_ms"] / rec["fused_ms"])
    line = bench.format_step(rec)
    assert "small_cnn" in line and "torch/normlab" in line and "BatchNormReLU2d" in line


def test_fused_small_cnn_is_the_same_function():
    """The CNN the end-to-end number times with BatchNormReLU2d computes what the drop-in one does."""
    torch.manual_seed(0)
    plain, fused = small_cnn(normlab.nn), small_cnn(normlab.nn, fused=True)
    assert sum(isinstance(m, normlab.nn.BatchNormReLU2d) for m in fused) == 2
    with torch.no_grad():
        for a, b in zip([*fused.parameters(), *fused.buffers()], [*plain.parameters(), *plain.buffers()]):
            a.copy_(b)
    x = torch.randn(8, 1, 28, 28)
    for model in (plain, fused):
        model(x).square().sum().backward()
    torch.testing.assert_close(fused(x), plain(x))
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    for a, b in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="BatchNormReLU2d"):
        small_cnn(torch.nn, fused=True)
