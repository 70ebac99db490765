"""The statistics seam: partial moments → combine → apply, against one BatchNorm over the whole batch."""

import pytest
import torch

from normlab.core import stats
from normlab.core.plan import batch_plan

torch.manual_seed(0)


def _bn(x, w, b, running=None, momentum=0.1):
    rm, rv = running if running is not None else (None, None)
    return torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=1e-5)


@pytest.mark.parametrize("shape,channels_last", [((7, 3), False), ((4, 3, 5), False), ((3, 4, 5, 2), False),
                                                 ((3, 4, 5, 2), True), ((2, 3, 2, 3, 2), False)])
def test_one_place_is_batchnorm(shape, channels_last):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    runs = [(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)) for _ in range(2)]
    grads = []
    for i, fn in enumerate((lambda *a: stats.normalize_combined(*a[:3], batch_plan(shape), 1e-5,
                                                                (*runs[0], 0.1)),
                            lambda *a: _bn(*a, running=runs[1]))):
        xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = fn(xi, wi, bi)
        y.backward(dy)
        grads.append((y, xi.grad, wi.grad, bi.grad))
        if i == 0 and channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(*runs):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def _split_run(x, w, b, sizes, dy, eps=1e-5):
    """Run ``x`` split along N into ``sizes`` through the seam, each part with combine steps that see every
    part's partials, as the ranks of a process group would; the parts' outputs and gradients concatenated."""
    plan_of = lambda t: batch_plan(t.shape)  # noqa: E731
    parts, dys = x.split(sizes), dy.split(sizes)
    stacked = torch.cat([stats.partial_moments(p.reshape(p.shape), plan_of(p)) for p in parts])
    total, common, mean, var = stats.merge_moments(stacked)
    plan0 = plan_of(parts[0])
    shift, mshift = common.reshape(plan0.stat_shape), mean.reshape(plan0.stat_shape)
    rstd = torch.rsqrt(var.reshape(plan0.stat_shape) + eps)
    sums = sum(stats.partial_grad_sums(d, (p - shift - mshift) * rstd, w.detach().reshape(plan0.param_view),
                                       plan_of(p)) for p, d in zip(parts, dys))
    ys, dxs, dws, dbs = [], [], [], []
    for p, d in zip(parts, dys):
        pi, wi, bi = p.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = stats.normalize_combined(pi, wi, bi, plan_of(p), eps, None, lambda local: stacked, lambda local: sums)
        y.backward(d)
        ys.append(y), dxs.append(pi.grad), dws.append(wi.grad), dbs.append(bi.grad)
    return torch.cat(ys), torch.cat(dxs), sum(dws), sum(dbs)


