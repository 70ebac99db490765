import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.lab import measure
from normlab.lab.models import Block, Stack


def scalar_chain(*weights: float) -> Stack:
    """f(x) = w_k · … · w_1 · x as a stack of 1x1 bias-free linear blocks."""
    blocks = []
    for w in weights:
        layer = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(w)
        blocks.append(Block(layer))
    return Stack(blocks, flatten=False)


def squared(out, y):
    return (out - y).pow(2).sum()


def test_ics_gradients_by_hand():
    w1, w2, lr = 0.5, 2.0, 0.1
    model = scalar_chain(w1, w2)
    x, y = torch.ones(1, 1), torch.zeros(1, 1)
    out = measure.ics_gradients(model, list(model.blocks), squared, x, y, lr)
    g1 = 2 * w1 * w2 ** 2
    g2 = 2 * w1 ** 2 * w2
    w1_new = w1 - lr * g1
    g2_shifted = 2 * w1_new ** 2 * w2
    assert out["l2"][0] == pytest.approx(0.0)
    assert out["cos"][0] == pytest.approx(1.0)
    assert out["l2"][1] == pytest.approx(abs(g2 - g2_shifted), rel=1e-5)
    assert out["cos"][1] == pytest.approx(1.0)
    assert model.blocks[0].layer.weight.item() == pytest.approx(w1)


def test_ics_only_earlier_layers_move():
    torch.manual_seed(0)
    model = Stack([Block(nn.Linear(3, 3)), Block(nn.Linear(3, 3)), Block(nn.Linear(3, 2))], flatten=False)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    lr = 0.05
    out = measure.ics_gradients(model, list(model.blocks), squared, x, y, lr)
    params = list(model.parameters())
    grads = torch.autograd.grad(squared(model(x), y), params)
    ref = Stack([Block(nn.Linear(3, 3)), Block(nn.Linear(3, 3)), Block(nn.Linear(3, 2))], flatten=False)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p, g in zip(list(ref.blocks[0].parameters()) + list(ref.blocks[1].parameters()), grads[:4]):
            p.sub_(lr * g)
    last = list(ref.blocks[2].layer.parameters())
    shifted = torch.autograd.grad(squared(ref(x), y), last)
    g_last = torch.cat([g.reshape(-1) for g in grads[4:]])
    g_shift = torch.cat([g.reshape(-1) for g in shifted])
    assert out["l2"][2] == pytest.approx(float((g_last - g_shift).norm()), rel=1e-5)
    assert out["cos"][2] == pytest.approx(measure.cosine(g_last, g_shift), rel=1e-6)


def test_probe_restores_running_statistics():
    model = Stack([Block(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()), Block(nn.Linear(4, 2))], flatten=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4) * 3 + 2, torch.randn(8, 2)
    measure.ics_gradients(model, list(model.blocks), squared, x, y, 0.1)
    measure.landscape_probe(model, squared, x, y, [0.1, 0.2])
    measure.relative_loss(model, squared, x, y, [0.1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def quadratic_model(theta: float) -> tuple[nn.Module, torch.Tensor]:
    model = scalar_chain(theta)
    return model, torch.ones(1, 1)


def test_landscape_probe_on_a_quadratic():
    a, theta = 3.0, 2.0

    def loss(out, _y):
        return 0.5 * a * out.pow(2).sum()

    model, x = quadratic_model(theta)
    etas = [0.05, 0.1, 0.2]
    out = measure.landscape_probe(model, loss, x, x, etas)
    g = a * theta
    losses = [0.5 * a * (theta * (1 - e * a)) ** 2 for e in etas]
    diffs = [a * a * theta * e for e in etas]
    np.testing.assert_allclose(out["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(out["grad_diffs"], diffs, rtol=1e-5)
    assert out["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-5)
    assert out["predictiveness_max"] == pytest.approx(max(diffs), rel=1e-5)
    assert out["beta"] == pytest.approx(a, rel=1e-5)
    assert out["loss"] == pytest.approx(0.5 * a * theta ** 2)
    assert g > 0


def test_relative_loss_on_a_quadratic():
    a, theta = 3.0, 2.0
    model, x = quadratic_model(theta)
    sizes = [1e-3, 0.1, 1.0]
    rel = measure.relative_loss(model, lambda out, _y: 0.5 * a * out.pow(2).sum(), x, x, sizes)
    np.testing.assert_allclose(rel, [(1 - s * a) ** 2 for s in sizes], rtol=1e-5)


def test_percentiles_and_drift():
    values = torch.arange(101, dtype=torch.float32)
    assert measure.percentiles(values) == pytest.approx([15.0, 50.0, 85.0])
    assert measure.percentile_drift([0, 1, 2], [1, 1, 5]) == pytest.approx((1 + 0 + 3) / 3)


def test_channel_stats_and_shift():
    act = torch.stack([torch.full((4, 4), 2.0), torch.tensor([[-1.0, 1.0]]).repeat(4, 2)], 0)
    act = act.unsqueeze(0).repeat(3, 1, 1, 1)
    stats = measure.channel_stats(act)
    assert stats["abs_mean"] == pytest.approx(1.0)
    assert stats["std"] == pytest.approx(0.5)
    assert measure.distribution_shift([0, 1, 1], [1, 1, 3]) == pytest.approx(((1 + 0) + (0 + 2)) / 2 / (5 / 3))
    assert measure.distribution_shift([0], [1]) == 0.0


def test_log10_histogram():
    counts = measure.log10_histogram(torch.tensor([0.0, 1e-3, 0.5, 50.0, 1e9]), [-4, -2, 0, 2])
    assert counts == [2, 1, 2]
    assert sum(counts) == 5


def test_cosine_edge_cases():
    z = torch.zeros(3)
    assert measure.cosine(z, z) == 1.0
    assert measure.cosine(z, torch.ones(3)) == 0.0
    assert measure.cosine(torch.ones(3), -torch.ones(3)) == pytest.approx(-1.0)
    assert math.isclose(measure.cosine(torch.tensor([1.0, 0]), torch.tensor([1.0, 1.0])), 2 ** -0.5, rel_tol=1e-6)
