"""Guarded running statistics: a batch whose statistics are not finite leaves the running statistics and
num_batches_tracked as they were, is counted in num_batches_skipped, warns once, and its output is what
torch.nn gives. Every test runs once per backend (tests/conftest.py); the Triton kernels are checked in
tests/kernels/triton/test_backend.py."""

import io
import warnings

import numpy as np
import pytest
import torch

import normlab
import normlab.functional as F
import normlab.nn as nl

pytestmark = pytest.mark.usefixtures("backend")


def _nan(x):
    x = x.clone()
    x[np.unravel_index(3, x.shape)] = float("nan")
    return x


def _inf(x):
    x = x.clone()
    x[np.unravel_index(5, x.shape)] = float("inf")
    return x


def _fp16_overflow(x):
    """An activation that overflowed in float16 upstream: values of 1e5 become inf."""
    x = x.clone()
    x[np.unravel_index(7, x.shape)] = 1e5
    return x.half()


def _float32_variance_overflow(x):
    """Finite float32 values whose variance (1e40) does not fit in float32 running statistics."""
    x = x.clone()
    if x.dim() == 2:
        x[: x.shape[0] // 2] = 1e20
    else:  # half of every sample's map (InstanceNorm's statistics are per sample)
        x[..., : x.shape[-1] // 2] = 1e20
    return x


BAD = {"nan": _nan, "inf": _inf, "fp16 overflow": _fp16_overflow, "float32 variance overflow": _float32_variance_overflow}

LAYERS = {
    "BatchNorm1d": (lambda: nl.BatchNorm1d(4), lambda: torch.nn.BatchNorm1d(4), (16, 4)),
    "BatchNorm2d": (lambda: nl.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4), (4, 4, 5, 5)),
    "BatchNorm2d channels_last": (lambda: nl.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4), (4, 4, 5, 5)),
    "BatchNorm3d momentum=None": (lambda: nl.BatchNorm3d(4, momentum=None),
                                  lambda: torch.nn.BatchNorm3d(4, momentum=None), (2, 4, 3, 3, 3)),
    "BatchNormReLU2d": (lambda: nl.BatchNormReLU2d(4), None, (4, 4, 5, 5)),
    "InstanceNorm2d": (lambda: nl.InstanceNorm2d(4, track_running_stats=True),
                       lambda: torch.nn.InstanceNorm2d(4, track_running_stats=True), (4, 4, 5, 5)),
    "LpBatchNorm2d": (lambda: nl.LpBatchNorm2d(4), None, (4, 4, 5, 5)),
    "BatchRenorm1d": (lambda: nl.BatchRenorm1d(4, warmup_steps=0, r_max_steps=0, d_max_steps=0), None, (16, 4)),
    "BatchRenorm2d channels_last": (lambda: nl.BatchRenorm2d(4, warmup_steps=0, r_max_steps=0, d_max_steps=0),
                                    None, (4, 4, 5, 5)),
    "GhostBatchNorm1d": (lambda: nl.GhostBatchNorm1d(4, virtual_batch_size=6), None, (16, 4)),
    "GhostBatchNorm2d channels_last": (lambda: nl.GhostBatchNorm2d(4, virtual_batch_size=3), None, (4, 4, 5, 5)),
    "BatchNorm1d mask=": (lambda: _MaskedCall(4), None, (16, 4)),
    "MaskedBatchNorm1d": (lambda: _SequenceMasked(4), None, (16, 4)),
}


class _MaskedCall(nl.BatchNorm1d):
    """BatchNorm1d called with a mask that pads rows 12 and 13 of a (16, C) batch."""

    def forward(self, x):
        mask = torch.ones(x.shape[0], dtype=torch.bool)
        mask[12:14] = False
        return super().forward(x, mask=mask)


class _SequenceMasked(nl.MaskedBatchNorm1d):
    """MaskedBatchNorm1d on the (16, C) batch as 2 sequences of 8 tokens, the last 2 of the second padded."""

    def forward(self, x):
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1, 6:] = False
        return super().forward(x.reshape(2, 8, x.shape[-1]), mask=mask).reshape(x.shape)


