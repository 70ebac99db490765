"""normlab.inspect flags each planted fault and stays quiet on a healthy model."""

import math

import pytest
import torch

import normlab
import normlab.nn
from normlab.health.checks import FLAGS, GAP, STALE_SIGMA

from .conftest import make_batches, make_model


def _flags(report):
    return {lay.name: set(lay.flags) for lay in report.layers}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_healthy_model_is_not_flagged_and_is_left_as_it_was(healthy):
    before = _state(healthy)
    report = normlab.inspect(healthy, make_batches(4, seed=2))
    assert report.flagged == [], report.flagged
    assert [lay.name for lay in report.layers] == ["1", "4", "6"]
    assert all(lay.mean_shift_sigma < STALE_SIGMA / 5 for lay in report.layers)
    assert report.train_eval_gap < GAP
    assert [lay.foldable for lay in report.layers] == [True, True, False]
    assert not healthy.training
    assert all(torch.equal(v, healthy.state_dict()[k]) for k, v in before.items())


def test_nan_running_statistics(healthy):
    healthy[1].running_var[3] = float("nan")
    report = normlab.inspect(healthy, make_batches(2, seed=2))
    assert "nonfinite_stats" in _flags(report)["1"] and report.layers[0].nonfinite_channels == 1
    assert "nonfinite_inputs" in _flags(report)["4"]  # eval output of layer 1 is NaN in channel 3


def test_negative_running_variance(healthy):
    healthy[4].running_var[0] = -1.0
    assert "negative_var" in _flags(normlab.inspect(healthy, make_batches(2, seed=2)))["4"]


def test_stale_statistics_and_the_gap_they_cause(healthy):
    report = normlab.inspect(healthy, make_batches(2, seed=2, shift=3.0))  # the data moved since training
    assert "stale_stats" in _flags(report)["1"] and report.layers[0].mean_shift_sigma > STALE_SIGMA
    assert "train_eval_gap" in report.flags and report.train_eval_gap > GAP


def test_never_updated_statistics():
    report = normlab.inspect(make_model().eval(), make_batches(2, seed=2))
    assert all("never_updated" in f for f in _flags(report).values())


def test_dead_gamma(healthy):
    with torch.no_grad():
        healthy[4].weight[[1, 5]] = 0.0
    report = normlab.inspect(healthy, make_batches(2, seed=2))
    assert _flags(report)["4"] == {"dead_gamma"} and report.layers[1].dead_gamma_channels == 2


def test_train_eval_gap_alone(healthy):
    """Running variances 4x too large in the last BatchNorm: eval shrinks its output, training does not."""
    healthy[4].running_var.mul_(4.0)
    report = normlab.inspect(healthy, make_batches(2, seed=2))
    assert "train_eval_gap" in report.flags and "stale_stats" in _flags(report)["4"]
    assert "stale_stats" not in _flags(report)["1"]


def test_guarded_skips(healthy):
    with pytest.warns(RuntimeWarning):
        healthy.train()(torch.full((2, 3, 8, 8), float("nan")))
    report = normlab.inspect(healthy.eval(), make_batches(2, seed=2))
    assert _flags(report)["1"] == {"guarded_skips"} and report.layers[0].batches_skipped == 1


@pytest.mark.parametrize("kind", ["GhostBatchNorm2d", "BatchRenorm2d"])
def test_guarded_skips_of_every_layer_kind(kind):
    """A ghost or renorm layer's skipped batch (its guarded update, the same as BatchNorm's) is flagged too."""
    torch.manual_seed(0)
    layer = {"GhostBatchNorm2d": lambda: normlab.nn.GhostBatchNorm2d(8, virtual_batch_size=8),
             "BatchRenorm2d": lambda: normlab.nn.BatchRenorm2d(8, warmup_steps=0, r_max_steps=0, d_max_steps=0)}[kind]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), layer(), torch.nn.ReLU())
    with torch.no_grad():
        for x in make_batches(20, seed=1):
            model(x)
        with pytest.warns(RuntimeWarning, match="num_batches_skipped"):
            model(torch.full((32, 3, 8, 8), float("nan")))
    report = normlab.inspect(model.eval(), make_batches(2, seed=2))
    assert "guarded_skips" in _flags(report)["1"] and report.layers[0].batches_skipped == 1
    assert torch.isfinite(model[1].running_mean).all()


def test_small_batches_and_a_batch_training_mode_refuses():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), normlab.nn.BatchNorm1d(4))
    report = normlab.inspect(model, [torch.randn(4, 3)])
    assert "small_batch" in _flags(report)["1"] and report.layers[0].values_per_channel == 4
    report = normlab.inspect(model, [torch.randn(1, 3)])  # one value per channel: no training-mode forward
    assert report.train_eval_gap is None and "train-mode forward failed" in report.notes[0]


def test_json_is_finite_and_says_what_the_flags_mean(healthy):
    healthy[1].running_mean[0] = float("inf")
    data = normlab.inspect(healthy, make_batches(1, seed=2)).to_json()
    assert data["flag_meanings"] == FLAGS and data["layers"][0]["flags"][0] == "nonfinite_stats"
    assert data["layers"][0]["per_channel"]["running_mean"][0] is None
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in data["layers"][0]["per_channel"]["batch_mean"])
