"""normlab.fold: the zoo of layers and graphs, each against the unfolded eval model in float64 and float32."""

import copy

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nl
from normlab.folding import EvalAffine


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine parameters far from the defaults, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None and hasattr(m, "running_var"):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 2)
                m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def _check(model: nn.Module, shape, folded_count: int, seed: int = 0):
    """Fold in float64 and float32; outputs agree to 1e-10 and 1e-5 (relative to the output's size)."""
    torch.manual_seed(seed)
    model = _randomize(model, seed)
    x = torch.randn(*shape, dtype=torch.float64)
    reports = []
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        m = copy.deepcopy(model).to(dtype)
        before = copy.deepcopy(m.state_dict())
        folded, report = normlab.fold(m, x.to(dtype))
        with torch.no_grad():
            want, got = m(x.to(dtype)), folded(x.to(dtype))
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= tol * scale, (dtype, report)
        assert report.max_diff_float64 <= 1e-10 * scale and report.max_diff_float32 <= 2e-5 * scale
        assert len(report.folded) == folded_count, report
        assert not folded.training
        for k, v in m.state_dict().items():  # the input model is untouched
            assert torch.equal(v, before[k]), k
        assert got.dtype == dtype
        reports.append(report)
    return folded, reports[0]


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, nl.FrozenBatchNorm2d)) for m in model.modules())


CONV_AFTER = {
    "conv1d stride/dilation/reflect, no bias": (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2,
                                                          padding_mode="reflect", bias=False), nn.BatchNorm1d(6),
                                                (3, 4, 17)),
    "conv2d groups, circular": (nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"), nl.BatchNorm2d(6),
                                (2, 4, 9, 7)),
    "conv2d depthwise, replicate, stride 2": (nn.Conv2d(5, 5, 3, stride=2, padding=1, groups=5,
                                                        padding_mode="replicate"), nn.BatchNorm2d(5), (2, 5, 8, 8)),
    "conv2d depthwise multiplier, same": (nn.Conv2d(3, 6, 3, padding="same", groups=3, bias=False),
                                          nn.BatchNorm2d(6), (2, 3, 6, 6)),
    "conv3d stride, zeros": (nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), nl.BatchNorm3d(4), (2, 2, 5, 6, 6)),
    "convT1d output_padding groups": (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                                      nn.BatchNorm1d(6), (2, 4, 7)),
    "convT2d groups dilation no bias": (nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, dilation=2, bias=False),
                                        nn.BatchNorm2d(4), (2, 6, 5, 5)),
    "convT3d output_padding": (nn.ConvTranspose3d(2, 3, 2, stride=2, output_padding=1), nn.BatchNorm3d(3),
                               (1, 2, 3, 3, 3)),
    "linear + BatchNorm1d": (nn.Linear(7, 5), nl.BatchNorm1d(5), (6, 7)),
    "linear no bias + frozen": (nn.Linear(7, 5, bias=False), nl.FrozenBatchNorm1d(5), (6, 7)),
}


@pytest.mark.parametrize("case", list(CONV_AFTER))
def test_bn_after_a_layer_folds_exactly(case):
    layer, bn, shape = CONV_AFTER[case]
    folded, report = _check(nn.Sequential(layer, bn, nn.ReLU()), shape, 1)
    assert report.method == "torch.fx" and report.folded == [("1", "0", "after")]
    assert _bn_count(folded) == 0


BN_BEFORE = {
    "conv2d groups, no padding": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7), 1),
    "conv1d reflect padding, stride": (nn.BatchNorm1d(4), nn.Conv1d(4, 3, 3, stride=2, padding=1,
                                                                    padding_mode="reflect"), (2, 4, 9), 1),
    "conv3d circular": (nl.BatchNorm3d(2), nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular", bias=False),
                        (1, 2, 4, 4, 4), 1),
    "linear": (nn.BatchNorm1d(7), nn.Linear(7, 3), (5, 7), 1),
    "conv2d zero padding: not exact, not folded": (nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), 0),
    "convT: not folded": (nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5), 0),
}


