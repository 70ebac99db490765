"""The numba backend's statistics seam per group of samples (normlab.kernels.numba.groups, ``group_size=``) and
over a mask (``mask=``): partial moments against the torch engine's seam (normlab.core.stats.partial_moments),
and the whole step (partials → merge → apply, gradient sums → apply) against torch.nn BatchNorm in float64
per group / on the valid rows gathered."""

import pytest
import torch

from normlab.core import stats
from normlab.core.plan import batch_plan
from normlab.kernels import available

pytestmark = pytest.mark.skipif(not available("numba"), reason="numba is not installed")

CASES = {  # (shape, memory format, group size)
    "planar ragged": ((10, 3, 5, 4), None, 4),
    "planar equal": ((8, 3, 7), None, 2),
    "channels_last ragged": ((10, 3, 5, 4), torch.channels_last, 4),
    "2d rows ragged": ((14, 6), None, 4),
    "one group": ((6, 3, 4), None, 6),
}


@pytest.fixture(scope="module")
def backend():
    from normlab.kernels.numba.backend import NumbaBackend

    return NumbaBackend()


def _moments(packed):
    """(N, μ, σ²) per channel of merged partial moments (the shift each side chose is its own)."""
    total, common, mean, var = stats.merge_moments(packed)
    return total, common + mean, var


@pytest.mark.parametrize("case", CASES)
def test_groups_match_batchnorm_per_group(backend, case):
    shape, fmt, v = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = 1e3 + torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    w, b = torch.randn(shape[1], generator=gen, dtype=torch.float64), torch.randn(shape[1], generator=gen,
                                                                                   dtype=torch.float64)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    plan = batch_plan(shape)
    packed = backend.partial_moments(x, plan, group_size=v)
    reference = stats.partial_moments(x, plan, group_size=v)
    groups = -(-shape[0] // v)
    assert packed.shape == reference.shape == (groups, 4, shape[1])
    torch.testing.assert_close(_moments(packed), _moments(reference), rtol=1e-12, atol=1e-9)
    alone = stats.merge_moments(packed.transpose(0, 1).reshape(1, 4, -1))
    y, shift, mean_shifted, _, rstd = backend.apply_moments(x, w, b, alone, plan, 1e-5, group_size=v)
    sums = backend.partial_grad_sums(dy, x, shift, mean_shifted, rstd, plan, group_size=v)
    dx = backend.apply_grad(dy, x, w, shift, mean_shifted, rstd, sums, packed[:, 0, 0], plan, group_size=v)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    yr = torch.cat([torch.nn.functional.batch_norm(c, None, None, wr, br, training=True) for c in xr.split(v)])
    yr.backward(dy)
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sums[:, 1].sum(0), wr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sums[:, 0].sum(0), br.grad, rtol=1e-9, atol=1e-9)
    assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_matches_batchnorm_of_the_valid_rows(backend, dtype):
    """Rows (R, C) with a row mask: NaN and inf in the padded rows of x and dy are never read; the first valid
    row (the shift) an outlier."""
    gen = torch.Generator().manual_seed(1)
    r, c = 203, 9
    mask = torch.rand(r, generator=gen) > 0.3
    mask[:3] = False
    x = (5.0 + torch.randn(r, c, generator=gen, dtype=torch.float64)).to(dtype)
    x[3] = 60.0
    dy = torch.randn(r, c, generator=gen, dtype=torch.float64).to(dtype)
    x[~mask], dy[~mask] = float("nan"), float("inf")
    w, b = torch.randn(c, generator=gen, dtype=dtype), torch.randn(c, generator=gen, dtype=dtype)
    plan = batch_plan((r, c))
    packed = backend.partial_moments(x, plan, mask=mask)
    torch.testing.assert_close(_moments(packed), _moments(stats.partial_moments(x, plan, mask=mask)),
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    merged = stats.merge_moments(packed)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    y, shift, mean_shifted, _, rstd = backend.apply_moments(x, w, b, merged, plan, 1e-5, running=(rm, rv, 0.1),
                                                            mask=mask)
    sums = backend.partial_grad_sums(dy, x, shift, mean_shifted, rstd, plan, mask=mask)
    dx = backend.apply_grad(dy, x, w, shift, mean_shifted, rstd, sums, float(mask.sum()), plan, mask=mask)
    rows = x[mask].double().requires_grad_(True)
    wr, br = w.double().requires_grad_(True), b.double().requires_grad_(True)
    rmr, rvr = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    torch.nn.functional.batch_norm(rows, rmr, rvr, wr, br, training=True).backward(dy[mask].double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    yr = torch.nn.functional.batch_norm(rows.detach(), None, None, w.double(), b.double(), training=True)
    torch.testing.assert_close(y[mask].double(), yr, **tol)
    torch.testing.assert_close(dx[mask].double(), rows.grad, **tol)
    torch.testing.assert_close(sums[1], wr.grad, **tol)
    torch.testing.assert_close(sums[0], br.grad, **tol)
    torch.testing.assert_close((rm.double(), rv.double()), (rmr, rvr), **tol)
    assert (y[~mask] == 0).all() and (dx[~mask] == 0).all()


def test_what_the_seam_refuses(backend):
    x = torch.randn(4, 3, 5)
    plan = batch_plan(tuple(x.shape))
    with pytest.raises(ValueError, match="channels-last rows"):
        backend.partial_moments(x, plan, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_size"):
        backend.partial_moments(x, plan, group_size=0)
    rows = torch.randn(6, 3)
    with pytest.raises(ValueError, match="one entry per position"):
        backend.partial_moments(rows, batch_plan((6, 3)), mask=torch.ones(5, dtype=torch.bool))
    merged = stats.merge_moments(backend.partial_moments(x, plan, group_size=2))
    with pytest.raises(ValueError, match="running update"):
        backend.apply_moments(x, None, None, merged, plan, 1e-5, running=(torch.zeros(3), torch.ones(3), 0.1),
                              group_size=2)