@pytest.mark.parametrize("sizes", [(5, 3, 0), (1, 1, 1), (0, 4), (2, 2, 2, 2)])
def test_parts_merge_to_the_whole(sizes):
    n = sum(sizes)
    x = torch.randn(n, 3, 2, 2, dtype=torch.float64) * 3 - 1
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    ours = _split_run(x, w, b, sizes, dy)
    xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = _bn(xi, wi, bi)
    y.backward(dy)
    for got, want in zip(ours, (y, xi.grad, wi.grad, bi.grad)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_merge_keeps_a_tiny_spread_about_a_large_mean():
    """1e4 + 1e-2 · N(0, 1) in float32 split in uneven parts: E[x²] − E[x]² would lose the variance entirely
    (1e8 against 1e-4); the merge keeps it to float32 rounding of the data."""
    x64 = 1e4 + 1e-2 * torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x64.float()
    parts = x.split([600, 1, 0, 399])
    stacked = torch.cat([stats.partial_moments(p, batch_plan(p.shape)) for p in parts])
    total, common, mean, var = stats.merge_moments(stacked)
    ref = x.double()  # the float32 data, exactly
    assert total.tolist() == [1000.0, 1000.0]
    torch.testing.assert_close(common + mean, ref.mean(0), rtol=0, atol=1e-8)  # float32's step at 1e4: 1e-3
    torch.testing.assert_close(var, ref.var(0, correction=0), rtol=1e-5, atol=0)
    naive = (x * x).mean(0) - x.mean(0) ** 2  # what the merge must not be
    assert (naive.double() - ref.var(0, correction=0)).abs().max() > 1e-3


def test_no_values_anywhere():
    stacked = torch.cat([stats.partial_moments(torch.empty(0, 3), batch_plan((0, 3)))] * 2)
    total, common, mean, var = stats.merge_moments(stacked)
    assert total.tolist() == [0.0] * 3 and var.tolist() == [1.0] * 3 and mean.tolist() == [0.0] * 3


def test_on_count_sees_the_total_before_running_stats_change():
    rm, rv = torch.zeros(3), torch.ones(3)

    def refuse(total):
        assert total == 12.0
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        stats.normalize_combined(torch.randn(4, 3), None, None, batch_plan((4, 3)), 1e-5, (rm, rv, 0.1),
                                 lambda local: torch.cat([local] * 3), stats.identity, refuse)
    assert rm.eq(0).all() and rv.eq(1).all()


def test_the_combined_update_is_the_guarded_one():
    """A RunningUpdate through the seam: non-finite merged statistics leave the running ones and mark the skip;
    unbiased=False stores the biased merged variance (Keras' and Flax's convention)."""
    from normlab.core.guard import RunningUpdate

    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    bad = x.clone()
    bad[1, 2] = float("nan")
    three_places = lambda local: torch.cat([local] * 3)  # noqa: E731
    running = RunningUpdate(rm, rv, 0.1, guarded=True)
    stats.normalize_combined(bad, None, None, batch_plan((4, 3)), 1e-5, running, three_places)
    assert running.skipped and rm.eq(0).all() and rv.eq(1).all()
    running = RunningUpdate(rm, rv, 0.5, guarded=True, unbiased=False)
    stats.normalize_combined(x, None, None, batch_plan((4, 3)), 1e-5, running, three_places)
    whole = torch.cat([x] * 3)
    assert not running.skipped
    torch.testing.assert_close(rm, 0.5 * whole.mean(0), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(rv, 0.5 + 0.5 * whole.var(0, unbiased=False), rtol=1e-14, atol=1e-15)


def _numba():
    from normlab.kernels import available

    if not available("numba"):
        pytest.skip("numba is not installed")
    from normlab.kernels.numba.backend import NumbaBackend

    return NumbaBackend()


def test_seam_of_takes_a_backend_with_all_four_methods_only():
    backend = _numba()
    assert stats.seam_of(backend) is backend and stats.seam_of(None) is None

    class Partial:  # a backend without apply_grad: its steps are left to the torch engine
        partial_moments = apply_moments = partial_grad_sums = backend.partial_moments

    assert stats.seam_of(Partial()) is None


@pytest.mark.parametrize("sizes", [(5, 3, 0), (1, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_parts_merge_to_the_whole_on_a_backend_seam(sizes, channels_last):
    """normalize_combined with the numba backend's seam, every part seeing every part's partials as the ranks
    of a process group would: outputs, dx, dγ and dβ (summed over parts) and the running statistics of one
    BatchNorm over the whole batch, in float64."""
    backend = _numba()
    n = sum(sizes)
    x = torch.randn(n, 3, 2, 2, dtype=torch.float64) * 3 + 100
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    parts = [p.contiguous(memory_format=fmt) for p in x.split(sizes)]
    plans = [batch_plan(p.shape) for p in parts]
    stacked = torch.cat([backend.partial_moments(p, pl) for p, pl in zip(parts, plans)])
    merged = stats.merge_moments(stacked)
    _, shift, ms, _, rstd = backend.apply_moments(parts[0], w, b, merged, plans[0], 1e-5)
    sums = sum(backend.partial_grad_sums(d, p, shift, ms, rstd, pl) for d, p, pl in zip(dy.split(sizes), parts, plans))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    calls = []

    class Counted:  # the backend, each seam call recorded
        def __getattr__(self, name):
            return lambda *a, **k: calls.append(name) or getattr(backend, name)(*a, **k)

    counted = Counted()
    ys, dxs, dws, dbs = [], [], [], []
    for i, (p, d, pl) in enumerate(zip(parts, dy.split(sizes), plans)):
        pi, wi, bi = p.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = stats.normalize_combined(pi, wi, bi, pl, 1e-5, (rm, rv, 0.1) if i == 0 else None,
                                     lambda local: stacked, lambda local: sums.clone(), backend=counted)
        y.backward(d)
        assert calls == list(stats.SEAM_METHODS), calls
        calls.clear()
        assert y.is_contiguous(memory_format=fmt) and pi.grad.is_contiguous(memory_format=fmt)
        ys.append(y), dxs.append(pi.grad), dws.append(wi.grad), dbs.append(bi.grad)
    xi, wi, bi = (t.clone().requires_grad_(True) for t in (x, w, b))
    rm_ref, rv_ref = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = _bn(xi, wi, bi, running=(rm_ref, rv_ref))
    y.backward(dy)
    ours = (torch.cat(ys), torch.cat(dxs), sum(dws), sum(dbs), rm, rv)
    for got, want in zip(ours, (y, xi.grad, wi.grad, bi.grad, rm_ref, rv_ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unmerged_is_the_merge_of_each_partial_alone():
    """stats.unmerged: every partial's own (N, K, D, σ²), as merge_moments gives them for it alone; an empty
    partial the statistics of nothing (σ² = 1)."""
    gen = torch.Generator().manual_seed(0)
    parts = [stats.partial_moments(5 + torch.randn(n, 3, 4, generator=gen, dtype=torch.float64),
                                  batch_plan((n, 3, 4))) for n in (3, 1, 0, 7)]
    got = stats.unmerged(torch.cat(parts))
    for i, part in enumerate(parts):
        for g, ref in zip(got, stats.merge_moments(part)):
            torch.testing.assert_close(g[i], ref, rtol=1e-15, atol=0)
