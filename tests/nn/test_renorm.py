"""BatchRenorm1d/2d/3d against the paper's formula in float64, BatchNorm as its special case, the schedule,
the constants r and d in the backward, state_dict compatibility with torch.nn BatchNorm."""

import pytest
import torch

import normlab.functional as F
import normlab.nn as nn

LAYERS = {2: nn.BatchRenorm1d, 3: nn.BatchRenorm1d, 4: nn.BatchRenorm2d, 5: nn.BatchRenorm3d}
NOW = dict(warmup_steps=0, r_max_steps=0, d_max_steps=0)  # the final limits from the first step


def reference(x, rm, rv, w, b, eps, r_max, d_max):
    """Ioffe 2017, Algorithm 1, in float64 with r and d detached."""
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims)
    sb = torch.sqrt(x.var(dims, unbiased=False) + eps)
    s = torch.sqrt(rv + eps)
    r = (sb / s).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm) / s).clamp(-d_max, d_max).detach()
    xhat = (x - mu.reshape(view)) / sb.reshape(view) * r.reshape(view) + d.reshape(view)
    return xhat * w.reshape(view) + b.reshape(view)


def _state(layer, gen):
    c = layer.num_features
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen))
        layer.bias.copy_(0.5 * torch.randn(c, generator=gen))
        layer.running_mean.copy_(torch.randn(c, generator=gen))
        # about half the channels far below the batch's variance, half far above: r clipped at both ends
        layer.running_var.copy_(torch.where(torch.arange(c) % 2 == 0, 0.5, 12.0) * (0.8 + 0.4 * torch.rand(c, generator=gen)))


@pytest.mark.parametrize("shape, channels_last", [((16, 6), False), ((6, 5, 7), False), ((4, 6, 5, 5), False),
                                                   ((4, 6, 5, 5), True), ((3, 4, 2, 3, 3), False)])
def test_matches_paper_formula_outputs_gradients_running(backend, shape, channels_last):
    gen = torch.Generator().manual_seed(len(shape))
    layer = LAYERS[len(shape)](shape[1], r_max=1.5, d_max=0.5, **NOW)
    _state(layer, gen)
    ref_w = layer.weight.detach().double().requires_grad_(True)
    ref_b = layer.bias.detach().double().requires_grad_(True)
    rm, rv = layer.running_mean.double(), layer.running_var.double()
    x = (2 * torch.randn(shape, generator=gen) + 0.5)
    dy = torch.randn(shape, generator=gen)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    xs = x.clone().requires_grad_(True)
    y = layer(xs)
    y.backward(dy)
    xr = x.double().requires_grad_(True)
    yr = reference(xr, rm, rv, ref_w, ref_b, layer.eps, 1.5, 0.5)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad.double(), xr.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), ref_w.grad, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad.double(), ref_b.grad, atol=2e-4, rtol=1e-4)
    dims = [0] + list(range(2, len(shape)))
    torch.testing.assert_close(layer.running_mean.double(), 0.9 * rm + 0.1 * x.double().mean(dims))
    torch.testing.assert_close(layer.running_var.double(), 0.9 * rv + 0.1 * x.double().var(dims), rtol=1e-5, atol=1e-6)
    assert layer.num_batches_tracked.item() == 1
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_clipping_is_active_in_that_test():
    """The state of the test above clips r at both ends and d: the formula is exercised, not the identity."""
    gen = torch.Generator().manual_seed(4)
    layer = nn.BatchRenorm2d(6)
    _state(layer, gen)
    x = 2 * torch.randn(4, 6, 5, 5, generator=gen) + 0.5
    sb = torch.sqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
    s = torch.sqrt(layer.running_var + 1e-5)
    d = (x.mean((0, 2, 3)) - layer.running_mean) / s
    assert ((sb / s) > 1.5).any() and ((sb / s) < 1 / 1.5).any() and (d.abs() > 0.5).any()


@pytest.mark.parametrize("how", ["limits", "warmup"])
def test_is_batchnorm_exactly(backend, how):
    gen = torch.Generator().manual_seed(1)
    kw = dict(r_max=1.0, d_max=0.0, **NOW) if how == "limits" else dict(warmup_steps=10)
    renorm, bn = nn.BatchRenorm2d(5, **kw), nn.BatchNorm2d(5)
    _state(renorm, gen)
    bn.load_state_dict(renorm.state_dict())
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3, generator=gen) * 3 + 1
        dy = torch.randn(4, 5, 3, 3, generator=gen)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        renorm(a).backward(dy)
        bn(b).backward(dy)
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(renorm.weight.grad, bn.weight.grad) and torch.equal(renorm.bias.grad, bn.bias.grad)
    for key, value in bn.state_dict().items():
        assert torch.equal(renorm.state_dict()[key], value), key


