"""SyncBatchNorm over gloo processes on 127.0.0.1 against one BatchNorm on the concatenated batch; conversion.

The distributed checks run in tests/nn/sync_workers.py, a few groups of 2–3 processes, each bounded in time.
"""

from pathlib import Path

import pytest
import torch

import normlab
import normlab.nn as nnl
from normlab.core import stats
from normlab.kernels import available

WORKERS = Path(__file__).with_name("sync_workers.py")


@pytest.fixture
def _spawn(gloo_spawn):
    """``_spawn(scenario, world, limit=60)``: :func:`gloo_spawn` on tests/nn/sync_workers.py."""
    return lambda scenario, world, limit=60.0: gloo_spawn(WORKERS, scenario, world, limit)


def _compile_numba_seam():
    """Run the numba seam once in this process on every layout and dtype the distributed cases use, so that
    the kernels are compiled and cached on disk before the bounded processes load them."""
    from normlab.core.plan import batch_plan
    from normlab.kernels.numba.backend import NumbaBackend

    backend = NumbaBackend()
    for shape, fmt in (((4, 3), None), ((4, 3, 5), None), ((4, 3, 2, 2), None),
                       ((4, 3, 2, 2), torch.channels_last)):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(shape, dtype=dtype)
            x = x if fmt is None else x.contiguous(memory_format=fmt)
            plan = batch_plan(tuple(shape))
            merged = stats.merge_moments(backend.partial_moments(x, plan))
            _, shift, ms, _, rstd = backend.apply_moments(x, None, None, merged, plan, 1e-5)
            backend.apply_grad(x, x, None, shift, ms, rstd, backend.partial_grad_sums(x, x, shift, ms, rstd, plan),
                               plan.count, plan)


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    not available("numba"), reason="numba is not installed"))])
def test_exact_against_one_process_on_the_concatenated_batch(_spawn, backend):
    """Per-rank batches (5, 3, 0) and (1, 1, 1); float64 and float32; (N, C), (N, C, L), NCHW, channels_last,
    NCDHW; momentum 0.1 and None: outputs, dx, dγ, dβ and running statistics; eval without communication;
    a single value in total refused; a layer over a sub-group. On the torch engine, and on the numba
    kernels' statistics seam, each step checked to have run there (forward and backward)."""
    if backend == "numba":
        _compile_numba_seam()
    _spawn("exact" if backend == "torch" else "exact_numba", 3, limit=90)


def test_ddp_training_matches_one_process_and_reverts(_spawn):
    if available("numba"):
        _compile_numba_seam()
    _spawn("ddp", 3, limit=120)  # three processes start DDP: 35-45 s at a load of 11 on 2 cores


def test_a_non_finite_batch_on_one_rank_is_skipped_by_all_with_the_convention_kept(_spawn):
    if available("numba"):
        _compile_numba_seam()
    _spawn("guarded", 2)


def test_a_rank_that_never_arrives_ends_the_others_within_the_timeout(_spawn):
    _spawn("never_arrives", 2, limit=40)


def test_a_rank_that_dies_ends_the_others_with_the_layers_error(_spawn):
    _spawn("dies", 3, limit=40)


def test_without_a_process_group_it_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) + 5
    sync, plain = nnl.SyncBatchNorm(3, momentum=None).double(), nnl.BatchNorm2d(3, momentum=None).double()
    for layer in (sync, plain):
        layer(x)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm)
    assert sync.state_dict().keys() == torch.nn.BatchNorm2d(3).state_dict().keys()
    with pytest.raises(ValueError, match="SyncBatchNorm: expected a 2D or 3D or 4D or 5D input"):
        sync(torch.randn(4))


