"""PyTorch's test/nn/test_load_state_dict.py cases that involve normalization layers, ported: each runs on
torch.nn and on normlab."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch


def test_load_state_dict_BC(impl):
    """A BatchNorm state_dict saved before num_batches_tracked existed (version 1, or no version) loads
    with the counter at 0."""
    bn = impl.nn.BatchNorm2d(3)
    state_dict = bn.state_dict()
    del state_dict["num_batches_tracked"]
    state_dict._metadata[""]["version"] = 1
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0
    del state_dict._metadata[""]["version"]
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0


def test_load_state_dict_missing_num_batches_tracked_is_an_error_in_the_current_version(impl):
    bn = impl.nn.BatchNorm2d(3)
    state_dict = bn.state_dict()
    del state_dict["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        bn.load_state_dict(state_dict)


def test_load_state_dict_nested(impl):
    net = torch.nn.Sequential(OrderedDict([
        ("linear", torch.nn.Linear(4, 3)),
        ("block", torch.nn.Sequential(impl.nn.BatchNorm1d(3), impl.nn.LayerNorm(3))),
        ("gn", impl.nn.GroupNorm(1, 3)),
    ]))
    net(torch.randn(5, 4))  # moves the running statistics away from their defaults
    state_dict = net.state_dict()
    assert set(state_dict) == {
        "linear.weight", "linear.bias", "block.0.weight", "block.0.bias", "block.0.running_mean",
        "block.0.running_var", "block.0.num_batches_tracked", "block.1.weight", "block.1.bias", "gn.weight",
        "gn.bias",
    }
    fresh = torch.nn.Sequential(OrderedDict([
        ("linear", torch.nn.Linear(4, 3)),
        ("block", torch.nn.Sequential(impl.nn.BatchNorm1d(3), impl.nn.LayerNorm(3))),
        ("gn", impl.nn.GroupNorm(1, 3)),
    ]))
    result = fresh.load_state_dict(state_dict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state_dict[key])

    del state_dict["block.0.running_mean"]
    state_dict["block.0.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Missing key.*block.0.running_mean"):
        fresh.load_state_dict(state_dict)
    result = fresh.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == ["block.0.running_mean"] and result.unexpected_keys == ["block.0.extra"]


def test_load_state_dict_size_mismatch(impl):
    bn = impl.nn.BatchNorm1d(3)
    state_dict = impl.nn.BatchNorm1d(4).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for running_mean"):
        bn.load_state_dict(state_dict)


def test_load_state_dict_between_implementations(impl):
    """A state_dict saved from torch.nn's layer loads into this implementation's and back, unchanged."""
    source = torch.nn.BatchNorm2d(3, momentum=None)
    source(torch.randn(4, 3, 2, 2))
    target = impl.nn.BatchNorm2d(3, momentum=None)
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_load_state_dict_assign_meta(impl):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(3, 5)
            self.bn = impl.nn.BatchNorm1d(5)
            self.ln = impl.nn.LayerNorm(5)
            self.fc2 = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.fc2(self.ln(self.bn(self.fc1(x))))

    net = Net()
    state_dict = net.state_dict(keep_vars=True)
    with torch.device("meta"):
        meta_net = Net()
    meta_net.load_state_dict(state_dict, assign=True)
    params, meta_params = dict(net.named_parameters()), dict(meta_net.named_parameters())
    for key in params:
        assert params[key] is meta_params[key]
    buffers, meta_buffers = dict(net.named_buffers()), dict(meta_net.named_buffers())
    for key in buffers:
        assert buffers[key] is meta_buffers[key]
    x = torch.randn(2, 3)
    torch.testing.assert_close(net(x), meta_net(x))
