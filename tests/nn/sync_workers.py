"""The scenarios of tests/nn/test_sync_batchnorm.py, each run in every process of a gloo group on 127.0.0.1
by tests/gloo_runner.py: a scenario runs its checks (every rank can compute the one-process reference on
the concatenated batch, since all data comes from one seed); a failed check exits 1 with the traceback.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import normlab
from normlab.core import stats
from normlab.nn import SyncBatchNorm, SyncBatchNormError

torch.set_num_threads(1)


class _Calls:
    """Counts, per name, the calls of the numba backend's seam methods and of the torch engine's partial
    steps (:mod:`normlab.core.stats`), so that a scenario can tell which path SyncBatchNorm took."""

    NUMBA = ("partial_moments", "apply_moments", "partial_grad_sums", "apply_grad")

    def __init__(self):
        self.counts = {}
        self._wrap(stats, "partial_moments", "torch partial_moments")
        self._wrap(stats, "partial_grad_sums", "torch partial_grad_sums")
        if os.environ.get("NORMLAB_BACKEND") == "numba":
            from normlab.kernels.numba.backend import NumbaBackend

            for name in self.NUMBA:
                self._wrap(NumbaBackend, name, f"numba {name}")

    def _wrap(self, owner, name, key):
        original = getattr(owner, name)
        self.counts[key] = 0

        def counted(*args, **kwargs):
            self.counts[key] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def taken(self, backend: str, steps: int) -> None:
        """Each seam step of ``backend`` ran ``steps`` times since the last check, the other path's none."""
        if backend == "numba":
            want = {f"numba {m}": steps for m in self.NUMBA}
            want.update({"torch partial_moments": 0, "torch partial_grad_sums": 0})
        else:
            want = {"torch partial_moments": steps, "torch partial_grad_sums": steps}
        got = {key: self.counts.get(key, 0) for key in want}
        assert got == want, f"SyncBatchNorm did not take the {backend} path: calls {got}, expected {want}"
        self.counts = dict.fromkeys(self.counts, 0)


_CALLS: list[_Calls] = []


def _calls() -> _Calls:
    if not _CALLS:
        _CALLS.append(_Calls())
    return _CALLS[0]


def _close(a, b, dtype, what):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _one_case(sizes, shape, dtype, channels_last, momentum, rank):
    """SyncBatchNorm on this rank's slice against torch.nn.BatchNorm on the concatenated batch (float64):
    output, dx, dγ and dβ (summed over ranks), running statistics after two steps; each step's partial and
    apply steps on the backend NORMLAB_BACKEND names, forward and backward."""
    backend, calls = os.environ["NORMLAB_BACKEND"], _calls()
    calls.taken(backend, 0)
    gen = torch.Generator().manual_seed(hash((sizes, shape)) % 2**31)
    n, c = sum(sizes), shape[0]
    full = (n, c) + shape[1:]
    ref = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    bn_ref = ref[len(full)](c, momentum=momentum).double()
    bn = SyncBatchNorm(c, momentum=momentum, timeout=20).to(dtype)
    for step in range(2):
        x = (torch.randn(full, generator=gen, dtype=torch.float64) * 3 + 100).to(dtype)
        dy = torch.randn(full, generator=gen, dtype=torch.float64).to(dtype)
        w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
        with torch.no_grad():
            bn.weight.copy_(w), bn_ref.weight.copy_(w)
        xr = _slice(x, sizes, rank).clone()
        if channels_last:
            xr = xr.contiguous(memory_format=torch.channels_last)
        xr.requires_grad_(True)
        bn.zero_grad()
        y = bn(xr)
        y.backward(_slice(dy, sizes, rank))
        calls.taken(backend, 1)
        xf = x.double().requires_grad_(True)
        bn_ref.zero_grad()
        yf = bn_ref(xf)
        yf.backward(dy.double())
        what = f"sizes={sizes} shape={full} {dtype} channels_last={channels_last} momentum={momentum} step {step}"
        assert y.dtype == dtype and y.shape == xr.shape, what
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last), what
        _close(y.detach(), _slice(yf.detach(), sizes, rank), dtype, f"y, {what}")
        _close(xr.grad, _slice(xf.grad, sizes, rank), dtype, f"dx, {what}")
        grads = torch.stack([bn.weight.grad.double(), bn.bias.grad.double()])
        dist.all_reduce(grads)
        _close(grads[0], bn_ref.weight.grad, dtype, f"dγ, {what}")
        _close(grads[1], bn_ref.bias.grad, dtype, f"dβ, {what}")
        _close(bn.running_mean, bn_ref.running_mean, dtype, f"running_mean, {what}")
        _close(bn.running_var, bn_ref.running_var, dtype, f"running_var, {what}")
        assert int(bn.num_batches_tracked) == step + 1, what
    # running statistics are the same, bit for bit, on every rank
    mine = torch.cat([bn.running_mean, bn.running_var]).double()
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(mine, other) for other in everyone), "running statistics differ between ranks"


def exact(rank, world):
    """The cases on the torch engine (the reference path, and the fallback of a backend without the seam)."""
    _exact(rank, world)


def exact_numba(rank, world):
    """The cases on the numba kernels' seam (what NORMLAB_BACKEND=auto picks on CPU), checked to be the
    path taken."""
    os.environ["NORMLAB_BACKEND"] = "numba"
    _exact(rank, world)


