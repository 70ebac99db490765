import math

import pytest
import torch

from normlab.nn.extra import CovariateShiftNoise, LpBatchNorm1d, LpBatchNorm2d


def test_noise_is_identity_in_eval_mode():
    layer = CovariateShiftNoise().eval()
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(layer(x), x)


def test_noise_is_reproducible_with_generator_and_leaves_global_rng_alone():
    x = torch.randn(8, 3, 4, 4)
    state = torch.random.get_rng_state()
    a = CovariateShiftNoise(generator=torch.Generator().manual_seed(5))(x)
    b = CovariateShiftNoise(generator=torch.Generator().manual_seed(5))(x)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_noise_without_jitter_is_one_affine_map_per_channel():
    layer = CovariateShiftNoise(mean_jitter=0.0, scale_std=0.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 4, 3, 3)
    y = layer(x)
    for c in range(4):
        xc, yc = x[:, c].reshape(-1), y[:, c].reshape(-1)
        sigma = float((yc[1] - yc[0]) / (xc[1] - xc[0]))
        mu = float(yc[0] - sigma * xc[0])
        torch.testing.assert_close(yc, sigma * xc + mu)
        assert -0.5 <= mu <= 0.5 and 1.0 <= sigma <= 1.25


def test_noise_draws_follow_the_paper_distribution():
    layer = CovariateShiftNoise(generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 5, 8, 8)
    s, m = layer.draw(x)
    assert s.shape == x.shape and m.shape == x.shape
    for c in range(5):
        mc, sc = m[:, c], s[:, c]
        assert float(mc.max() - mc.min()) <= 0.2 + 1e-6
        assert -0.6 <= float(mc.min()) and float(mc.max()) <= 0.6
        assert 0.95 <= float(sc.mean()) <= 1.3
        assert abs(float(sc.std()) - 0.1) < 0.02
    y = layer(x)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_noise_rejects_bad_ranges():
    with pytest.raises(ValueError):
        CovariateShiftNoise(mean_range=(1.0, -1.0))
    with pytest.raises(ValueError):
        CovariateShiftNoise(scale_std=-1)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_batchnorm_formula(p):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4) * 3 + 1
    layer = LpBatchNorm2d(3, p=p, eps=0.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    y = layer(x)
    for c in range(3):
        xc = x[:, c]
        dev = (xc - xc.mean()).abs()
        scale = dev.max() if p == math.inf else dev.pow(p).mean().pow(1 / p)
        expected = layer.weight[c] * (xc - xc.mean()) / scale + layer.bias[c]
        torch.testing.assert_close(y[:, c], expected)


def test_lp2_matches_batchnorm():
    x = torch.randn(16, 5, 3, 3)
    ours = LpBatchNorm2d(5, p=2, eps=1e-12)
    ref = torch.nn.BatchNorm2d(5, eps=1e-12)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_lp_running_stats_drive_eval():
    x = torch.randn(32, 4) * 2 + 3
    layer = LpBatchNorm1d(4, p=1, momentum=0.5)
    layer(x)
    mean = x.mean(0)
    scale = (x - mean).abs().mean(0)
    torch.testing.assert_close(layer.running_mean, 0.5 * mean)
    torch.testing.assert_close(layer.running_scale, 0.5 + 0.5 * scale)
    layer.eval()
    z = torch.randn(3, 4)
    torch.testing.assert_close(layer(z), (z - layer.running_mean) / (layer.running_scale + layer.eps))


def test_lp_input_checks():
    with pytest.raises(ValueError, match="p must be"):
        LpBatchNorm1d(3, p=3)
    with pytest.raises(ValueError, match="p must be 1, 2 or inf.*got 'x'"):
        LpBatchNorm2d(3, p="x")
    with pytest.raises(ValueError, match="expected a 4D input"):
        LpBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        LpBatchNorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="momentum must be"):
        LpBatchNorm2d(3, momentum=None)
    with pytest.raises(ValueError, match="eps must be"):
        LpBatchNorm2d(3, eps=-1e-5)
    with pytest.raises(TypeError, match="floating-point"):
        LpBatchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.int64))
    layer = LpBatchNorm2d(3)
    with pytest.raises(ValueError, match="more than 1 value per statistic"):
        layer(torch.randn(1, 3, 1, 1))
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_scale, torch.ones(3))
    assert LpBatchNorm1d(3, p="inf").p == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lp_half_precision_is_computed_in_float32(dtype):
    ours, ref = LpBatchNorm2d(3, p=1), LpBatchNorm2d(3, p=1)
    x = 5 + torch.randn(8, 3, 4, 4)
    y = ours(x.to(dtype))
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x.to(dtype).float()), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


def test_lp_layers_are_in_normlab_nn():
    import normlab.nn as nl

    assert nl.LpBatchNorm2d is LpBatchNorm2d and nl.LpBatchNorm1d is LpBatchNorm1d
    assert nl.CovariateShiftNoise is CovariateShiftNoise


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_uncentred_lp_divides_by_the_norm_taken_before_the_mean_is_subtracted(p):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 0.5 + 2.0
    layer = LpBatchNorm2d(3, p=p, eps=0.0, centered=False).double()
    y = layer(x)
    v = x.transpose(0, 1).reshape(3, -1)
    s = v.abs().amax(1) if p == math.inf else v.abs().pow(p).mean(1).pow(1 / p)
    mu = v.mean(1)
    torch.testing.assert_close(y, (x - mu.view(1, 3, 1, 1)) / s.view(1, 3, 1, 1))
    torch.testing.assert_close(layer.running_scale, 0.9 + 0.1 * s)
    torch.testing.assert_close(layer.running_mean, 0.1 * mu)
    centred = LpBatchNorm2d(3, p=p, eps=0.0).double()(x)
    assert not torch.allclose(centred, y)  # the mean of 2 makes the un-centred norm larger
    assert "centered=False" in repr(layer)
