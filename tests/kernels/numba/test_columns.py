"""The (M, C) row kernels (normlab.kernels.numba.columns): an outlier first row, and channels_last
GroupNorm sums that overflow float32."""

import pytest
import torch

import normlab.functional as F
from normlab.kernels import available

pytestmark = pytest.mark.skipif(not available("numba"), reason="numba is not installed")

CL = torch.channels_last

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
