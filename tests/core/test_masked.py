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


def _masked_run(x, mask, backend, monkeypatch, dy):
    monkeypatch.setenv("NORMLAB_BACKEND", backend)
    layer = nn.MaskedBatchNorm1d(x.shape[-1]).to(x.dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, x.shape[-1]))
    xs = x.clone().requires_grad_(True)
    y = layer(xs, mask=mask)
    y.backward(dy)
    return y.detach(), xs.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var


def test_the_seam_and_the_gathered_kernels_agree_on_hard_data(monkeypatch):
    """The torch engine's statistics seam (masked partial moments → merge → apply) against BatchNorm of the
    gathered rows in float64 and, where numba is installed, against its kernels on the gathered rows: data
    with a mean of 1e4 and a spread of 1e-2, the first valid value (the shift) an outlier of 1e5, NaN and inf
    at padded positions in x and in ∂L/∂y."""
    gen = torch.Generator().manual_seed(0)
    n, length, c = 6, 40, 7
    mask = _mask(n, length, gen, min_len=5)
    x = 1e4 + 1e-2 * torch.randn(n, length, c, generator=gen)
    x[0, 0] = 1e5
    x[~mask] = float("nan")
    x[~mask & (torch.arange(length) % 2 == 0)] = float("inf")
    dy = torch.randn(n, length, c, generator=gen)
    dy[~mask] = float("nan")
    rows = x.double()[mask]
    ref = torch.nn.BatchNorm1d(c).double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, c))
    rows.requires_grad_(True)
    yr = ref(rows)
    yr.backward(dy.double()[mask])
    runs = {"torch": _masked_run(x, mask, "torch", monkeypatch, dy)}
    from normlab.kernels import available
    if available("numba"):
        runs["numba"] = _masked_run(x, mask, "numba", monkeypatch, dy)
    for backend, (y, dx, dw, db, rm, rv) in runs.items():
        assert torch.isfinite(y).all() and torch.isfinite(dx).all(), backend
        assert (y[~mask] == 0).all() and (dx[~mask] == 0).all(), backend
        torch.testing.assert_close(y[mask].double(), yr.detach(), atol=2e-5, rtol=0, msg=backend)
        rel = ((dx[mask].double() - rows.grad).abs().max() / rows.grad.abs().max()).item()
        assert rel < 1e-5, (backend, rel)
        torch.testing.assert_close(dw.double(), ref.weight.grad, atol=1e-2, rtol=1e-4, msg=backend)
        torch.testing.assert_close(db.double(), ref.bias.grad, atol=1e-4, rtol=1e-5, msg=backend)
        torch.testing.assert_close(rm.double(), ref.running_mean, rtol=1e-6, atol=0, msg=backend)
        torch.testing.assert_close(rv.double(), ref.running_var, rtol=1e-6, atol=0, msg=backend)
    if "numba" in runs:
        for a, b in zip(runs["torch"], runs["numba"]):
            torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)


def test_masked_partial_moments_merge_to_the_gathered_rows_moments():
    from normlab.core import stats
    from normlab.core.masked import positions
    from normlab.core.plan import batch_plan

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, generator=gen, dtype=torch.float64) * 3 + 7
    mask = torch.rand(50, generator=gen) > 0.3
    x[~mask] = float("nan")
    valid, padded, _ = positions(mask)
    packed, _ = stats.masked_partial_moments(x, valid, padded)
    total, common, mean, var = stats.merge_moments(packed)
    rows = x[mask]
    assert total.tolist() == [float(mask.sum())] * 3
    torch.testing.assert_close(common + mean, rows.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(var, rows.var(0, unbiased=False), rtol=1e-13, atol=0)
    whole = stats.merge_moments(stats.partial_moments(rows, batch_plan(tuple(rows.shape))))
    torch.testing.assert_close(var, whole[3], rtol=1e-13, atol=0)


def test_numba_runs_masked_statistics_through_the_seam(numba_seam_calls):
    """On the numba backend the masked statistics are the seam's over the mask (mask=), nothing gathered for
    the fused kernels; the result is BatchNorm of the valid positions."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 3, generator=gen, requires_grad=True)
    mask = _mask(4, 7, gen, min_len=2)
    y = nn.MaskedBatchNorm1d(3)(x, mask=mask)
    y.backward(torch.ones_like(y))
    assert [name for name, _ in numba_seam_calls] == ["partial_moments", "partial_grad_sums"]
    assert all(kwargs["mask"].sum() == mask.sum() for _, kwargs in numba_seam_calls)
    rows = torch.nn.functional.batch_norm(x.detach()[mask], None, None, training=True)
    torch.testing.assert_close(y[mask], rows, atol=1e-5, rtol=1e-5)
    assert (y[~mask] == 0).all()
