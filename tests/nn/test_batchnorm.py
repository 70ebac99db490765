"""BatchNorm layers' per-call path: checks skipped on a call whose signature passed them before (results
bit-identical to the checked path, every error still raised), and small eval inputs sent to ATen (the answer
torch.nn gives, bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch

import normlab.nn as nl
from normlab.nn import batchnorm


def _unvalidated(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` with no remembered signature: its next call runs every check."""
    layer.__dict__.pop("_validated", None)
    layer.__dict__.pop("_validated_tensors", None)
    layer.__dict__.pop("_aten_eval", None)
    return layer


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("cls", [nl.BatchNorm2d, nl.BatchNormReLU2d])
def test_a_validated_training_call_is_bit_identical_to_a_checked_one(cls, layout):
    torch.manual_seed(0)
    fast = cls(8)
    checked = copy.deepcopy(fast)
    xs = [torch.randn(4, 8, 5, 5).contiguous(memory_format=layout) for _ in range(3)]
    for x in xs:
        outs = []
        for layer in (fast, _unvalidated(checked)):
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(torch.ones_like(y))
            outs.append((y, xi.grad, layer.weight.grad.clone(), layer.running_mean.clone(),
                         layer.running_var.clone(), layer.num_batches_tracked.clone()))
            layer.zero_grad()
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    assert "_validated" in fast.__dict__


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(32, 512, 7, 7), (8, 64, 16, 16), (3, 8, 4, 4)])
def test_small_eval_is_torch_nn_bit_for_bit(shape, layout):
    torch.manual_seed(1)
    ours, theirs = nl.BatchNorm2d(shape[1]), torch.nn.BatchNorm2d(shape[1])
    for layer in (ours, theirs):
        layer.load_state_dict({k: v + torch.rand_like(v.float()).to(v.dtype) for k, v in theirs.state_dict().items()})
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = (3 * torch.randn(shape) + 1).contiguous(memory_format=layout)
    with torch.no_grad():
        first, second = ours(x), ours(x)  # the first validates, the second goes to ATen
        assert ours.__dict__["_aten_eval"]
        assert torch.equal(second, theirs(x)) and second.is_contiguous(memory_format=layout)
        torch.testing.assert_close(first, second)  # normlab's own kernel: the same function, rounded its way


def test_fused_layers_in_eval_are_the_torch_composition_bit_for_bit():
    torch.manual_seed(2)
    bn = torch.nn.BatchNorm2d(8).eval()
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    relu, add_relu = nl.BatchNormReLU2d(8).eval(), nl.BatchNormAddReLU2d(8).eval()
    relu.load_state_dict(bn.state_dict()), add_relu.load_state_dict(bn.state_dict())
    x, r = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        relu(x), add_relu(x, r)  # validated on normlab's path, then ATen's
        assert torch.equal(relu(x), torch.relu(bn(x)))
        assert torch.equal(add_relu(x, r), torch.relu(bn(x) + r))
        assert add_relu.__dict__["_aten_eval"]
        torch.testing.assert_close(add_relu(x, r[:1]), torch.relu(bn(x) + r[:1]))  # broadcast: the engine's path


def test_what_stays_on_normlabs_path():
    """Large inputs, float64, eval with a gradient to record, and running statistics absent."""
    layer = nl.BatchNorm2d(64).eval()
    with torch.no_grad():
        layer(torch.randn(64, 64, 32, 32))  # 16 MiB
        assert not layer.__dict__["_aten_eval"]
        layer.double()(torch.randn(2, 64, 4, 4, dtype=torch.float64))
        assert not layer.__dict__["_aten_eval"]
    layer = nl.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    layer(x), layer(x).sum().backward()  # recorded: normlab's engine, with its backward
    assert not batchnorm._aten_eval_now(x, layer.weight, layer.bias) and x.grad is not None
    assert not nl.BatchNorm2d(4, track_running_stats=False).eval().__dict__.get("_aten_eval")


@pytest.mark.parametrize("train", [True, False])
def test_every_check_still_raises_after_a_validated_call(train):
    layer = nl.BatchNorm2d(4).train(train)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        layer(x), layer(x)
        with pytest.raises(ValueError):
            layer(torch.randn(2, 5, 3, 3))  # wrong channel count
        with pytest.raises(ValueError):
            layer(torch.randn(4, 3, 3))  # wrong rank
        with pytest.raises((TypeError, RuntimeError)):
            layer(torch.ones(2, 4, 3, 3, dtype=torch.int64))
        layer(x)
        layer.eps = -1.0
        with pytest.raises(ValueError, match="eps"):
            layer(x)
        layer.eps = 1e-5
        layer(x)
        layer.running_mean = torch.zeros(5)
        with pytest.raises((ValueError, RuntimeError)):
            layer(x)
        layer.running_mean = torch.zeros(4)
        layer(x)
        if train:
            layer.momentum = 2.0
            with pytest.raises(ValueError, match="momentum"):
                layer(x)
            layer.momentum = 0.1
            with pytest.raises(ValueError):
                layer(torch.randn(1, 4, 1, 1))  # one value per channel in training


def test_a_large_offset_stays_on_normlabs_kernel_and_keeps_its_precision():
    """1e4 + N(0, 1e-2) with matching running statistics: ATen's eval would round mean·α (≈ 1e6) first."""
    torch.manual_seed(3)
    x = 1e4 + 1e-2 * torch.randn(8, 4, 6, 6)
    layer = nl.BatchNorm2d(4).eval()
    layer.running_mean.fill_(1e4), layer.running_var.fill_(1e-4)
    with torch.no_grad():
        layer(x), layer(x)
        assert layer.__dict__["_aten_eval"] is None
        exact = (x.double() - 1e4) / (1e-4 + 1e-5) ** 0.5
        assert (layer(x).double() - exact).abs().max() < 1e-4
        layer.running_mean.zero_(), layer.running_var.fill_(1.0)  # in place: decided again
        layer(x)
        assert layer.__dict__["_aten_eval"] is not None



def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst difference from ``ref`` over ``ref``'s largest magnitude."""
    return float((a.detach().double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("offset", [0.0, 8.0])
def test_small_channels_last_training_calls_keep_float32_accuracy(offset):
    """Training calls stay on normlab's kernels at every size: ATen's channels_last training kernel sums in
    float32 and lands 5–20x further from float64 on this input (y 1e-6 to 6e-6, dx 2e-6 off;
    benchmarks/train_aten_accuracy.py), normlab within a few float32 roundings."""
    torch.manual_seed(4)
    shape = (64, 32, 16, 16)
    x = (0.01 * torch.randn(shape) + 0.01 * offset).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape)
    layer = nl.BatchNorm2d(32)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
    xn = x.clone().requires_grad_()
    y = layer(xn)
    y.backward(g)
    xd = x.double().requires_grad_()
    mean, var = xd.mean((0, 2, 3), keepdim=True), xd.var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = layer.weight.detach().double().view(1, -1, 1, 1), layer.bias.detach().double().view(1, -1, 1, 1)
    exact = (xd - mean) / torch.sqrt(var + 1e-5) * w + b
    exact.backward(g.double())
    assert _rel(y, exact.detach()) < 3e-7
    assert _rel(xn.grad, xd.grad) < 4e-7
    unbiased = x.double().var((0, 2, 3), unbiased=True)
    assert _rel(layer.running_var, 0.9 + 0.1 * unbiased) < 1e-6
    assert _rel(layer.running_mean, 0.1 * mean.detach().flatten()) < 1e-6
