import math

import pytest
import torch

from normlab.lab.papers import domain_shift as ds


def test_corruptions_are_deterministic_clipped_and_grow_with_severity():
    x = torch.rand(4, 1, 12, 12)
    for kind in ds.SEVERITIES:
        outs = [ds.corrupt(x, kind, s) for s in range(1, 6)]
        assert torch.equal(outs[2], ds.corrupt(x, kind, 3))
        assert all(o.min() >= 0 and o.max() <= 1 and o.shape == x.shape for o in outs)
        dist = [(o - x).abs().mean().item() for o in outs]
        assert dist[-1] > dist[0] > 0, kind
    with pytest.raises(ValueError, match="unknown corruption"):
        ds.corrupt(x, "fog", 1)


def test_probe_adapts_copies_and_records_every_severity(context, snapshot):
    ctx = context()
    unchanged = snapshot(ctx.model)
    out = ds.domain_shift({"adapt_batch": 16, "few": [1]}, ctx)
    assert unchanged() and ctx.model.training
    assert out["corruptions"] == list(ds.SEVERITIES)
    for method in ("none", "adabn", "k1"):
        assert len(out[method]) == 4 and all(len(row) == 5 for row in out[method])
        assert all(0 <= a <= 1 for row in out[method] for a in row)


def test_evaluate_turns_errors_into_the_two_checks():
    res = {"clean": 0.9, "corruptions": list(ds.SEVERITIES), "none": [[0.5] * 5] * 4, "adabn": [[0.7] * 5] * 4,
           "k1": [[0.65] * 5] * 4}
    runs = {"cnn": {"series": {"domain_shift": {k: [v] for k, v in res.items()}}}}
    rows, checks = ds._evaluate(runs, {"few": [1], "adapt_batch": 16})
    assert [c.status for c in checks] == ["pass", "pass"]
    assert "+20.0 points" == checks[0].value and checks[1].value == "75.0%"
    res["adabn"] = [[0.4] * 5] * 4
    runs = {"cnn": {"series": {"domain_shift": {k: [v] for k, v in res.items()}}}}
    _, checks = ds._evaluate(runs, {"few": [1], "adapt_batch": 16})
    assert checks[0].status == "fail" and math.isnan(float(checks[1].value.rstrip("%")))


def test_over_seeds_the_gain_and_the_share_are_decided_from_their_intervals(decide):
    def seed(adabn, few):
        res = {"clean": 0.9, "corruptions": list(ds.SEVERITIES), "none": [[0.5] * 5] * 4, "adabn": [[adabn] * 5] * 4,
               "k1": [[few] * 5] * 4}
        return {"cnn": {"series": {"domain_shift": {k: [v] for k, v in res.items()}}}}
    statuses, verdict, checks = decide(ds.EXPERIMENT, [seed(0.7 + j, 0.65 + j) for j in (0, .002, -.002, .001, 0)])
    assert statuses == ["pass", "pass"] and verdict == "reproduced" and checks[1]["margin_text"] == "threshold 50.0%"
    # the few-batch share swings from 0% to 100% across the seeds: its CI straddles 50%
    statuses, verdict, _ = decide(ds.EXPERIMENT, [seed(0.7, f) for f in (0.5, 0.7, 0.55, 0.68, 0.6)])
    assert statuses == ["pass", "unclear"] and verdict == "inconclusive"
