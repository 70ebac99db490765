"""``lp-norm``: Santurkar et al. 2018, §3.3.

Claim: normalizing by the batch-average ℓ1, ℓ2 or ℓ∞ norm instead of the standard deviation matches
or beats BN; on the deep linear network ℓ1 beats BN.

Run it with ``normlab lab run lp-norm`` (``--suite smoke|quick|full``).
"""

from __future__ import annotations

from typing import Any

from normlab.lab.papers.common import (
    CNN_BUDGETS, cnn_protocol, cnn_run, DLN_BUDGETS, dln_protocol, dln_run, merged, POINT,
)
from normlab.lab.spec import Check, curves, Experiment, Figure, final, num, Panel, pct, ratio, Row, Runs, Setup

LP_NORMS = {"bn": "BN", "lp1": "ℓ1", "lp2": "ℓ2", "lpinf": "ℓ∞", "none": "no norm"}
LP_BUDGETS = {suite: merged(CNN_BUDGETS[suite], DLN_BUDGETS[suite]) for suite in CNN_BUDGETS}


def _lp_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    runs = {}
    for norm in LP_NORMS:
        runs[f"cnn-{norm}"] = cnn_run(setup, b["cnn"], norm)
        runs[f"dln-{norm}"] = dln_run(setup, b["dln"], norm)
    return runs


def _lp_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {n: final(runs[f"cnn-{n}"]) for n in LP_NORMS}
    loss = {n: final(runs[f"dln-{n}"], "test_loss") for n in LP_NORMS}
    rows = [Row(f"CNN final test accuracy, {label}", pct(acc[n]), "ℓp matches or beats BN" if n.startswith("lp")
                else "—") for n, label in LP_NORMS.items()]
    rows += [Row(f"DLN final loss, {label}", num(loss[n]), "ℓ1 beats BN" if n == "lp1" else "—")
             for n, label in LP_NORMS.items()]
    checks = [Check.of(f"CNN: {LP_NORMS[n]} matches or beats BN (≥ BN − 1 point; fails below BN − 3 points)",
                       f"{100 * (acc[n] - acc['bn']):+.1f} points", acc[n] >= acc["bn"] - POINT,
                       acc[n] < acc["bn"] - 3 * POINT) for n in ("lp1", "lp2", "lpinf")]
    rel = ratio(loss["lp1"], loss["bn"])
    checks.append(Check.of("DLN: ℓ1 ends with a lower loss than BN (fails if > 1.1x BN's)", f"ℓ1/BN = {num(rel)}",
                           rel < 1, rel > 1.1))
    return rows, checks


LP_NORM = Experiment(
    name="lp-norm",
    title="ℓp normalization instead of BN",
    paper="Santurkar et al. 2018, §3.3",
    claim=("Normalizing by the batch-average ℓ1, ℓ2 or ℓ∞ norm instead of the standard deviation matches or "
           "beats BN; on the deep linear network ℓ1 beats BN."),
    protocol=lambda b: (cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) +
              " ℓp layers: normlab.nn.extra.LpBatchNorm{1d,2d}: subtract the batch mean, divide by "
              "(mean |x − μ|^p)^(1/p) (ℓ∞: max |x − μ|), affine, in place of BN."),
    criterion=("Reproduced if every ℓp CNN ends within 1 point of BN or above it and the ℓ1 DLN ends with a lower "
               "loss than the BN DLN. Not reproduced if an ℓp CNN ends > 3 points below BN or the ℓ1 DLN's loss is "
               "> 1.1x BN's. Inconclusive otherwise."),
    budgets=LP_BUDGETS,
    build=_lp_build,
    evaluate=_lp_evaluate,
    figures=(Figure("lp-norm", "ℓp normalization vs BN vs none", (
        Panel("CNN: test accuracy", "step", "test accuracy",
              curves({f"cnn-{n}": lab for n, lab in LP_NORMS.items()}, "eval", "test_acc")),
        Panel("DLN: loss", "step", "summed squared error",
              curves({f"dln-{n}": lab for n, lab in LP_NORMS.items()}, "eval", "test_loss"), ylog=True),
    )),),
)