def test_r_and_d_are_constants_in_the_backward():
    """Central differences of the loss through the whole forward (r and d recomputed from x, as the
    forward does) differ from the backward's gradient by exactly the terms through r and d, which
    the backward leaves out: the gradient with r and d held fixed matches the backward."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64) * 2
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    dy = torch.randn(6, 3, dtype=torch.float64)

    def loss(x_, free_rd):
        y = F.batch_renorm(x_, rm.clone(), rv.clone(), w, None, True, 0.1, 1e-5, r_max=10.0, d_max=10.0)
        if not free_rd:
            return (y * dy).sum()
        return (reference(x_, rm, rv, w, torch.zeros(3, dtype=torch.float64), 1e-5, 10.0, 10.0) * dy).sum()

    xs = x.clone().requires_grad_(True)
    loss(xs, False).backward()
    h = 1e-6
    numeric_full = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        # the forward as a function of x with r, d recomputed from x: its derivative includes ∂r/∂x, ∂d/∂x
        sb = lambda z: torch.sqrt(z.var(0, unbiased=False) + 1e-5)  # noqa: E731
        s = torch.sqrt(rv + 1e-5)
        f = lambda z: ((((z - z.mean(0)) / sb(z)) * (sb(z) / s) + (z.mean(0) - rm) / s) * w * dy).sum()  # noqa: E731
        numeric_full.view(-1)[i] = (f(x + e) - f(x - e)) / (2 * h)
    # with r and d free (unclipped), x̂ = (x − μ)/σ: the full derivative is w·dy/σ, which the backward must NOT give
    torch.testing.assert_close(numeric_full, w * dy / torch.sqrt(rv + 1e-5))
    assert (xs.grad - numeric_full).abs().max() > 1e-2
    # with r and d held at their values, central differences match the backward
    mu, sbx = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    s = torch.sqrt(rv + 1e-5)
    r, d = sbx / s, (mu - rm) / s
    g = lambda z: ((((z - z.mean(0)) / sb(z)) * r + d) * w * dy).sum()  # noqa: E731
    numeric_fixed = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        numeric_fixed.view(-1)[i] = (g(x + e.view_as(x)) - g(x - e.view_as(x))) / (2 * h)
    torch.testing.assert_close(xs.grad, numeric_fixed, atol=1e-6, rtol=1e-6)


def test_gradcheck_float64(backend):
    """Running statistics far from the batch's clip r and d in every channel, so that the finite
    differences see them constant too."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.full((3,), 5.0, dtype=torch.float64), torch.full((3,), 0.05, dtype=torch.float64)

    def f(x, w, b):  # fresh running statistics per call: gradcheck evaluates many times
        return F.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, r_max=1.2, d_max=0.3)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_schedule_and_step_counter():
    layer = nn.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    assert layer.limits(0) == (1.0, 0.0) and layer.limits(9) == (1.0, 0.0)
    assert layer.limits(20) == (2.0, 5.0) and layer.limits(15) == (1.5, 2.5)
    assert layer.limits(30) == (3.0, 5.0) and layer.limits(10 ** 6) == (3.0, 5.0)
    x = torch.randn(8, 2)
    for _ in range(4):
        layer(x)
    layer.eval()
    layer(x)
    assert layer.num_batches_tracked.item() == 4  # training steps only
    assert layer.limits() == (1.0, 0.0)


def test_state_dict_is_batchnorms_and_the_schedule_survives_it():
    renorm = nn.BatchRenorm2d(3, warmup_steps=2, r_max_steps=4, d_max_steps=4)
    for _ in range(3):
        renorm(torch.randn(4, 3, 2, 2))
    assert isinstance(renorm, torch.nn.BatchNorm2d)
    assert set(renorm.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict())
    fresh = nn.BatchRenorm2d(3, warmup_steps=2, r_max_steps=4, d_max_steps=4)
    fresh.load_state_dict(renorm.state_dict())
    assert fresh.limits() == renorm.limits() == (2.0, 2.5)
    old = {k: v for k, v in torch.nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"}
    # a checkpoint without the counter loads (torch.nn's rule: the layer keeps its own count)
    fresh.load_state_dict(old)
    assert fresh.limits() == (2.0, 2.5)
    new = nn.BatchRenorm2d(3, warmup_steps=2, r_max_steps=4, d_max_steps=4)
    new.load_state_dict(old)
    assert new.limits() == (1.0, 0.0) and torch.equal(new.running_var, old["running_var"])


def test_eval_is_batchnorm_with_running_statistics():
    gen = torch.Generator().manual_seed(2)
    layer = nn.BatchRenorm2d(4, **NOW)
    _state(layer, gen)
    layer.eval()
    x = torch.randn(2, 4, 3, 3, generator=gen)
    expected = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)


def test_errors():
    with pytest.raises(ValueError, match="r_max"):
        nn.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        nn.BatchRenorm1d(3, d_max=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        nn.BatchRenorm1d(3, warmup_steps=100, r_max_steps=50)
    with pytest.raises(ValueError, match="more than 1 value"):
        nn.BatchRenorm1d(3, **NOW)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="running_mean"):
        F.batch_renorm(torch.randn(4, 3), None, None, training=True)
    layer = nn.BatchRenorm1d(3, **NOW)
    layer(torch.randn(0, 3))  # an empty batch: nothing counted, nothing written
    assert layer.num_batches_tracked.item() == 0 and torch.equal(layer.running_mean, torch.zeros(3))


def test_half_precision_and_no_grad(backend):
    gen = torch.Generator().manual_seed(3)
    layer = nn.BatchRenorm2d(4, r_max=1.3, d_max=0.2, **NOW)
    _state(layer, gen)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 4, 3, 3, generator=gen)
    with torch.no_grad():
        y16 = layer(x.to(torch.bfloat16))
    layer.load_state_dict(state)
    with torch.no_grad():
        y32 = layer(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=1e-2)


def test_numba_runs_renorm_through_the_seam(numba_seam_calls):
    """On the numba backend batch renormalization is the seam's moments and one applying pass with r and d
    folded into γ and β (the fused forward refused here), against the paper's formula."""
    gen = torch.Generator().manual_seed(3)
    layer = nn.BatchRenorm2d(4, **NOW)
    _state(layer, gen)
    rm, rv = layer.running_mean.clone().double(), layer.running_var.clone().double()
    x = 2 + 3 * torch.randn(5, 4, 3, 3, generator=gen)
    with torch.no_grad():
        y = layer(x)
    assert [name for name, _ in numba_seam_calls] == ["partial_moments"]
    expected = reference(x.double(), rm, rv, layer.weight.double(), layer.bias.double(), layer.eps, 3.0, 5.0)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
