import math

import pytest

from normlab.lab.papers import ics


def test_rising_fraction_counts_steps_on_which_the_loss_rose():
    run = {"series": {"eval": {"test_loss": [5.0, 4.0, 4.5, 3.0, 3.5, 3.4]}}}
    assert ics.rising_fraction(run) == pytest.approx(2 / 5)
    assert math.isnan(ics.rising_fraction({"series": {"eval": {"test_loss": [1.0]}}}))


def test_layer_cos_reads_the_paper_layers_one_based():
    run = {"series": {"ics": {"cos": [[1.0] + [0.1 * i for i in range(1, 25)], [1.0] + [0.2] * 24]}}}
    assert ics.layer_cos(run, 9) == pytest.approx((0.8 + 0.2) / 2)
    assert ics.layer_cos(run, 17) == pytest.approx((1.6 + 0.2) / 2)
    assert math.isnan(ics.layer_cos({"series": {"ics": {"cos": [[1.0] * 5]}}}, 9))


def test_both_learning_rates_have_their_own_experiment_and_share_the_cnn_runs():
    from normlab.lab.spec import Setup

    setup = Setup("smoke", "fashion-mnist", 0, "cpu")
    a = ics.ICS.runs(setup)
    b = ics.ICS_SLOW.runs(setup)
    assert a["cnn-bn"] == b["cnn-bn"] and a["dln-bn"]["optim"]["lr"] == 1e-6 and b["dln7-bn"]["optim"]["lr"] == 1e-7
    assert str(ics.COS_UNCORRELATED) in ics.ICS.criterion  # thresholds rendered from the constants
