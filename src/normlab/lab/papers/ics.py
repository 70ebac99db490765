"""``ics``: Santurkar et al. 2018, Fig. 3.

Claim: internal covariate shift measured on gradients (the change of a layer's gradient caused by the
update of the layers before it) is as large or larger with BN; in the deep linear network without BN
cos(G, G') ≈ 1, with BN G and G' are nearly uncorrelated.

Run it with ``normlab lab run ics`` (``--suite smoke|quick|full``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normlab.lab.papers.common import (
    CNN_BUDGETS, cnn_gradient_run, cnn_protocol, DLN_BUDGETS, dln_protocol, dln_run, merged,
)
from normlab.lab.spec import Check, Experiment, Figure, layer_curves, layer_mean, num, Panel, Row, Runs, series, Setup

GRADIENT_LABELS = {"cnn-bn": "CNN, BN", "cnn-none": "CNN, no BN", "dln-bn": "DLN, BN", "dln-none": "DLN, no BN"}
GRADIENT_BUDGETS = {suite: merged(CNN_BUDGETS[suite], DLN_BUDGETS[suite]) for suite in CNN_BUDGETS}


def _gradient_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    runs = {}
    for norm in ("bn", "none"):
        runs[f"cnn-{norm}"] = cnn_gradient_run(setup, b["cnn"], norm)
        runs[f"dln-{norm}"] = dln_run(setup, b["dln"], norm)
    return runs


def _mean_over_probes(run: dict[str, Any], key: str) -> float:
    return float(np.mean(layer_mean(run, "ics", key))) if series(run, "ics", key) else math.nan


def _ics_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    cos = {k: _mean_over_probes(r, "cos") for k, r in runs.items()}
    l2 = {k: _mean_over_probes(r, "l2") for k, r in runs.items()}
    paper = {"dln-none": "cos ≈ 1 throughout", "dln-bn": "cos ≈ 0 (nearly uncorrelated)",
             "cnn-bn": "ICS as large as or larger than without BN", "cnn-none": "—"}
    rows = [Row(f"mean cos(G, G′) over layers 2.. and probes, {label}", num(cos[k]), paper[k])
            for k, label in GRADIENT_LABELS.items()]
    rows += [Row(f"mean ‖G − G′‖₂, {label}", num(l2[k]), "—") for k, label in GRADIENT_LABELS.items()]
    checks = []
    for model in ("cnn", "dln"):
        d = cos[f"{model}-bn"] - cos[f"{model}-none"]
        checks.append(Check.of(
            f"{model.upper()}: ICS with BN is as large or larger: mean cos(G, G′) with BN ≤ without + 0.02 "
            "(fails if > without + 0.05)", f"{d:+.3f}", d <= 0.02, d > 0.05))
    checks += [
        Check.of("DLN without BN: cos(G, G′) ≈ 1 (≥ 0.99; fails below 0.9)", num(cos["dln-none"]),
                 cos["dln-none"] >= 0.99, cos["dln-none"] < 0.9),
        Check.of("DLN with BN: G and G′ nearly uncorrelated (cos ≤ 0.5; fails at ≥ 0.9)", num(cos["dln-bn"]),
                 cos["dln-bn"] <= 0.5, cos["dln-bn"] >= 0.9),
    ]
    return rows, checks


def _ics_panels(model: str, title: str) -> tuple[Panel, ...]:
    labels = {k: v for k, v in GRADIENT_LABELS.items() if k.startswith(model)}
    return (
        Panel(f"{title}: cos(G, G′)", "step", "mean over layers 2..", layer_curves(labels, "ics", "cos")),
        Panel(f"{title}: ‖G − G′‖₂", "step", "mean over layers 2..", layer_curves(labels, "ics", "l2"), ylog=True),
    )


ICS = Experiment(
    name="ics",
    title="Internal covariate shift measured on gradients",
    paper="Santurkar et al. 2018, Fig. 3",
    claim=("Measured as the change of a layer's gradient caused by the update of the layers before it, "
           "internal covariate shift is as large or larger with BN; in the deep linear network without BN "
           "cos(G, G′) ≈ 1 throughout, while with BN G and G′ are nearly uncorrelated."),
    protocol=lambda b: (cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) +
              " At every probe step t, on that step's batch: G_i = ∇_{W_i} L; G′_i = the same gradient after every "
              "parameter of layers 1..i−1 (weights, biases and BN parameters) took its SGD step −lr·G, layers i.. "
              "unchanged; BN running statistics are restored after each probe. Layer 1 is left out of the "
              "means (its G′ = G by definition)."),
    criterion=("Reproduced if, for the CNN and the DLN, the mean cos(G, G′) with BN is at most 0.02 above "
               "no-BN's, the DLN without BN has cos ≥ 0.99 and the DLN with BN has cos ≤ 0.5. Not reproduced if "
               "BN's cos is > 0.05 above no-BN's in either model, the DLN without BN has cos < 0.9 or the DLN "
               "with BN has cos ≥ 0.9. Inconclusive otherwise."),
    budgets=GRADIENT_BUDGETS,
    build=_gradient_build,
    evaluate=_ics_evaluate,
    figures=(Figure("ics", "Gradient change caused by the previous layers' update (ICS)",
                    _ics_panels("cnn", "CNN") + _ics_panels("dln", "DLN")),),
)
