"""The statistics seam of every backend that has one (partial_moments, apply_moments, partial_grad_sums,
apply_grad; numba's in normlab.kernels.numba.channel, Triton's in normlab.kernels.triton.seam, run under
its interpreter): BatchNorm's training step as partial statistics → combine
(normlab.core.stats.merge_moments) → apply, against the backend's own fused single-call path, the torch
engine's seam and float64, in every BatchNorm layout, with the batch in one place or split over several.
A backend gets the table by having the methods (the ``seam_backend`` fixture)."""

import pytest
import torch

from normlab.core import engine, stats
from normlab.core.plan import batch_plan, group_plan

CL = torch.channels_last
LAYOUTS = {
    # (shape, memory format): values per channel a power of two (exact seam) or not
    "planar": ((4, 3, 8, 8), None),
    "planar odd count": ((3, 5, 7, 9), None),
    "planar long runs": ((2, 3, 50, 60), None),
    "channels_last": ((4, 6, 4, 8), CL),
    "channels_last odd count": ((3, 5, 5, 7), CL),
    "2d rows": ((96, 7), None),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture
def backend(seam_backend):
    return seam_backend


def _data(shape, fmt, dtype, seed=0, mean=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (mean + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy, w, b



PACKS_M2 = {"triton"}
"""Backends whose partial moments hold the M2 their fused path merged (not n · σ² formed again): the seam
then gives the fused results bit for bit whatever the count."""


def _exact(shape):
    count = shape[0] * (torch.Size(shape[2:]).numel() if len(shape) > 2 else 1)
    return count & (count - 1) == 0


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_place_through_the_seam_gives_the_fused_results(backend, layout, dtype):
    """partial_moments → identity → merge_moments → apply_moments, and partial_grad_sums → identity →
    apply_grad, on a batch in one place: the fused forward's output, statistics and running statistics and
    the fused backward's dx, dγ, dβ. Bit for bit where the count per channel is a power of two or the
    backend packs its own M2 (:data:`PACKS_M2`); otherwise the merge's σ² = M2 / n may round M2 = n · σ²
    back one unit off in float64, so within that."""
    shape, fmt = LAYOUTS[layout]
    x, dy, w, b = _data(shape, fmt, dtype)
    plan = batch_plan(shape)
    rm1, rv1 = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1, *st1 = backend.forward(x, w, b, None, None, plan, 1e-5)
    engine.compute_forward(x, w, b, None, None, plan, 1e-5, (rm1, rv1, 0.1), backend)  # the fused running update
    merged = stats.merge_moments(stats.identity(backend.partial_moments(x, plan)))
    y2, *st2 = backend.apply_moments(x, w, b, merged, plan, 1e-5, running=(rm2, rv2, 0.1))
    dx1, dw1, db1 = backend.backward(dy, x, w, *st1[:2], st1[3], plan, True, (True, True, True))
    sums = backend.partial_grad_sums(dy, x, st2[0], st2[1], st2[3], plan)
    dx2 = backend.apply_grad(dy, x, w, st2[0], st2[1], st2[3], stats.identity(sums), plan.count, plan)
    assert dx2.stride() == x.stride()
    pairs = [(y1, y2), *zip(st1, st2), (rm1, rm2), (rv1, rv2), (dx1, dx2), (db1, sums[0]), (dw1, sums[1])]
    for fused, seam in pairs:  # dβ, dγ: the seam's sums in float64, the fused ones rounded to the dtype
        seam = seam.to(fused.dtype)
        if _exact(shape) or backend.name in PACKS_M2:
            assert torch.equal(fused, seam)
        else:
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(seam, fused, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["planar odd count", "channels_last odd count", "2d rows"])
def test_given_statistics_give_the_fused_output_bit_for_bit(backend, layout):
    """apply_moments with the statistics the fused forward saved (N, shift, mean_shifted, σ²) normalizes
    exactly as the fused forward did, plain and with the fused add + ReLU; apply_grad with the fused
    backward's own sums gives its dx and the residual's gradient. (float64: the statistics a float32
    forward returns are rounded to float32, the ones it normalized with are not.)"""
    shape, fmt = LAYOUTS[layout]
    x, dy, w, b = _data(shape, fmt, torch.float64, seed=3)
    res = _data(shape, fmt, torch.float64, seed=4)[0] - 3.0
    plan = batch_plan(shape)
    for relu, residual in ((False, None), (True, res)):
        y1, shift, ms, var, rstd = backend.forward(x, w, b, None, None, plan, 1e-5, residual=residual, relu=relu)
        n = torch.full_like(shift, plan.count, dtype=torch.float64)
        y2, *_ = backend.apply_moments(x, w, b, (n, shift, ms, var), plan, 1e-5, residual=residual, relu=relu)
        assert torch.equal(y1, y2)
        mask = y1 if relu else None
        dx1, dw1, db1, *dres1 = backend.backward(dy, x, w, shift, ms, rstd, plan, True, (True, True, True), y=mask,
                                                 residual=residual is not None)
        sums = backend.partial_grad_sums(dy, x, shift, ms, rstd, plan, y=mask)
        assert torch.equal(sums[0], db1) and torch.equal(sums[1], dw1)
        out = backend.apply_grad(dy, x, w, shift, ms, rstd, sums, plan.count, plan, y=mask,
                                 residual=residual is not None)
        dx2 = out[0] if relu else out
        assert torch.equal(dx1, dx2)
        if residual is not None:
            assert torch.equal(dres1[0], out[1])


MEAN_ATOL = {"numba": 1e-9, "triton": 1e-7}
"""How far a place's mean of float32 data (spread 1 about 1e4) may be from float64's: numba sums the
shifted values in float64; Triton keeps float32 Welford partials per lane (merged in float64)."""


def _split(t, places):
    return list(torch.chunk(t, places, dim=0))


@pytest.mark.parametrize("places", [2, 3])
@pytest.mark.parametrize("layout", ["planar odd count", "planar long runs", "channels_last", "2d rows"])
def test_a_batch_split_over_places_gives_the_whole_batch_statistics(backend, layout, places):
    """Each place's partial moments stacked (the combine an all-reduce would do), merged once, applied on
    each place; the backward's partial sums summed and applied likewise: the outputs, running statistics
    and dx of the whole batch (float64 reference, and the torch engine's seam), on data with a large
    mean and a tiny spread."""
    shape, fmt = LAYOUTS[layout]
    x, dy, w, b = _data(shape, fmt, torch.float32, seed=7, mean=1e4)
    x = (1e4 + 1e-2 * (x.double() - 1e4) * 200).float()  # spread 1: relative spread 1e-4
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    xs, dys = _split(x, places), _split(dy, places)
    plans = [batch_plan(tuple(p.shape)) for p in xs]
    stacked = torch.cat([backend.partial_moments(p, pl) for p, pl in zip(xs, plans)])
    torch_stacked = torch.cat([stats.partial_moments(p.double(), pl) for p, pl in zip(xs, plans)])
    merged = stats.merge_moments(stacked)
    truth = stats.merge_moments(torch_stacked)
    atol = MEAN_ATOL[backend.name]
    torch.testing.assert_close(merged[2] + merged[1], truth[2] + truth[1], rtol=1e-12, atol=atol)
    torch.testing.assert_close(merged[3], truth[3], rtol=1e-5, atol=0)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    outs = [backend.apply_moments(p, w, b, merged, pl, 1e-5, running=(rm, rv, 0.1) if i == 0 else None)
            for i, (p, pl) in enumerate(zip(xs, plans))]
    y = torch.cat([o[0] for o in outs])
    shift, ms, rstd = outs[0][1], outs[0][2], outs[0][4]
    totals = sum(backend.partial_grad_sums(d, p, shift, ms, rstd, pl) for d, p, pl in zip(dys, xs, plans))
    dx = torch.cat([backend.apply_grad(d, p, w, shift, ms, rstd, totals, float(merged[0][0]), pl)
                    for d, p, pl in zip(dys, xs, plans)])

    x64 = x.double().requires_grad_(True)
    w64, b64 = w.double(), b.double()
    rm64, rv64 = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    y64 = torch.nn.functional.batch_norm(x64, rm64, rv64, w64, b64, training=True, momentum=0.1)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=0)
    torch.testing.assert_close(dx.double(), x64.grad, rtol=0, atol=2e-5 * x64.grad.abs().max().item())


def test_the_seam_takes_batchnorm_plans_only(backend):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="BatchNorm plans"):
        backend.partial_moments(x, group_plan(tuple(x.shape), 2))


def test_an_empty_place_contributes_nothing(backend):
    """A place without values packs n = 0, which the merge ignores; applied there, it writes nothing."""
    x = torch.randn(6, 3, 4, 4)
    empty = x[:0]
    plan, eplan = batch_plan(tuple(x.shape)), batch_plan(tuple(empty.shape))
    packed = backend.partial_moments(empty, eplan)
    assert torch.equal(packed, torch.zeros(1, 4, 3, dtype=torch.float64))
    merged = stats.merge_moments(torch.cat([backend.partial_moments(x, plan), packed]))
    alone = stats.merge_moments(backend.partial_moments(x, plan))
    for a, b in zip(merged, alone):
        assert torch.equal(a, b)
    y, *_ = backend.apply_moments(empty, None, None, merged, eplan, 1e-5)
    assert y.shape == empty.shape
