"""The numba backend against the torch engine on the shapes and layouts the small equivalence tests miss:
BatchNorm on short and long runs, several blocks of rows per thread (LayerNorm's rows are summed four at a
time, with the rest one by one), rows of 512 channels or more (summed in lockstep), channels_last
GroupNorm, fused ReLU on rows, partial gradients, odd strides, half precision, sums that overflow float32
and the large-mean precision test in every layout."""

import pytest
import torch

import normlab.functional as F
from normlab.kernels import available
from kernel_cases import SHARED_CASES, float32_error_against_float64

pytestmark = pytest.mark.skipif(not available("numba"), reason="numba is not installed")

CL = torch.channels_last

CASES = {
    "bn planar": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (3, 5, 40, 30), 5, None),
    "bn planar short runs relu": (lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True), (9, 5, 7, 7),
                                  5, None),
    "bn planar short runs add relu": (
        lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True, residual=0.5 * x - 1), (9, 5, 7, 7), 5,
        None),
    "bn planar add relu": (
        lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True, residual=0.5 * x - 1), (3, 5, 20, 15), 5,
        None),
    "bn eval planar short runs": (
        lambda x, w, b: F.batch_norm(x, torch.linspace(-1, 1, 6, dtype=x.dtype), torch.linspace(0.5, 2, 6, dtype=x.dtype),
                                     w, b, training=False), (3, 6, 7, 7), 6, None),
    "bn 2d rows": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (301, 7), 7, None),
    "bn channels_last": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (3, 6, 9, 11), 6, CL),
    "bn wide rows": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (203, 520), 520, None),
    "bn channels_last relu": (lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True), (3, 6, 9, 11), 6,
                              CL),
    "bn wide channels_last relu": (lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True),
                                   (3, 520, 5, 7), 520, CL),
    "bn 1x1 maps": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (33, 6, 1, 1), 6, None),
    "bn eval channels_last": (
        lambda x, w, b: F.batch_norm(x, torch.linspace(-1, 1, 6, dtype=x.dtype), torch.linspace(0.5, 2, 6, dtype=x.dtype),
                                     w, b, training=False), (3, 6, 9, 11), 6, CL),
    "gn": (lambda x, w, b: F.group_norm(x, 3, w, b), (4, 6, 7, 9), 6, None),
    "gn channels_last": (lambda x, w, b: F.group_norm(x, 3, w, b), (4, 6, 7, 9), 6, CL),
    "instance channels_last": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (3, 4, 5, 6), 4, CL),
    "ln blocks of rows": (lambda x, w, b: F.layer_norm(x, (66,), w, b), (517, 66), 66, None),
    "gn on (N, C)": (lambda x, w, b: F.group_norm(x, 3, w, b), (37, 6), 6, None),
    **SHARED_CASES,
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("need", [(True, True, True), (False, True, False), (True, False, False)], ids=str)
def test_numba_matches_torch_engine(name, need, matches_engine):
    matches_engine(CASES[name], "numba", need)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bn planar", "bn planar short runs add relu", "bn channels_last", "gn channels_last",
                                  "ln"])
def test_lower_precision_matches_torch_engine(name, dtype, monkeypatch, run_case):
    y_ref, grads_ref = run_case(CASES[name], "torch", dtype)
    y, grads = run_case(CASES[name], "numba", dtype)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.parametrize("fmt", [None, CL], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_large_mean_tiny_spread_in_every_layout(norm, fmt, monkeypatch):
    """1e4 + N(0, 1e-2) in float32 keeps its variance in every kernel family."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    gen = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(16, 8, 12, 12, generator=gen, dtype=torch.float64)
    assert float32_error_against_float64(x64, fmt, norm) < 1e-3


OVERFLOW_LAYOUTS = {
    "short runs": ((8, 4, 7, 7), None),
    "channels_last rows": ((8, 4, 5, 5), CL),
    "wide channels_last rows": ((2, 520, 3, 5), CL),  # 520 columns: summed in lockstep
    "(N, C) rows": ((64, 6), None),
}


@pytest.mark.parametrize("layout", OVERFLOW_LAYOUTS)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_sums_whose_products_overflow_float32_are_taken_in_float64(layout, relu, monkeypatch):
    """float32 data and gradients spread over ±1e20: (x − shift)² and dy · (x − shift) overflow float32,
    so those sums are taken again in float64, and the output and gradients are still right, not zeros,
    whichever kernel (short runs, narrow or wide rows) sums them."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    shape, fmt = OVERFLOW_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    x32 = (1e20 * torch.randn(*shape, generator=gen, dtype=torch.float64)).float()
    dy = (1e20 * torch.randn(*shape, generator=gen, dtype=torch.float64)).float()
    if fmt is not None:
        x32, dy = x32.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x32.requires_grad_(True)
    fn = F.batch_norm_relu if relu else F.batch_norm
    y = fn(x32, None, None, training=True)
    y.backward(dy)
    x64 = x32.detach().double().requires_grad_(True)
    truth = torch.nn.functional.batch_norm(x64, None, None, training=True)
    truth = truth.relu() if relu else truth
    truth.backward(dy.double())
    assert (y.detach().double() - truth.detach()).abs().max().item() < 1e-5
    assert ((x32.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item() < 1e-5



def test_strided_input_and_expanded_gradient(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64).permute(0, 3, 2, 1).requires_grad_(True)  # (6, 3, 4, 5)
    y = F.batch_norm(x, None, None, training=True)
    (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()  # dy is a broadcast view
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.batch_norm(xr, None, None, training=True)
    (yr * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)


def test_empty_batch(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = F.batch_norm(x, None, None, torch.ones(3), torch.zeros(3), training=True)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