def test_convert_and_revert_keep_state_and_restore_classes():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), nnl.BatchNorm1d(4),
                                torch.nn.SyncBatchNorm(4), nnl.BatchNormReLU2d(4), torch.nn.BatchNorm3d(4))
    shared = torch.nn.BatchNorm2d(4)
    model.append(torch.nn.Sequential(shared, shared))
    model[1].weight.requires_grad_(False)
    model[1].running_mean.fill_(2.0)
    model.eval()
    ids = [id(t) for t in list(model.parameters()) + list(model.buffers())]
    synced = normlab.convert_sync_batchnorm(model, timeout=7)
    assert [type(m).__name__ for m in synced[1:6]] == ["SyncBatchNorm"] * 3 + ["BatchNormReLU2d", "SyncBatchNorm"]
    assert synced[6][0] is synced[6][1] and synced[6][0].layer_name == "6.0"
    assert not synced.training and synced[1].timeout == 7 and not synced[1].weight.requires_grad
    assert [id(t) for t in list(synced.parameters()) + list(synced.buffers())] == ids
    assert synced[1].running_mean.eq(2).all()
    reverted = normlab.revert_sync_batchnorm(synced)
    assert [type(m) for m in reverted[1:6]] == [torch.nn.BatchNorm2d, nnl.BatchNorm1d, torch.nn.SyncBatchNorm,
                                                nnl.BatchNormReLU2d, torch.nn.BatchNorm3d]
    assert type(reverted[6][0]) is torch.nn.BatchNorm2d and reverted[6][0] is reverted[6][1]
    assert [id(t) for t in list(reverted.parameters()) + list(reverted.buffers())] == ids
    assert not reverted.training and not reverted[1].weight.requires_grad


def test_revert_without_a_record_follows_the_input_rank():
    layer = nnl.SyncBatchNorm(3)
    assert type(normlab.revert_sync_batchnorm(layer)) is nnl.BatchNorm2d  # nothing seen: BatchNorm2d
    layer(torch.randn(4, 3, 5))
    assert type(normlab.revert_sync_batchnorm(layer)) is nnl.BatchNorm1d
    assert type(normlab.revert_sync_batchnorm(torch.nn.SyncBatchNorm(3))) is torch.nn.BatchNorm2d
    assert normlab.nn.convert_sync_batchnorm is normlab.convert_sync_batchnorm
    swapped = nnl.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(2)))
    assert type(swapped[0]) is nnl.SyncBatchNorm and swapped[0].replaced is torch.nn.BatchNorm3d


def test_convert_and_revert_carry_the_layer_options():
    """guard_stats, convention and num_batches_skipped survive normlab → SyncBatchNorm → normlab; the
    converted layer stores the convention's biased running variance and keeps its guard off."""
    layer = nnl.BatchNorm2d(3, convention="keras", guard_stats=False)
    layer.num_batches_skipped = 2
    synced = normlab.convert_sync_batchnorm(torch.nn.Sequential(layer))[0]
    assert type(synced) is nnl.SyncBatchNorm
    assert (synced.convention, synced.guard_stats, synced.num_batches_skipped) == ("keras", False, 2)
    assert synced.momentum == pytest.approx(0.01) and synced.eps == pytest.approx(1e-3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    synced.double()(x)
    torch.testing.assert_close(synced.running_var, 0.99 + 0.01 * x.var((0, 2, 3), unbiased=False))
    x[0, 0, 0, 0] = float("nan")
    synced(x)  # guard off: the NaN reaches the running statistics, as in torch.nn
    assert synced.running_mean[0].isnan() and synced.num_batches_skipped == 2
    back = normlab.revert_sync_batchnorm(torch.nn.Sequential(synced))[0]
    assert type(back) is nnl.BatchNorm2d
    assert (back.convention, back.guard_stats, back.num_batches_skipped) == ("keras", False, 2)
    assert back.momentum == pytest.approx(0.01)
    plain = normlab.revert_sync_batchnorm(normlab.convert_sync_batchnorm(torch.nn.BatchNorm2d(3)))
    assert type(plain) is torch.nn.BatchNorm2d and not hasattr(plain, "convention")
