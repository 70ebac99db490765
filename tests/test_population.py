"""precise_bn and adapt_bn against statistics computed directly over the concatenated data."""

import copy

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nl
from normlab.population import ChannelMoments


def _direct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance over N and spatial dims, two-pass, float64."""
    xv = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = xv.mean(dim=1)
    return mean, ((xv - mean[:, None]) ** 2).sum(dim=1) / (xv.shape[1] - 1)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, nl.BatchNorm2d])
def test_single_bn_gets_the_statistics_of_all_batches_of_different_sizes(bn_cls):
    torch.manual_seed(0)
    bn = bn_cls(3).double()
    batches = [torch.randn(n, 3, 5, 4, dtype=torch.float64) * 2 + 3 for n in (7, 2, 13, 5)]
    counts = normlab.precise_bn(bn, batches, progress=False)
    mean, var = _direct(torch.cat(batches))
    assert counts[""] == sum(b.shape[0] for b in batches) * 20
    assert torch.allclose(bn.running_mean, mean, rtol=0, atol=1e-12)
    assert torch.allclose(bn.running_var, var, rtol=1e-12, atol=0)
    assert bn.num_batches_tracked.item() == 0 and bn.training


def test_not_an_average_of_per_batch_variances():
    bn = nn.BatchNorm1d(1).double()
    a, b = torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)
    normlab.precise_bn(bn, [a, b], progress=False)
    assert bn.running_mean.item() == pytest.approx(0.5)
    assert bn.running_var.item() == pytest.approx(8 * 0.25 / 7)  # the per-batch variances are both 0


def test_large_mean_tiny_spread_float32_channels_last():
    torch.manual_seed(1)
    bn = nl.BatchNorm2d(4)
    batches = [(1e4 + 1e-2 * torch.randn(n, 4, 6, 6)).contiguous(memory_format=torch.channels_last)
               for n in (8, 3, 16)]
    normlab.precise_bn(bn, batches, progress=False)
    mean, var = _direct(torch.cat(batches))
    assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-7)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-4)


def test_deeper_layers_see_inputs_normalized_with_batch_statistics_and_modes_restored():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.0), nn.Linear(6, 3),
                          nl.BatchNorm1d(3)).double()
    model.eval()
    model[3].train()  # a mixed-mode model keeps each module's mode
    weights = copy.deepcopy(model.state_dict())
    batches = [torch.randn(n, 5, dtype=torch.float64) for n in (9, 4, 11)]
    normlab.precise_bn(model, [(b, torch.zeros(len(b))) for b in batches], progress=False)
    x = torch.cat(batches)
    h = model[0](x)
    mean1, var1 = _direct(h)
    assert torch.allclose(model[1].running_mean, mean1) and torch.allclose(model[1].running_var, var1)
    # the second BN's input: each batch normalized with its own statistics by the first BN
    ins = []
    for b in batches:
        hb = model[0](b)
        hb = (hb - hb.mean(0)) / torch.sqrt(hb.var(0, unbiased=False) + model[1].eps)
        ins.append(model[4](torch.relu(hb * model[1].weight + model[1].bias)))
    mean2, var2 = _direct(torch.cat(ins))
    assert torch.allclose(model[5].running_mean, mean2) and torch.allclose(model[5].running_var, var2)
    assert [m.training for m in model] == [False, False, False, True, False, False]
    for k, v in model.state_dict().items():
        if "running" not in k:
            assert torch.equal(v, weights[k]), k


def test_dict_batches_and_custom_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, image, scale=1.0):
            return self.bn(image * scale)

    batches = [{"image": torch.randn(6, 2), "scale": 2.0} for _ in range(3)]
    net = Net()
    normlab.precise_bn(net, batches, progress=False)
    mean, var = _direct(torch.cat([b["image"] * 2.0 for b in batches]))
    assert torch.allclose(net.bn.running_mean.double(), mean, atol=1e-6)
    net2 = Net()
    normlab.precise_bn(net2, batches, progress=False, forward=lambda m, b: m(b["image"]), num_batches=2)
    mean, var = _direct(torch.cat([b["image"] for b in batches[:2]]))
    assert torch.allclose(net2.bn.running_var.double(), var, rtol=1e-5)


def test_errors_leave_the_statistics_unchanged():
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        normlab.precise_bn(nn.Linear(2, 2), [torch.randn(3, 2)], progress=False)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="empty"):
        normlab.precise_bn(bn, [], progress=False)
    batches = [torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 5)]  # the third has the wrong width
    with pytest.raises(RuntimeError, match="batch 2"):
        normlab.precise_bn(bn, batches, progress=False)

    def broken():
        yield torch.randn(4, 3)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="batch 1 raised OSError: disk gone"):
        normlab.precise_bn(bn, broken(), progress=False)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not bn._forward_pre_hooks


def test_chan_merge_is_exact_in_any_order():
    torch.manual_seed(3)
    parts = [torch.randn(n, 3, dtype=torch.float64) + 100 for n in (1, 5, 2, 9)]
    merged = ChannelMoments.empty(3, "cpu")
    for p in reversed(parts):
        merged = ChannelMoments.from_tensor(merged.merge(ChannelMoments.of(p)).to_tensor())
    mean, var = merged.finalize()
    ref_mean, ref_var = _direct(torch.cat(parts))
    assert torch.allclose(mean, ref_mean, rtol=0, atol=1e-12) and torch.allclose(var, ref_var, rtol=1e-12)


def test_adapt_bn_copies_unless_inplace():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval()
    source = copy.deepcopy(model.state_dict())
    target = [torch.randn(8, 1, 6, 6) * 3 + 5 for _ in range(3)]
    adapted = normlab.adapt_bn(model, target, progress=False)
    assert adapted is not model and not adapted.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k])
    mean, _ = _direct(torch.cat([model[0](t) for t in target]).detach())
    assert torch.allclose(adapted[1].running_mean.double(), mean, atol=1e-5)
    one = normlab.adapt_bn(model, target, inplace=True, num_batches=1, progress=False)
    assert one is model
    mean1, _ = _direct(model[0](target[0]).detach())
    assert torch.allclose(model[1].running_mean.double(), mean1, atol=1e-5)


WORKERS = __import__("pathlib").Path(__file__).with_name("population_workers.py")


@pytest.mark.parametrize("world", [2, 3])
def test_across_processes_every_rank_gets_the_statistics_of_all_shards(gloo_spawn, world):
    """Uneven shards ((5, 7, 2), (4), none) of data with a large mean and a small spread: every rank's
    statistics equal one-process precise_bn over all the batches to float64 rounding, bit-identical across ranks."""
    gloo_spawn(WORKERS, "exact", world)


def test_across_processes_a_failing_rank_makes_every_rank_raise(gloo_spawn):
    gloo_spawn(WORKERS, "one_fails", 3, limit=40)