def _exact(rank, world):
    for sizes in ((5, 3, 0), (1, 1, 1)):
        for shape, channels_last in (((3,), False), ((3, 4), False), ((3, 2, 3), False), ((3, 2, 3), True),
                                     ((2, 2, 2, 3), False)):
            for dtype in (torch.float64, torch.float32):
                _one_case(sizes, shape, dtype, channels_last, 0.1, rank)
        _one_case(sizes, (3, 2, 2), torch.float64, False, None, rank)
    # eval: no communication (rank 0 alone; a collective would time out), the running statistics used
    bn = SyncBatchNorm(3, timeout=2).double().eval()
    if rank == 0:
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        x = torch.randn(4, 3, 2, dtype=torch.float64)
        ref = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, training=False)
        _close(bn(x), ref, torch.float64, "eval")
    dist.barrier()
    # a single value per channel over every rank's batch is refused on every rank, statistics untouched
    bn = SyncBatchNorm(3, timeout=20)
    try:
        bn(torch.randn(1 if rank == 0 else 0, 3))
        raise AssertionError("one value in total was accepted")
    except ValueError as error:
        assert "more than 1 value" in str(error) and "every rank" in str(error), str(error)
    assert bn.running_var.eq(1).all() and int(bn.num_batches_tracked) == 0
    subgroup(rank, world)


def subgroup(rank, world):
    """A layer over ranks {0, 1} of three: rank 2 never calls it."""
    group = dist.new_group([0, 1])
    if rank == 2:
        return
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bn = SyncBatchNorm(4, process_group=group, timeout=20).double()
    y = bn(x[:4] if rank == 0 else x[4:])
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    _close(y, ref[:4] if rank == 0 else ref[4:], torch.float64, "sub-group")


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), normlab.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    ).double()


def ddp(rank, world):
    """:func:`_ddp` on the torch engine, then (where numba is installed) on the numba kernels' seam."""
    from normlab.kernels import available

    for backend in ("torch", "numba") if available("numba") else ("torch",):
        os.environ["NORMLAB_BACKEND"] = backend
        _ddp(rank, world)


def _ddp(rank, world):
    """Three SGD steps of DDP + SyncBatchNorm on per-rank batches (5, 3, 0) against one process on the
    concatenated batch; then revert_sync_batchnorm gives back the classes and the very tensors."""
    sizes = (5, 3, 0)[:world]
    n = sum(sizes)
    model = _model(0)
    before = [type(m) for m in model]
    synced = normlab.convert_sync_batchnorm(model, timeout=20)
    assert isinstance(synced[1], SyncBatchNorm) and synced[1].layer_name == "1"
    net = torch.nn.parallel.DistributedDataParallel(synced)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref = _model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
        target = torch.randint(0, 2, (n,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(_slice(x, sizes, rank)), _slice(target, sizes, rank),
                                                 reduction="sum") * world / n  # DDP averages: the mean over n
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = torch.nn.functional.cross_entropy(ref(x), target)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    for (name, p), q in zip(synced.named_parameters(), ref.parameters()):
        _close(p.detach(), q.detach(), torch.float64, f"parameter {name} after 3 DDP steps")
    for (name, b), r in zip(synced.named_buffers(), ref.buffers()):
        _close(b.double(), r.double(), torch.float64, f"buffer {name} after 3 DDP steps")
    params = [id(p) for p in synced.parameters()]
    reverted = normlab.revert_sync_batchnorm(synced)
    assert [type(m) for m in reverted] == before, [type(m) for m in reverted]
    assert [id(p) for p in reverted.parameters()] == params


def never_arrives(rank, world):
    """Rank 1 stays alive but never calls the layer: rank 0 fails within the layer's timeout."""
    if rank == 1:
        time.sleep(6)
        return
    bn = normlab.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), timeout=2)
    start = time.monotonic()
    try:
        bn(torch.randn(4, 3))
        raise AssertionError("the layer did not fail")
    except SyncBatchNormError as error:
        took = time.monotonic() - start
        assert "SyncBatchNorm '0'" in str(error) and "2 s" in str(error), str(error)
        assert took < 5, took
    os._exit(0)  # the group is broken: nothing to tear down politely


def dies(rank, world):
    """Rank 2 dies before the first step: the others fail with the layer's error, well within the timeout."""
    if rank == 2:
        os._exit(0)
    bn = SyncBatchNorm(3, timeout=15)
    start = time.monotonic()
    try:
        bn(torch.randn(4, 3, 2))
        raise AssertionError("the layer did not fail")
    except SyncBatchNormError as error:
        assert "SyncBatchNorm (num_features=3)" in str(error), str(error)
        assert time.monotonic() - start < 16
    os._exit(0)


def guarded(rank, world):
    """:func:`_guarded` on the torch engine, then (where numba is installed) on the numba kernels' seam."""
    from normlab.kernels import available

    for backend in ("torch", "numba") if available("numba") else ("torch",):
        os.environ["NORMLAB_BACKEND"] = backend
        _guarded(rank, world)


def _guarded(rank, world):
    """A NaN on rank 1 only: every rank skips the running update (the merged statistics are not finite), counts
    it once and warns once; a good batch then updates with the convention's biased variance on every rank."""
    import warnings

    bn = SyncBatchNorm(3, convention="keras", timeout=20).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4 * world, 3, generator=gen, dtype=torch.float64)
    bad = _slice(x, [4] * world, rank).clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(bad)
        bn(bad)
    assert bn.num_batches_skipped == 2 and int(bn.num_batches_tracked) == 0, bn.num_batches_skipped
    assert sum("num_batches_skipped" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()
    bn(_slice(x, [4] * world, rank))
    torch.testing.assert_close(bn.running_mean, 0.01 * x.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, 0.99 + 0.01 * x.var(0, unbiased=False), rtol=1e-12, atol=1e-14)
    assert int(bn.num_batches_tracked) == 1
