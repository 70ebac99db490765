"""The numba kernels against the torch engine on the shapes and layouts the small equivalence tests miss:
BatchNorm on short and long runs (a run summed in one piece or several, the backward on a large tensor
channel by channel) and with any number of blocks, several blocks of rows per thread (LayerNorm's rows are summed four at a time, with the rest one by one),
long channels, rows of 512 channels or more (summed in lockstep),
channels_last GroupNorm, fused ReLU on rows, partial gradients, odd strides, half precision and the
large-mean precision test in every layout."""

import itertools

import numpy as np
import pytest
import torch

import normlab.functional as F
from normlab import reference as ref
from normlab.core.plan import batch_plan
from normlab.kernels import available

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
    "instance eval": (
        lambda x, w, b: F.instance_norm(x, torch.zeros(4, dtype=x.dtype), torch.full((4,), 2.0, dtype=x.dtype), w, b,
                                        use_input_stats=False), (3, 4, 5, 6), 4, None),
    "ln": (lambda x, w, b: F.layer_norm(x, (5, 12), w.repeat(10)[:60].reshape(5, 12), b.repeat(10)[:60].reshape(5, 12)),
           (9, 5, 12), 6, None),
    "ln blocks of rows": (lambda x, w, b: F.layer_norm(x, (66,), w, b), (517, 66), 66, None),
    "gn on (N, C)": (lambda x, w, b: F.group_norm(x, 3, w, b), (37, 6), 6, None),
    "ln over (H, W) channels_last": (lambda x, w, b: F.layer_norm(x, (5, 6), w.reshape(5, 6), b.reshape(5, 6)),
                                     (3, 4, 5, 6), 30, CL),
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
    x64 = (1e4 + 1e-2 * torch.randn(16, 8, 12, 12, generator=gen, dtype=torch.float64)).float().double()
    x32 = x64.float() if fmt is None else x64.float().contiguous(memory_format=fmt)
    dims = {"batch": (0, 2, 3), "group": (2, 3, 4), "layer": (1, 2, 3)}[norm]
    xv = x64.reshape(16, 2, 4, 12, 12) if norm == "group" else x64
    truth = ((xv - xv.mean(dims, keepdim=True)) / xv.std(dims, unbiased=False, keepdim=True)).reshape(x64.shape)
    y = {"batch": lambda: F.batch_norm(x32, None, None, training=True, eps=1e-12),
         "group": lambda: F.group_norm(x32, 2, eps=1e-12),
         "layer": lambda: F.layer_norm(x32, (8, 12, 12), eps=1e-12)}[norm]()
    assert (y.double() - truth).abs().max().item() < 1e-3


@pytest.mark.parametrize("streaming", [False, True], ids=["stores", "streaming"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("shape", [(5, 7, 49), (2, 3, 256), (2, 3, 257), (4, 3, 27), (1, 13, 4), (2, 3, 2049),
                                   (1, 2, 5000)], ids=str)
def test_planar_kernels_with_any_block_count(shape, blocks, dtype, streaming):
    """The (N, C, S) BatchNorm kernels split the N·C runs into one block per thread, with block boundaries
    anywhere in the channel rotation; called directly with 1 to 7 blocks (whatever this machine's thread
    count), on short runs and long ones (S = 256; 257, one piece; 2049 and 5000, two and three pieces),
    they give the float64 reference's statistics, running statistics, output and gradients, in training
    and eval, plain and with the fused add + ReLU, with ordinary and with streaming stores (runs starting
    anywhere against the vector boundaries)."""
    from normlab.kernels import cpu

    n, c, s = shape
    rng = np.random.default_rng(sum(shape) + blocks)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    plan = batch_plan((n, c, s))
    parts = np.full((blocks, 2, c), np.nan)
    for train, epilogue in itertools.product((True, False), (0, 2)):
        x, dy, res = ((rng.standard_normal(shape) * 3 + 2).astype(dtype) for _ in range(3))
        w, b, fixed_mean = (rng.standard_normal(c).astype(dtype) for _ in range(3))
        fixed_var, rm, rv = ((rng.random(c) + 0.5).astype(dtype) for _ in range(3))
        rm0, rv0 = rm.copy(), rv.copy()
        stats = np.zeros((4, c), dtype)
        if not train:
            stats[0], stats[2] = fixed_mean, fixed_var
        y = np.full_like(x, np.nan)
        cpu.bn_planar_forward(x, w, b, 1e-5, train, stats, y, res, epilogue, rm, rv, 0.1, n * s / (n * s - 1), parts,
                              streaming)
        ref_y, cache = ref.forward(x, plan, w, b, 1e-5, *((None, None) if train else (fixed_mean, fixed_var)))
        if epilogue:
            ref_y = np.maximum(ref_y + res, 0.0)
        scale = max(1.0, np.abs(ref_y).max())
        np.testing.assert_allclose(y, ref_y, rtol=0, atol=tol * scale)
        mean = stats[0].astype(np.float64) + stats[1]
        np.testing.assert_allclose(1.0 / np.sqrt(stats[2] + 1e-5), stats[3], rtol=tol)
        if train:
            np.testing.assert_allclose(mean, cache.mean.reshape(c), rtol=0, atol=tol * 10)
            np.testing.assert_allclose(stats[2], cache.var.reshape(c), rtol=tol * 10)
            ref_rm, ref_rv, _ = ref.update_running(rm0, rv0, x, plan, 0.1, 0)
            np.testing.assert_allclose(rm, ref_rm, rtol=tol * 10, atol=tol * 10)
            np.testing.assert_allclose(rv, ref_rv, rtol=tol * 10)
        else:
            np.testing.assert_array_equal(rm, rm0)
        dx, dres = np.full_like(x, np.nan), np.full_like(x, np.nan)
        dw, db = np.empty(c, dtype), np.empty(c, dtype)
        masked = np.where(y > 0, dy, 0.0) if epilogue else dy
        cpu.bn_planar_backward(x, dy, y, w, stats[0], stats[1], stats[3], train, True, epilogue, dx, dres, dw, db, parts,
                               streaming)
        ref_dx, ref_dw, ref_db = ref.backward(masked, cache)
        for got, want in ((dx, ref_dx), (dw, ref_dw), (db, ref_db)):
            np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))
        if epilogue:
            np.testing.assert_array_equal(dres, masked)


