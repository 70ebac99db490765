import torch

from normlab.lab.papers import precise_stats as ps


def test_probe_measures_four_statistics_and_leaves_the_model_as_it_was(context, snapshot):
    ctx = context()
    unchanged = snapshot(ctx.model)
    cfg = {"batch": 16, "shadow_momentum": 0.5, "precise_batches": 3}
    out = ps.population_stats(cfg, ctx)
    assert set(out) == {"acc_batch", "acc_ema", "acc_ema_slow", "acc_precise"}
    assert all(0 <= v <= 1 for v in out.values())
    assert unchanged() and ctx.model.training
    shadow = ps._SHADOWS[ctx.model]
    first = {k: v[0].clone() for k, v in shadow.stats.items()}
    assert all(torch.equal(v, torch.zeros_like(v)) for v in first.values())  # the probe's own passes are not counted
    ctx.model(ctx.x)  # a training forward updates the slower EMA ...
    assert not all(torch.equal(shadow.stats[k][0], first[k]) for k in first)
    moved = {k: v[0].clone() for k, v in shadow.stats.items()}
    ctx.model.eval()(ctx.x)  # ... an eval forward does not
    assert all(torch.equal(shadow.stats[k][0], moved[k]) for k in moved)


def test_checks_follow_the_thresholds():
    def run(ema, slow, precise):
        return {"series": {"population_stats": {"step": [0, 10, 20], "acc_batch": [0.1, 0.8, 0.8],
                                                "acc_ema": [0.1, ema, ema], "acc_ema_slow": [0.1, slow, slow],
                                                "acc_precise": [0.1, precise, precise]}}}
    _, checks = ps._evaluate({"normal": run(0.8, 0.7, 0.805), "high": run(0.5, 0.4, 0.7)}, {})
    assert [c.status for c in checks] == ["pass", "pass", "pass"]
    _, checks = ps._evaluate({"normal": run(0.8, 0.7, 0.7), "high": run(0.7, 0.75, 0.6)}, {})
    assert [c.status for c in checks] == ["fail", "fail", "fail"]


def test_over_seeds_the_intervals_decide_and_agreement_is_an_equivalence_test(decide, fab):
    def run(ema, slow, precise):
        return {"series": {"population_stats": {"step": [0, 10, 20], "acc_batch": [0.1, 0.8, 0.8],
                                                "acc_ema": [0.1, ema, ema], "acc_ema_slow": [0.1, slow, slow],
                                                "acc_precise": [0.1, precise, precise]}}}
    def seeds(normal_gap):
        return [{"normal": run(0.8 + j, 0.7, 0.8 + j + g), "high": run(0.5 + j, 0.4 + j, 0.7 + j)}
                for j, g in zip(fab.JITTER, normal_gap)]
    statuses, verdict, checks = decide(ps.EXPERIMENT, seeds([0.001] * 5))
    assert statuses == ["pass"] * 3 and verdict == "reproduced" and checks[1]["claim"] == "="
    statuses, verdict, _ = decide(ps.EXPERIMENT, seeds([0.05] * 5))  # precise 5 points ahead: they do not agree
    assert statuses[1] == "fail" and verdict == "not reproduced"
    statuses, verdict, _ = decide(ps.EXPERIMENT, seeds(fab.STRADDLE))
    assert statuses[1] == "unclear" and verdict == "inconclusive"
