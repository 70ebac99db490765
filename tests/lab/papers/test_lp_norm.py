from normlab.lab.papers import lp_norm
from normlab.lab.spec import Setup


def _run(train_acc: float, loss: float) -> dict:
    return {"diverged_at": None, "series": {"eval": {"step": [0, 1], "train_acc": [None, train_acc],
                                                     "test_acc": [0.1, train_acc], "test_loss": [9.0, loss]}}}


def test_quick_and_standard_leave_out_the_control_and_the_dln_probes():
    exp = lp_norm.LP_NORM
    for suite in ("quick", "standard"):
        runs = exp.runs(Setup(suite, "fashion-mnist", 0, "cpu"))
        assert f"cnn-{lp_norm.CONTROL}" not in runs and f"dln-{lp_norm.CONTROL}" not in runs
        assert all(runs[f"dln-{n}"]["probes"] == [] for n in ("bn", "none", "lp1", "lp2", "lpinf"))
    smoke = exp.runs(Setup("smoke", "fashion-mnist", 0, "cpu"))
    assert f"cnn-{lp_norm.CONTROL}" in smoke and "without the gradient probes" in exp.protocol(exp.budget("smoke"))


def test_evaluate_and_plots_without_the_control():
    b = lp_norm.LP_NORM.budget("quick")
    runs = {f"{m}-{n}": _run(0.8, 2.0 if n == "bn" else 1.0) for m in ("cnn", "dln") for n in lp_norm._norms(b)}
    rows, checks = lp_norm._lp_evaluate(runs, b)
    assert not any("control" in r.quantity for r in rows) and len(checks) == 4
    assert checks[-1].status == "pass"  # BN / ℓ1 = 2 > 1
    panel = lp_norm.LP_NORM.figures[0].panels[0]
    assert [t.label for make in panel.traces for t in make(runs)] == ["BN", "ℓ1", "ℓ2", "ℓ∞", "no norm"]
