"""``normlab.nn.convert(model, fuse=True)`` / ``normlab.nn.fuse``: BN→ReLU and BN + add → ReLU rewritten into
the fused layers, on the graph torch.fx traces and by module patterns; same parameters, state_dict keys,
outputs, gradients and running statistics as the unfused model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab.bench import nets


def _pair(model: nn.Module):
    """(the drop-in conversion, the fused conversion) of copies of ``model``."""
    return nl.convert(copy.deepcopy(model)), nl.convert(copy.deepcopy(model), fuse=True)


def _same_function(plain: nn.Module, fused: nn.Module, x: torch.Tensor, train: bool = True) -> None:
    """Outputs and running statistics equal in float32 (the fused forward is the same arithmetic); gradients
    equal in float64 (in float32 the backward sums in another order, and a BN weight's gradient, a sum that
    nearly cancels, differs by rounding only)."""
    plain.train(train), fused.train(train)
    y0, y1 = plain(x.clone()), fused(x.clone())
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    if train:
        plain64, fused64 = copy.deepcopy(plain).double(), copy.deepcopy(fused).double()
        plain64(x.double()).square().sum().backward()
        fused64(x.double()).square().sum().backward()
        for (name, p), q in zip(plain64.named_parameters(), fused64.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("train", [True, False])
def test_resnet_basic_blocks_fuse_on_the_fx_graph(layout, train):
    torch.manual_seed(0)
    model = nets.resnet18(8, scale=1).to(memory_format=layout)
    plain, fused = _pair(model)
    report = fused.fusion_report
    assert report.method == "torch.fx" and isinstance(fused, torch.fx.GraphModule)
    kinds = [kind for _, kind in report.fused]
    assert kinds.count("BN+ReLU") == 1 + 8 and kinds.count("BN+add+ReLU") == 8  # stem + bn1 of 8 blocks; bn2
    assert {bn for bn, _ in report.skipped} == {f"layer{i}.0.downsample.1" for i in (2, 3, 4)}
    assert list(fused.state_dict()) == list(plain.state_dict()) == list(model.state_dict())
    assert type(fused.get_submodule("layer1.0.bn2")) is nl.BatchNormAddReLU2d
    assert type(fused.get_submodule("layer1.0.bn1")) is nl.BatchNormReLU2d
    _same_function(plain, fused, torch.randn(4, 3, 16, 16).contiguous(memory_format=layout), train)


def test_bottlenecks_and_mobilenet_fuse():
    torch.manual_seed(1)
    for model, fused_count in ((nets.resnet50(8, scale=2), 1 + 4 * 3), (nets.mobilenet(scale=4), 1 + 4 * 2)):
        plain, fused = _pair(model)
        assert len(fused.fusion_report.fused) == fused_count
        _same_function(plain, fused, torch.randn(4, 3, 16, 16))


def test_parameters_are_shared_so_an_earlier_optimizer_still_trains_the_model():
    model = nl.convert(nets.resnet18(8, scale=2))
    params = list(model.parameters())
    fused = nl.convert(model, fuse=True)
    assert all(a is b for a, b in zip(fused.parameters(), params)) and len(list(fused.parameters())) == len(params)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > float("-inf") else -x


class UntraceableBasicBlock(nets.BasicBlock):
    """A torchvision-style block whose forward does not trace (but computes the BasicBlock function)."""

    def forward(self, x):
        if x.sum() > float("-inf"):
            return super().forward(x)
        return x


def test_models_that_do_not_trace_fuse_by_module_patterns():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Untraceable(),
        UntraceableBasicBlock(8, 8), UntraceableBasicBlock(8, 16, stride=2),
        nn.Sequential(nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU()),  # a child that traces on its own
    )
    plain, fused = _pair(model)
    report = fused.fusion_report
    assert report.trace_error and "module patterns" in report.method and "torch.fx" in report.method
    assert dict(report.fused) == {"1": "BN+ReLU", "4.bn1": "BN+ReLU", "4.bn2": "BN+add+ReLU", "5.bn1": "BN+ReLU",
                                  "5.bn2": "BN+add+ReLU", "6.1": "BN+ReLU"}
    assert type(fused[2]) is nn.Identity and type(fused[4]).__name__ == "FusedUntraceableBasicBlock"
    assert list(fused.state_dict()) == list(plain.state_dict())
    _same_function(plain, fused, torch.randn(4, 3, 8, 8))


def test_what_is_not_fused_is_reported_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.twice, self.conv = nl.BatchNorm2d(4), nl.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = torch.relu(self.shared(torch.relu(self.shared(x))))
            y = self.twice(x)
            return torch.relu(y) + self.conv(y)

    model, report = nl.fuse(Net())
    assert dict(report.skipped) == {"shared": "it is called 2 times (shared)",
                                    "twice": "its output is used by 2 operations"}
    assert report.fused == [] and "not fused: 2" in str(report)


def test_fuse_needs_normlab_layers_and_torch_target_is_refused():
    with pytest.raises(ValueError, match="fuse=True"):
        nl.convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), to="torch", fuse=True)
    torch_model, report = nl.fuse(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))  # torch.nn's layers: left alone
    assert report.fused == [] and type(torch_model[0]) is nn.BatchNorm2d
