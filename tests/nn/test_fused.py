"""BatchNormReLU2d and BatchNormAddReLU2d against torch's relu(bn(x)) and relu(bn(x) + r), on every backend."""

import pytest
import torch

import normlab.functional as F
import normlab.nn as nl

pytestmark = pytest.mark.usefixtures("backend")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _layers(add, dtype, **kwargs):
    torch.manual_seed(0)
    ours = (nl.BatchNormAddReLU2d if add else nl.BatchNormReLU2d)(5, **kwargs).to(dtype)
    if ours.affine:
        with torch.no_grad():
            ours.weight.normal_()
            ours.bias.normal_()
    theirs = torch.nn.BatchNorm2d(5, **kwargs).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_composition(add, dtype, fmt, affine):
    ours, theirs = _layers(add, dtype, affine=affine)
    gen = torch.Generator().manual_seed(1)
    for train in (True, True, False):
        ours.train(train), theirs.train(train)
        x = torch.randn(4, 5, 6, 7, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
        r = torch.randn(4, 5, 6, 7, generator=gen, dtype=dtype)
        dy = torch.randn(4, 5, 6, 7, generator=gen, dtype=dtype)
        xa, xb, ra, rb = (t.clone().requires_grad_(True) for t in (x, x, r, r))
        ya = ours(xa, ra) if add else ours(xa)
        yb = torch.relu(theirs(xb) + rb) if add else torch.relu(theirs(xb))
        torch.testing.assert_close(ya, yb, **TOL[dtype])
        assert ya.is_contiguous(memory_format=fmt)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
        if add:
            torch.testing.assert_close(ra.grad, rb.grad, **TOL[dtype])
        for pa, pb in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, **TOL[dtype])
            pa.grad = pb.grad = None
        for ba, bb in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(ba, bb, **TOL[dtype])


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("hw", [(3, 3), (17, 17)], ids=["short_runs", "long_runs"])
def test_nan_and_inf_pass_the_relu_as_in_the_composition(add, fmt, hw):
    # torch.relu keeps NaN and passes +inf; a fused ReLU must not turn them into 0 (or 0 into NaN).
    ours, theirs = _layers(add, torch.float32)
    ours.guard_stats = False  # let the NaN batch reach the running statistics as torch.nn's does, for eval
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, *hw, generator=gen)
    r = torch.randn(3, 5, *hw, generator=gen)
    x[1, 2, 0, 1] = float("nan")
    r[0, 3, 1, 0] = float("inf")
    r[2, 4, 0, 0] = float("nan")
    x = x.contiguous(memory_format=fmt)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            ya = ours(x, r) if add else ours(x)
            yb = torch.relu(theirs(x) + r) if add else torch.relu(theirs(x))
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert ya.isnan().sum() == yb.isnan().sum() > 0


def test_state_dict_is_batchnorm2d():
    layer = nl.BatchNormAddReLU2d(3)
    assert isinstance(layer, nl.BatchNorm2d) and isinstance(layer, torch.nn.BatchNorm2d)
    assert list(layer.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    nl.BatchNormReLU2d(3).load_state_dict(torch.nn.BatchNorm2d(3).state_dict())


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
def test_gradcheck_and_gradgradcheck(add):
    layer = (nl.BatchNormAddReLU2d if add else nl.BatchNormReLU2d)(2).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    args, f = ((x, r), layer) if add else ((x,), layer)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_broadcast_residual_and_errors():
    layer = nl.BatchNormAddReLU2d(3)
    x, r = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 1)
    torch.testing.assert_close(layer(x, r), torch.relu(torch.nn.functional.batch_norm(
        x, None, None, layer.weight, layer.bias, training=True) + r))
    with pytest.raises(ValueError, match="expected a 4D input"):
        layer(torch.randn(2, 3, 4), r)
    with pytest.raises(TypeError, match="residual"):
        layer(x, torch.ones(2, 3, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_residual_of_the_wrong_shape_is_refused_before_the_running_statistics_move(momentum):
    layer = nl.BatchNormAddReLU2d(4, momentum=momentum)
    x = torch.randn(8, 4, 5, 5) + 3
    for residual in (torch.randn(8, 4, 5, 4), torch.randn(8, 4, 1, 5, 5), torch.randn(2, 8, 4, 5, 5)):
        with pytest.raises(ValueError, match=r"residual has shape .* does not broadcast to the input's shape"):
            layer(x, residual)
        with pytest.raises(ValueError, match="residual has shape"):
            F.batch_norm_relu(x, layer.running_mean, layer.running_var, training=True, residual=residual)
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))
    assert layer.num_batches_tracked.item() == 0


def test_fused_backward_only_where_the_backend_fuses(backend):
    y = nl.BatchNormReLU2d(3)(torch.randn(4, 3, 2, 2, requires_grad=True))
    expected = {"numba": "NormalizeReLUBackward", "torch": "ReluBackward0"}[backend]
    assert type(y.grad_fn).__name__ == expected


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (8, 5, 32, 32)])
def test_residual_gradient_when_the_input_needs_none(shape):
    """A frozen trunk: x needs no gradient, the residual and the affine parameters do."""
    ours, theirs = _layers(True, torch.float32)
    x = torch.randn(shape)
    ra, rb = (torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True) for _ in range(2))
    dy = torch.randn(shape)
    ours(x, ra).backward(dy)
    torch.relu(theirs(x) + rb).backward(dy)
    torch.testing.assert_close(ra.grad, rb.grad, **TOL[torch.float32])
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("add", [False, True])
def test_forward_ad_batched_grads_and_vmap(add):
    """The fused layers give forward-mode tangents and batched gradients (composed where the fused node
    cannot), and run under torch.func.vmap in eval mode."""
    ours, _ = _layers(add, torch.float64)
    x = torch.randn(4, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    inputs = (x, torch.randn_like(x).requires_grad_(True)) if add else (x,)
    assert torch.autograd.gradcheck(ours, inputs, check_forward_ad=True, check_batched_grad=True)
    ours.eval()
    batched = [t.detach().unsqueeze(0).expand(3, *t.shape) * torch.arange(1.0, 4.0).view(3, 1, 1, 1, 1)
               for t in inputs]
    out = torch.func.vmap(ours)(*batched)
    torch.testing.assert_close(out, torch.stack([ours(*(b[i] for b in batched)) for i in range(3)]))
