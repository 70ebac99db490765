"""``lp-norm``: Santurkar et al. 2018, §3.3.

Claim: normalizing by the batch-average ℓ1, ℓ2 or ℓ∞ norm (taken "before shifting the mean") instead of the
standard deviation matches or beats BN; on the deep linear network ℓ1 beats BN. The centred ℓ2 norm is the
standard deviation (that arm is batch norm), so it is kept only as a named control.

Run it with ``normlab lab run lp-norm`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.lab.papers.common import (
    accuracy_check, accuracy_rows, CNN_BUDGETS, cnn_protocol, cnn_run, DLN_BUDGETS, dln_protocol, dln_run, merged,
    POINT,
)
from normlab.lab.spec import Check, curves, Experiment, Figure, final, num, Panel, pct, Row, Runs, Setup, TraceFn

LP_NORMS = {"bn": "BN", "lp1": "ℓ1", "lp2": "ℓ2", "lpinf": "ℓ∞", "lp2-centred": "ℓ2 of x − μ (= BN, control)",
            "none": "no norm"}
CONTROL = "lp2-centred"
"""The control arm (batch norm under another name): no check reads it, so the quick and standard suites leave
it out (``"control": False`` in their budget); smoke and full run it."""
LP_BUDGETS = {suite: {**merged(CNN_BUDGETS[suite], DLN_BUDGETS[suite]), "control": suite != "quick"}
              for suite in CNN_BUDGETS}


def _norms(b: dict[str, Any]) -> dict[str, str]:
    """The arms the budget runs: every one of :data:`LP_NORMS`, less the control where the budget says so."""
    return {n: label for n, label in LP_NORMS.items() if n != CONTROL or b.get("control", True)}


def _lp_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    """The CNN arms share BN's and no-BN's runs with the other CNN experiments; the DLN arms need only their
    loss, so they run without the gradient probes (BN's and no-BN's DLN runs too, to stay paired)."""
    runs = {}
    for norm in _norms(b):
        runs[f"cnn-{norm}"] = cnn_run(setup, b["cnn"], norm)
        runs[f"dln-{norm}"] = dln_run(setup, b["dln"], norm, probes=False)
    return runs


AS_GOOD = POINT
"""An ℓp CNN "matches or beats BN": its final training accuracy is not below BN's by more than this."""
L1_BETTER = 1.0
"""The ℓ1 DLN "beats BN": BN's final loss / ℓ1's exceeds this factor (beyond the noise floor)."""
LP_KEYS = ("lp1", "lp2", "lpinf")


def _lp_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    norms = _norms(b)
    acc = {n: final(runs[f"cnn-{n}"], "train_acc") for n in norms}
    loss = {n: final(runs[f"dln-{n}"], "test_loss") for n in norms}
    rows = [Row(f"CNN final training accuracy, {label}", pct(acc[n]), "ℓp matches or beats BN"
                if n in LP_KEYS else "—", acc[n], "pct") for n, label in norms.items()]
    rows += accuracy_rows({f"cnn-{n}": runs[f"cnn-{n}"] for n in norms},
                          {f"cnn-{n}": label for n, label in norms.items()}, {}, what="CNN final test accuracy")
    rows += [Row(f"DLN final training loss (full batch), {label}", num(loss[n]), "ℓ1 beats BN" if n == "lp1" else "—",
                 loss[n]) for n, label in norms.items()]
    checks = [accuracy_check(f"CNN: {LP_NORMS[n]} matches or beats BN (training accuracy not more than "
                             f"{100 * AS_GOOD:g} point below)", acc[n], acc["bn"], ">=", AS_GOOD,
                             paper="matches or beats BN (§3.3)") for n in LP_KEYS]
    checks.append(Check.compare(f"DLN: ℓ1 ends with a lower loss than BN (BN / ℓ1 > {L1_BETTER:g})", loss["bn"],
                                loss["lp1"], ">", math.log(L1_BETTER), log=True, paper="ℓ1 beats BN (§3.3)"))
    return rows, checks


def _present(makers: tuple[TraceFn, ...], model: str) -> tuple[TraceFn, ...]:
    """The curves of the arms a suite ran (the control is absent from quick and standard)."""
    def only(make: TraceFn, norm: str) -> TraceFn:
        return lambda runs: make(runs) if f"{model}-{norm}" in runs else []
    return tuple(only(make, norm) for make, norm in zip(makers, LP_NORMS))


LP_NORM = Experiment(
    name="lp-norm",
    title="ℓp normalization instead of BN",
    paper="Santurkar et al. 2018, §3.3",
    claim=("Normalizing by the batch-average ℓ1, ℓ2 or ℓ∞ norm instead of the standard deviation matches or "
           "beats BN; on the deep linear network ℓ1 beats BN."),
    protocol=lambda b: (cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) +
              " ℓp layers: normlab.nn.extra.LpBatchNorm{1d,2d}(centered=False): subtract the batch mean, divide "
              "by the batch-average ℓp norm taken before the mean is subtracted, (mean |x|^p)^(1/p) (ℓ∞: max |x|), "
              "the paper's \"before shifting the mean\"; affine; in place of BN. Control: the centred ℓ2, "
              "(mean |x − μ|²)^(1/2), which is batch norm itself" + ("" if b.get("control", True) else
              " (left out of this suite: no check reads it)") + ". The DLN arms run without the gradient "
              "probes. Accuracy: training accuracy (what the paper "
              "compares); the DLN's loss is its full-batch training loss."),
    criterion=(f"Paired checks: each un-centred ℓp CNN's final training accuracy − BN's > −{100 * AS_GOOD:g} point "
               f"(non-inferiority), and the DLN's final loss ratio BN / ℓ1 > {L1_BETTER:g} (log-ratio, beyond the "
               "noise floor). Each passes when its 95% CI lies wholly on the paper's side, fails when wholly on the "
               "other; reproduced if all pass, not reproduced if any fails."),
    budgets=LP_BUDGETS,
    build=_lp_build,
    evaluate=_lp_evaluate,
    figures=(Figure("lp-norm", "ℓp normalization vs BN vs none", (
        Panel("CNN: training accuracy", "step", "training accuracy (since last evaluation)",
              _present(curves({f"cnn-{n}": lab for n, lab in LP_NORMS.items()}, "eval", "train_acc"), "cnn")),
        Panel("DLN: loss", "step", "summed squared error",
              _present(curves({f"dln-{n}": lab for n, lab in LP_NORMS.items()}, "eval", "test_loss"), "dln"),
              ylog=True),
    )),),
)
