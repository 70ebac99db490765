"""The (N, C, S) BatchNorm kernels (normlab.kernels.numba.planar) called directly and through the layers:
any number of blocks, short and long runs (one piece or several), outlier first values, and the backward
on a large tensor channel by channel."""

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
    from normlab.kernels.numba import planar

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
        planar.bn_planar_forward(x, w, b, 1e-5, train, stats, y, res, epilogue, rm, rv, 0.1, n * s / (n * s - 1), parts,
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
        planar.bn_planar_backward(x, dy, y, w, stats[0], stats[1], stats[3], train, True, epilogue, dx, dres, dw, db, parts,
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
    (``planar._CHANNEL_BACKWARD_BYTES``); it gives the float64 reference's gradients, plain and after the
    fused add + ReLU, with and without the batch's statistics, with ordinary and streaming stores."""
    from normlab.kernels.numba import planar

    n, c, s = 2, 2, (planar._CHANNEL_BACKWARD_BYTES // 16) + 3  # float32: just over the threshold
    assert n * c * s * 4 > planar._CHANNEL_BACKWARD_BYTES
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
        planar.bn_planar_forward(x, w, b, 1e-5, train, stats, y, dy, epilogue, empty, empty, 0.0, 0.0, parts, streaming)
        _, cache = ref.forward(x, plan, w, b, 1e-5, *((None, None) if train else (stats[0], stats[2])))
        dx, dres = np.full_like(x, np.nan), np.full_like(x, np.nan)
        dw, db = np.empty(c, np.float32), np.empty(c, np.float32)
        masked = np.where(y > 0, dy, 0.0) if epilogue else dy
        planar.bn_planar_backward(x, dy, y, w, stats[0], stats[1], stats[3], train, True, epilogue, dx, dres, dw, db,
                               parts, streaming)
        ref_dx, ref_dw, ref_db = ref.backward(masked, cache)
        for got, want in ((dx, ref_dx), (dw, ref_dw), (db, ref_db)):
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))
        if epilogue:
            np.testing.assert_array_equal(dres, masked)
