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
    assert [c.status for c in checks][:2] == ["pass", "pass"] and len(rows) == 8
