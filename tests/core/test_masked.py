"""Masked batch statistics: BatchNorm over the valid positions equals BatchNorm of those positions gathered,
in outputs, gradients and running statistics, on every backend (functional.batch_norm(mask=),
BatchNorm1d/2d(mask=), MaskedBatchNorm1d on (N, L, C)); padded positions; all-False masks and empty batches."""

import pytest
import torch

import normlab.functional as F
import normlab.nn as nn


def _mask(n, length, gen, min_len=1):
    lengths = torch.randint(min_len, length + 1, (n,), generator=gen)
    return torch.arange(length) < lengths[:, None]


def _reference(x, mask, channel_dim, w, b, rm, rv, dy):
    """torch.nn.functional.batch_norm in float64 on the valid positions gathered, scattered into zeros."""
    xr = x.double().requires_grad_(True)
    wr, br = w.double().requires_grad_(True), b.double().requires_grad_(True)
    rows = xr.movedim(channel_dim, -1)[mask]
    rm, rv = rm.double().clone(), rv.double().clone()
    yrows = torch.nn.functional.batch_norm(rows, rm, rv, wr, br, training=True)
    y = torch.zeros_like(xr)
    y.movedim(channel_dim, -1)[mask] = yrows
    y.backward(dy.double())
    return y, xr.grad, wr.grad, br.grad, rm, rv


@pytest.mark.parametrize("layout", ["(N, C, L)", "(N, L, C)", "(N, C)", "(N, C, H, W)", "channels_last"])
def test_equals_batchnorm_of_the_valid_positions(backend, layout):
    gen = torch.Generator().manual_seed(0)
    c = 5
    if layout == "(N, C, L)":
        x, mask, channel_dim = torch.randn(6, c, 9, generator=gen), _mask(6, 9, gen), 1
        layer = nn.BatchNorm1d(c)
    elif layout == "(N, L, C)":
        x, mask, channel_dim = torch.randn(6, 9, c, generator=gen), _mask(6, 9, gen), -1
        layer = nn.MaskedBatchNorm1d(c)
    elif layout == "(N, C)":
        x, mask, channel_dim = torch.randn(10, c, generator=gen), torch.rand(10, generator=gen) > 0.4, 1
        layer = nn.BatchNorm1d(c)
    else:
        x, mask, channel_dim = torch.randn(3, c, 4, 4, generator=gen), torch.rand(3, 4, 4, generator=gen) > 0.5, 1
        layer = nn.BatchNorm2d(c)
    x = 3 * x + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.movedim(channel_dim, -1)[~mask] = 1e6  # whatever padding holds must not matter
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen))
        layer.bias.copy_(0.5 * torch.randn(c, generator=gen))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    dy = torch.randn(x.shape, generator=gen)
    y_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref = _reference(x, mask, channel_dim, layer.weight.detach(),
                                                               layer.bias.detach(), rm, rv, dy)
    xs = x.clone().requires_grad_(True)
    y = layer(xs, mask=mask)
    y.backward(dy)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad.double(), dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), dw_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), db_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean.double(), rm_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), rv_ref, atol=1e-6, rtol=1e-6)
    padded = ~mask
    assert (y.movedim(channel_dim, -1)[padded] == 0).all() and (xs.grad.movedim(channel_dim, -1)[padded] == 0).all()
    assert layer.num_batches_tracked.item() == 1
    assert y.shape == x.shape and y.stride() == x.stride() and xs.grad.stride() == x.stride()
    # eval: running statistics everywhere, padded positions 0
    layer.eval()
    y_eval = layer(x, mask=mask)
    moved = torch.nn.functional.batch_norm(x.movedim(channel_dim, 1), layer.running_mean, layer.running_var,
                                           layer.weight, layer.bias).movedim(1, channel_dim)
    torch.testing.assert_close(y_eval, torch.where(mask.unsqueeze(channel_dim % x.dim()), moved, 0.0))


def test_functional_mask_and_gradcheck(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    f = lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_all_true_mask_is_batchnorm(backend):
    x = torch.randn(4, 3, 6)
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    y1 = F.batch_norm(x, rm1, rv1, training=True, mask=torch.ones(4, 6, dtype=torch.bool))
    y2 = F.batch_norm(x, rm2, rv2, training=True)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close((rm1, rv1), (rm2, rv2))
    seq = torch.randn(4, 6, 3)
    torch.testing.assert_close(nn.MaskedBatchNorm1d(3)(seq), nn.BatchNorm1d(3)(seq.transpose(1, 2)).transpose(1, 2))


def test_all_false_masks_and_empty_batches_leave_running_statistics_alone(backend):
    layer = nn.MaskedBatchNorm1d(3)
    x = torch.randn(2, 4, 3, requires_grad=True)
    y = layer(x, mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert layer(torch.randn(0, 4, 3), mask=torch.zeros(0, 4, dtype=torch.bool)).shape == (0, 4, 3)
    assert layer.num_batches_tracked.item() == 0 and not layer.running_var.isnan().any()


def test_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="single valid position"):
        F.batch_norm(x, None, None, training=True, mask=torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match="mask of shape"):
        F.batch_norm(x, None, None, training=True, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        F.batch_norm(x, None, None, training=True, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        nn.MaskedBatchNorm1d(4)(torch.randn(2, 5, 3))
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError):
        F.batch_norm(x, rm, rv, training=True, mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(rm, torch.zeros(3))  # nothing written before the error