def _input(name, shape, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1
    return x.contiguous(memory_format=torch.channels_last) if "channels_last" in name else x


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", LAYERS)
def test_a_bad_batch_leaves_the_running_statistics_and_is_counted(name, bad):
    make, make_torch, shape = LAYERS[name]
    layer = make()
    layer(_input(name, shape, 1))
    before = _state(layer)
    x = BAD[bad](_input(name, shape, 2))
    with pytest.warns(RuntimeWarning, match="num_batches_skipped"):
        y = layer(x)
    after = _state(layer)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert layer.num_batches_skipped == 1
    if bad != "float32 variance overflow":  # there every output is finite, here and in torch.nn
        assert not torch.isfinite(y.float()).all()
    if make_torch is not None:  # the output is what the math gives, NaN where torch.nn has NaN
        theirs = make_torch()
        theirs.load_state_dict(before)
        expected = theirs(x.float()).to(y.dtype)
        assert torch.equal(torch.isnan(y), torch.isnan(expected))
    # the next bad batch is counted, without a second warning; a good one updates again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
        layer(_input(name, shape, 3))
    assert layer.num_batches_skipped == 2
    assert not torch.equal(layer.running_mean, before["running_mean"])
    assert all(torch.isfinite(v).all() for v in layer.state_dict().values())
    if "num_batches_tracked" in before and name.startswith("Batch"):
        assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_cumulative_average_ignores_the_skipped_batch():
    """momentum=None: the running mean is the average of the good batches only."""
    layer = nl.BatchNorm1d(3, momentum=None)
    good = [torch.randn(8, 3) + i for i in range(3)]
    with pytest.warns(RuntimeWarning):
        for x in (good[0], _nan(good[0]), good[1], good[2]):
            layer(x)
    expected = torch.stack([g.mean(0) for g in good]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)
    assert int(layer.num_batches_tracked) == 3 and layer.num_batches_skipped == 1


def test_large_finite_half_values_are_not_skipped():
    """float16 values near its largest (±6e4) have a variance of 3.6e9, finite in the float32 statistics."""
    layer = nl.BatchNorm1d(2)
    x = torch.tensor([[60000.0, 1.0], [-60000.0, 2.0], [60000.0, 3.0], [-60000.0, 4.0]]).half()
    layer(x)
    assert layer.num_batches_skipped == 0 and int(layer.num_batches_tracked) == 1
    assert layer.running_var[0] == pytest.approx(0.9 + 0.1 * 4.8e9, rel=1e-6)


@pytest.mark.parametrize("how", ["layer", "global"])
def test_guard_off_lets_nan_through_as_torch_nn_does(how):
    layer = nl.BatchNorm2d(4, guard_stats=False if how == "layer" else None)
    x = _nan(torch.randn(4, 4, 3, 3))
    if how == "global":
        with normlab.set_guard_stats(False):
            layer(x)
        assert normlab.core.guard.guard_stats_enabled()  # restored on exit
    else:
        layer(x)
    assert torch.isnan(layer.running_mean).any() and layer.num_batches_skipped == 0
    assert int(layer.num_batches_tracked) == 1


def test_layer_setting_overrides_the_global_one():
    layer = nl.BatchNorm1d(2, guard_stats=True)
    with normlab.set_guard_stats(False), pytest.warns(RuntimeWarning):
        layer(_nan(torch.randn(6, 2)))
    assert torch.isfinite(layer.running_mean).all() and layer.num_batches_skipped == 1
    with pytest.raises(TypeError, match="guard_stats"):
        nl.BatchNorm1d(2, guard_stats="yes")


def test_functional_batch_norm_is_guarded_and_warns():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(RuntimeWarning, match="batch_norm: the batch's mean or variance is not finite"):
        F.batch_norm(_inf(torch.randn(5, 3)), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("op", ["batch_renorm", "ghost_batch_norm", "batch_norm mask="])
def test_functional_renorm_ghost_and_masked_are_guarded_and_warn(op):
    rm, rv = torch.zeros(3), torch.ones(3)
    x = _nan(torch.randn(8, 3))
    call = {
        "batch_renorm": lambda: F.batch_renorm(x, rm, rv, training=True, r_max=2.0, d_max=1.0),
        "ghost_batch_norm": lambda: F.ghost_batch_norm(x, 3, rm, rv, training=True),
        "batch_norm mask=": lambda: F.batch_norm(x, rm, rv, training=True, mask=torch.arange(8) < 6),
    }[op]
    with pytest.warns(RuntimeWarning, match=f"{op.split()[0]}: the batch's mean or variance is not finite"):
        call()
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with normlab.set_guard_stats(False):
        call()
    assert torch.isnan(rm).any()


def test_the_skip_count_survives_state_dict_and_torch_save():
    layer = nl.BatchNorm2d(4)
    with pytest.warns(RuntimeWarning):
        layer(_nan(torch.randn(2, 4, 3, 3)))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = nl.BatchNorm2d(4)
    fresh.load_state_dict(loaded, strict=True)
    assert fresh.num_batches_skipped == 1
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), layer)
    copy = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), nl.BatchNorm2d(4))
    copy.load_state_dict(model.state_dict())
    assert copy[1].num_batches_skipped == 1


def test_state_dict_keys_stay_torch_nn_s_both_ways_with_strict_loading():
    ours = nl.BatchNorm2d(4)
    with pytest.warns(RuntimeWarning):
        ours(_nan(torch.randn(2, 4, 3, 3)))
    ours(torch.randn(2, 4, 3, 3))
    theirs = torch.nn.BatchNorm2d(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs.running_mean, ours.running_mean, rtol=0, atol=0)
    fresh = nl.BatchNorm2d(4)
    fresh.load_state_dict(torch.nn.BatchNorm2d(4).state_dict(), strict=True)
    assert fresh.num_batches_skipped == 0
    ours.reset_running_stats()
    assert ours.num_batches_skipped == 0


def test_convert_keeps_the_guard_working():
    model = nl.convert(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
    with pytest.warns(RuntimeWarning):
        model(torch.full((5, 3), float("nan")))
    assert model[1].num_batches_skipped == 1 and torch.equal(model[1].running_mean, torch.zeros(4))


@pytest.mark.parametrize("layout", ["planar", "rows"])
def test_the_numba_kernels_report_the_skip(layout):
    pytest.importorskip("numba")
    from normlab.kernels.numba import columns, planar

    x = np.random.default_rng(0).standard_normal((4, 3, 5) if layout == "planar" else (20, 3))
    x[1, 1] = np.nan
    y, stats = np.empty_like(x), np.empty((4, 3))
    rm, rv, w, b = np.zeros(3), np.ones(3), np.ones(3), np.zeros(3)
    kernel = planar.bn_planar_forward if layout == "planar" else columns.bn_rows_forward
    args = (x, w, b, 1e-5, True, stats, y, x, 0, rm, rv, 0.1, 20 / 19, np.empty((2, 2, 3)), False)
    assert kernel(*args, True) is True
    assert (rm == 0).all() and (rv == 1).all()
    assert kernel(*args, False) is False  # unguarded: torch.nn's behaviour, NaN in channel 1 only
    assert np.isnan(rm[1]) and np.isfinite(rm[[0, 2]]).all()