@pytest.mark.parametrize("case", list(BN_BEFORE))
def test_bn_before_a_layer_folds_where_exact(case):
    bn, layer, shape, count = BN_BEFORE[case]
    folded, report = _check(nn.Sequential(nn.Identity(), bn, layer), shape, count)
    if count:
        assert report.folded == [("1", "2", "before")]
    else:
        assert isinstance(folded.get_submodule("1"), EvalAffine)
        assert "after:" in report.unfolded[0][1] and "before:" in report.unfolded[0][1]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nl.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def test_residual_block_folds_every_bn():
    folded, report = _check(Residual(), (2, 4, 8, 8), 3)
    assert sorted(r[0] for r in report.folded) == ["bn1", "bn2", "down.1"]


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x)))))


class OutputReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("model,reason", [(SharedConv(), "called 2 times"), (OutputReadTwice(), "also used by")])
def test_a_shared_layer_or_a_reused_output_is_not_folded(model, reason):
    folded, report = _check(model, (2, 3, 6, 6), 0)
    assert report.unfolded and all(reason in why for _, why in report.unfolded), report
    assert all(isinstance(folded.get_submodule(name), EvalAffine) for name, _ in report.unfolded)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return self.head(torch.relu(self.bn1(self.conv1(y))))


def test_a_model_fx_cannot_trace_folds_by_module_patterns():
    folded, report = _check(Untraceable(), (2, 3, 8, 8), 3)
    assert report.method == "module patterns" and "TraceError" in report.trace_error
    assert sorted(report.folded) == [("bn1", "conv1", "after"), ("head.0", "head.1", "before"),
                                     ("stem.1", "stem.0", "after")]
    model = _randomize(Untraceable())
    _, without_inputs = normlab.fold(model)
    assert [r[0] for r in without_inputs.unfolded] == ["bn1"]
    assert "pass example_inputs" in without_inputs.unfolded[0][1]


class PairReadTwice(Untraceable):
    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 0:
            y = y * 2
        z = self.conv1(y)
        return self.head(self.bn1(z)) + z.mean()


def test_a_named_pair_that_would_change_the_output_is_left_unfolded():
    folded, report = _check(PairReadTwice(), (2, 3, 8, 8), 2)
    assert "bn1" in [r[0] for r in report.unfolded]


def test_training_mode_is_refused_and_non_affine_bn_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        normlab.fold(model)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False),
                          nn.Conv2d(3, 3, 1), nl.BatchNormReLU2d(3)).eval()
    folded, report = normlab.fold(model, torch.randn(2, 3, 4, 4))
    assert not report.folded and len(report.unfolded) == 2
    assert type(folded.get_submodule("1")) is nn.BatchNorm2d and type(folded.get_submodule("3")) is nl.BatchNormReLU2d
    assert report.max_diff_float64 == 0.0
    assert "not folded: 2" in str(report)


def test_large_mean_tiny_spread_stays_accurate_in_the_affine_map():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(1e4)
        model[1].running_var.fill_(1e-4)
    x = 1e4 + 1e-2 * torch.randn(16, 2)
    folded, _ = normlab.fold(model, x)
    assert isinstance(folded.get_submodule("1"), EvalAffine)
    exact = copy.deepcopy(model).double()(x.double())
    with torch.no_grad():
        assert (folded(x).double() - exact).abs().max().item() < 1e-5  # (x - mean) * scale, not x * a + b


def test_linear_on_three_dimensional_data_is_not_folded_with_bn1d():
    """BatchNorm1d on (N, C, L) normalizes C while Linear mixes L: with example inputs the shapes show it."""
    folded, report = _check(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (3, 4, 4), 0)
    assert "3 dimensions" in report.unfolded[0][1]
