from normlab.lab.papers import fold as lab_fold


def test_probe_folds_every_bn_of_the_lab_cnn_and_times_three_models(context, snapshot):
    ctx = context()
    unchanged = snapshot(ctx.model)
    out = lab_fold.fold_probe({"eval_batch": 32, "repeats": 3}, ctx)
    assert unchanged() and ctx.model.training
    assert out["folded"] == out["bn_layers"] == 4 and out["unfolded"] == []
    assert out["diff64"] <= 1e-12 * max(1.0, out["scale"]) and out["diff32"] <= 1e-5 * max(1.0, out["scale"])
    assert all(out[f"ms_{k}"] > 0 for k in ("original", "folded", "no_bn"))
    runs = {key: {"series": {"fold": {k: [v] for k, v in out.items()}}} for key in lab_fold.MODELS}
    rows, checks = lab_fold._evaluate(runs, {"eval_batch": 32})
    assert [c.status for c in checks][:3] == ["pass", "pass", "pass"] and len(rows) == 8


def test_over_seeds_each_mark_is_decided_from_its_interval(decide):
    def seed(folded, diff32, folded_ms):
        out = {"folded": folded, "bn_layers": 4, "diff64": 1e-15, "diff32": diff32, "scale": 10.0,
               "ms_original": 2.0, "ms_folded": folded_ms, "ms_no_bn": 1.0}
        return {key: {"series": {"fold": {k: [v] for k, v in out.items()}}} for key in lab_fold.MODELS}
    statuses, verdict, _ = decide(lab_fold.EXPERIMENT, [seed(4, 1e-6, 1.1 + j) for j in (0, .01, -.01, .02, 0)])
    assert statuses == ["pass"] * 8 and verdict == "reproduced"
    statuses, verdict, _ = decide(lab_fold.EXPERIMENT, [seed(3, 1e-6, 1.1)] * 5)  # a layer left unfolded on every seed
    assert statuses[0] == "fail" and verdict == "not reproduced"
    # the share of BN's cost removed swings 0-100 % across the seeds: its CI straddles the 50 % mark
    statuses, verdict, _ = decide(lab_fold.EXPERIMENT, [seed(4, 1e-6, ms) for ms in (1.0, 2.0, 1.2, 1.9, 1.4)])
    assert statuses[3] == "unclear" and verdict == "inconclusive"
