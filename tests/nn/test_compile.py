"""torch.compile and torch.export see normlab's layers as torch operations: under tracing the engine runs
its torch code (the numba kernels are foreign to the tracer), so the compiled or exported layer gives the
eager layer's answers, gradients and running statistics, with no graph break (``fullgraph=True``; with
``momentum=None`` the update factor 1/(t + 1) is read from ``num_batches_tracked``, a graph break for
torch.nn's layers as for normlab's).

The tests compile with the ``aot_eager`` backend: the same tracing (dynamo, then AOT autograd) as the
default inductor backend, without generating and compiling C++ for every case."""

import pytest
import torch

import normlab.nn as nl

LAYERS = {  # name: (constructor, takes a residual, fullgraph)
    "BatchNorm2d": (lambda: nl.BatchNorm2d(4), False, True),
    "BatchNorm2d momentum=None": (lambda: nl.BatchNorm2d(4, momentum=None), False, False),
    "BatchNorm1d": (lambda: nl.BatchNorm1d(4), False, True),
    "GroupNorm": (lambda: nl.GroupNorm(2, 4), False, True),
    "LayerNorm": (lambda: nl.LayerNorm([4, 3, 3]), False, True),
    "InstanceNorm2d": (lambda: nl.InstanceNorm2d(4, affine=True, track_running_stats=True), False, True),
    "BatchNormAddReLU2d": (lambda: nl.BatchNormAddReLU2d(4), True, True),
}

# Compiled, the engine's torch operations run; eager, the numba kernels: sums in another order. dγ sums
# dy · x̂ (dy up to 53 here) over three steps, so float32 rounding reaches a few units of 1e-6 relative.
GRAD_TOL = dict(atol=1e-4, rtol=1e-5)


def _inputs(name, residual):
    gen = torch.Generator().manual_seed(0)
    shape = (6, 4) if name == "BatchNorm1d" else (2, 4, 3, 3)
    x = (3 + torch.randn(shape, generator=gen)).requires_grad_(True)
    return (x, torch.randn(shape, generator=gen)) if residual else (x,)


@pytest.mark.parametrize("name", LAYERS)
def test_compiled_layer_matches_eager(name):
    make, residual, fullgraph = LAYERS[name]
    eager, layer = make(), make()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=fullgraph)
    for step in range(3):  # later calls reuses the graph, with the running statistics it updated
        ours, theirs = _inputs(name, residual), _inputs(name, residual)
        y, ye = compiled(*ours), eager(*theirs)
        torch.testing.assert_close(y, ye)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        (ye * torch.arange(ye.numel()).reshape(ye.shape)).sum().backward()
        torch.testing.assert_close(ours[0].grad, theirs[0].grad, **GRAD_TOL)
    for (key, a), b in zip(layer.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    if layer.weight is not None:
        torch.testing.assert_close(layer.weight.grad, eager.weight.grad, **GRAD_TOL)
    layer.eval()
    eager.eval()
    with torch.no_grad():
        x = _inputs(name, residual)
        torch.testing.assert_close(compiled(*x), eager(*x))


def test_exported_layer_matches_eager():
    layer = nl.BatchNorm2d(4)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.eval()
    x = torch.randn(2, 4, 3, 3)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_compiled_layer_norm_over_the_whole_input():
    """LayerNorm whose normalized_shape is the whole input (no batch axis): the compiled gradients, with a
    graph kept for them, are torch.nn's (a sum over no axes is not a sum over every axis)."""
    ln, ref = nl.LayerNorm([2, 3]).double(), torch.nn.LayerNorm([2, 3]).double()
    compiled = torch.compile(ln, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 3, dtype=torch.double)
    ours = torch.autograd.grad(compiled(x), (x, ln.weight, ln.bias), g, create_graph=True)
    theirs = torch.autograd.grad(ref(x_ref), (x_ref, ref.weight, ref.bias), g, create_graph=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