@pytest.mark.parametrize("shape", [(128, 4, 1, 256), (512, 4, 8, 8)], ids=str)
def test_short_runs_keep_the_variance_when_the_first_value_is_an_outlier(shape, monkeypatch):
    """A short run is summed in float32 about its own first value, so a channel whose first value (its
    shift) lies 300σ from the mean of 1e4 + N(0, 1e-2) keeps its variance; summed about the channel's shift,
    every run would carry an error growing like (300σ / σ)²."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    gen = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x64[0, :, 0, 0] = 1e4 + 3.0
    x32 = x64.float()
    x64 = x32.double()
    rm, rv = torch.zeros(4), torch.zeros(4)
    y = F.batch_norm(x32, rm, rv, None, None, training=True, momentum=1.0).double()
    truth = torch.nn.functional.batch_norm(x64, None, None, training=True)
    rest = torch.ones_like(truth, dtype=torch.bool)
    rest[0, :, 0, 0] = False
    assert (y - truth)[rest].abs().max().item() < 1e-4
    assert ((y - truth).abs().max() / truth.abs().max()).item() < 1e-5
    var = x64.transpose(0, 1).reshape(4, -1).var(1)
    assert ((rv.double() - var).abs() / var).max().item() < 1e-4


@pytest.mark.parametrize("shape", [(8, 4, 28, 28), (4, 4, 50, 50), (1, 2, 100, 100)], ids=str)
def test_long_runs_keep_their_precision_when_first_values_are_outliers(shape, monkeypatch):
    """A run longer than 256 values is summed in float32 pieces about the median of each piece's first,
    middle and last values: with every run's first value 300σ from the mean of 1e4 + N(0, 1e-2), outputs,
    variance and gradients stay at float32 precision. About the first value, outputs were up to 8e-4 off
    and the variance 6e-5 (28x28 maps)."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x64 = 1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x64[:, :, 0, 0] = 1e4 + 3.0
    x32 = x64.float().requires_grad_(True)
    x64 = x32.detach().double().requires_grad_(True)
    dy = torch.randn(shape, generator=gen)
    w = torch.linspace(0.5, 2.0, c, requires_grad=True)
    w64 = w.detach().double().requires_grad_(True)
    rm, rv = torch.zeros(c), torch.zeros(c)
    y = F.batch_norm(x32, rm, rv, w, None, training=True, momentum=1.0)
    y.backward(dy)
    truth = torch.nn.functional.batch_norm(x64, None, None, w64, None, training=True)
    truth.backward(dy.double())
    # Measured: outputs 1.5e-6 relative, variance 3e-8, gradients 2e-7 (float64 sums: the same).
    assert ((y.detach().double() - truth.detach()).abs().max() / truth.abs().max()).item() < 1e-5
    var = x64.detach().transpose(0, 1).reshape(c, -1).var(1)
    assert ((rv.double() - var).abs() / var).max().item() < 1e-6
    assert ((x32.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item() < 2e-6
    assert ((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item() < 2e-6


@pytest.mark.parametrize("streaming", [False, True], ids=["stores", "streaming"])
def test_backward_on_a_large_tensor_with_long_runs_goes_channel_by_channel(streaming):
    """From 32 MiB on, with runs longer than 256 values, the backward visits one channel at a time
    (``cpu._CHANNEL_BACKWARD_BYTES``); it gives the float64 reference's gradients, plain and after the
    fused add + ReLU, with and without the batch's statistics, with ordinary and streaming stores."""
    from normlab.kernels import cpu

    n, c, s = 2, 2, (cpu._CHANNEL_BACKWARD_BYTES // 16) + 3  # float32: just over the threshold
    assert n * c * s * 4 > cpu._CHANNEL_BACKWARD_BYTES
    rng = np.random.default_rng(5)
    plan = batch_plan((n, c, s))
    x, dy = ((rng.standard_normal((n, c, s)) * 3 + 2).astype(np.float32) for _ in range(2))
    w, b = np.array([0.5, -1.5], np.float32), np.array([0.25, 1.0], np.float32)
    parts = np.empty((2, 2, c))
    empty = np.empty(0, np.float32)
    for train, epilogue in itertools.product((True, False), (0, 2)):
        stats = np.zeros((4, c), np.float32)
        if not train:
            stats[0], stats[2] = np.array([1.5, 2.5], np.float32), np.array([8.0, 10.0], np.float32)
        y = np.empty_like(x)
        cpu.bn_planar_forward(x, w, b, 1e-5, train, stats, y, dy, epilogue, empty, empty, 0.0, 0.0, parts, streaming)
        _, cache = ref.forward(x, plan, w, b, 1e-5, *((None, None) if train else (stats[0], stats[2])))
        dx, dres = np.full_like(x, np.nan), np.full_like(x, np.nan)
        dw, db = np.empty(c, np.float32), np.empty(c, np.float32)
        masked = np.where(y > 0, dy, 0.0) if epilogue else dy
        cpu.bn_planar_backward(x, dy, y, w, stats[0], stats[1], stats[3], train, True, epilogue, dx, dres, dw, db,
                               parts, streaming)
        ref_dx, ref_dw, ref_db = ref.backward(masked, cache)
        for got, want in ((dx, ref_dx), (dw, ref_dw), (db, ref_db)):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))
        if epilogue:
            np.testing.assert_array_equal(dres, masked)


ROW_LAYOUTS = {
    "(N, C) rows": lambda x: x,
    "channels_last rows": lambda x: x.reshape(-1, 4, 1, x.shape[1]).permute(0, 3, 1, 2).contiguous(
        memory_format=CL),
}


@pytest.mark.parametrize("columns", [4, 600], ids=["narrow", "wide"])
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
def test_rows_keep_their_precision_when_the_first_row_is_an_outlier(layout, columns, monkeypatch):
    """Rows are summed eight at a time about each block's first row, and normalized about the rounded
    mean, so an outlier as the first row (1e5 against 1e-2 · N(0, 1): it dominates the variance) costs
    precision in its own block only. Summed about the first row, every block lost digits to it: errors
    of 3e-2 at 65536 rows (ATen: 1e-3)."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    gen = torch.Generator().manual_seed(0)
    n = 8192 if columns == 4 else 2048
    x = 1e-2 * torch.randn(n, columns, generator=gen)
    x[0] = 1e5
    dy = torch.randn(n, columns, generator=gen)
    x, dy = ROW_LAYOUTS[layout](x), ROW_LAYOUTS[layout](dy)
    x.requires_grad_(True)
    w = torch.linspace(0.5, 2.0, columns, requires_grad=True)
    y = F.batch_norm(x, None, None, w, None, training=True)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    truth = torch.nn.functional.batch_norm(x64, None, None, w64, None, training=True)
    truth.backward(dy.double())
    err = (y.detach().double() - truth.detach()).abs()
    outlier = x.detach() == 1e5
    # Measured: 6e-5 on the outlier's own y (about 90; ATen 2e-3 to 6e-3), 2e-8 elsewhere (ATen 8e-7),
    # gradients within 7e-7; summed about the first row: 1.6e-3, 9e-6 and 2e-5.
    assert err[outlier].max().item() < 2e-4
    assert err[~outlier].max().item() < 1e-7
    assert ((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item() < 2e-6
    assert ((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item() < 2e-6


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


def test_channels_last_group_norm_sums_that_overflow_float32_are_taken_in_float64(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    gen = torch.Generator().manual_seed(1)
    x32 = (1e20 * torch.randn(4, 6, 7, 9, generator=gen, dtype=torch.float64)).float().contiguous(memory_format=CL)
    dy = (1e20 * torch.randn(4, 6, 7, 9, generator=gen, dtype=torch.float64)).float().contiguous(memory_format=CL)
    x32.requires_grad_(True)
    y = F.group_norm(x32, 3)
    y.backward(dy)
    x64 = x32.detach().double().requires_grad_(True)
    truth = torch.nn.functional.group_norm(x64, 3)
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
