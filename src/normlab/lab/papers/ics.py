"""``ics`` and ``ics-1e-7``: Santurkar et al. 2018 (arXiv 1805.11604), Fig. 3.

Claim: internal covariate shift measured on gradients (the change of a layer's gradient caused by the
update of the layers before it) is as large or larger with BN; in the deep linear network (DLN) without BN
cos(G, G') ≈ 1, with BN G and G' are nearly uncorrelated.

The DLN runs at both learning rates of the paper's Fig. 3(b), with a verdict per lr: 1e-6 (the stated lr,
summed loss), where our DLN without BN sits at the edge of stability (its loss rises on a good fraction of
steps, 3e-6 diverges), and 1e-7. The report shows the rising-loss fraction and cos at layers 9 and 17.

Run them with ``normlab lab run ics ics-1e-7`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normlab.lab.papers.common import (
    CNN_BUDGETS, cnn_gradient_run, cnn_protocol, DLN_BUDGETS, DLN_LR, dln_protocol, dln_run, DLN_SLOW_LR, merged,
)
from normlab.lab.spec import (
    Check, Experiment, Figure, layer_curves, layer_mean, num, Panel, pct, Row, Runs, series, Setup,
)

GRADIENT_LABELS = {"cnn-bn": "CNN, BN", "cnn-none": "CNN, no BN", "dln-bn": "DLN, BN", "dln-none": "DLN, no BN"}
GRADIENT_BUDGETS = {suite: merged(CNN_BUDGETS[suite], DLN_BUDGETS[suite]) for suite in CNN_BUDGETS}
DLN_LRS = {DLN_LR: "dln", DLN_SLOW_LR: "dln7"}
"""The DLN's learning rates and the key prefix of their runs."""

COS_MARGIN = 0.02
"""ICS with BN "as large or larger": BN's mean cos(G, G′) is not above no-BN's by more than this."""
COS_NEAR_ONE = 0.9
"""DLN without BN: cos(G, G′) ≈ 1 means its mean is above this."""
COS_UNCORRELATED = 0.5
"""DLN with BN: "nearly uncorrelated" means a mean cos(G, G′) below this."""
LAYERS = (9, 17)
"""The layers (1-based) whose cos the paper's Fig. 3(b) plots."""


def _gradient_build(setup: Setup, b: dict[str, Any], lrs: tuple[float, ...] = (DLN_LR,)) -> dict[str, Any]:
    runs = {}
    for norm in ("bn", "none"):
        runs[f"cnn-{norm}"] = cnn_gradient_run(setup, b["cnn"], norm)
        for lr in lrs:
            runs[f"{DLN_LRS[lr]}-{norm}"] = dln_run(setup, b["dln"], norm, lr)
    return runs


def _mean_over_probes(run: dict[str, Any], key: str) -> float:
    return float(np.mean(layer_mean(run, "ics", key))) if series(run, "ics", key) else math.nan


def layer_cos(run: dict[str, Any], layer: int) -> float:
    """Mean over probes of cos(G, G′) at ``layer`` (1-based); NaN if the net is shallower."""
    per_probe = [v[layer - 1] for v in series(run, "ics", "cos") if len(v) >= layer]
    return float(np.mean(per_probe)) if per_probe else math.nan


def rising_fraction(run: dict[str, Any]) -> float:
    """Fraction of evaluated steps on which the (full-batch) loss rose: near 0 for a stable lr, near 1/2 at
    the edge of stability."""
    losses = np.asarray([v for v in series(run, "eval", "test_loss") if v is not None], dtype=float)
    return float(np.mean(np.diff(losses) > 0)) if len(losses) > 1 else math.nan


def _ics_evaluate(runs: Runs, b: dict[str, Any], dln: str = "dln") -> tuple[list[Row], list[Check]]:
    keys = {"cnn-bn": "CNN, BN", "cnn-none": "CNN, no BN", f"{dln}-bn": "DLN, BN", f"{dln}-none": "DLN, no BN"}
    cos = {k: _mean_over_probes(runs[k], "cos") for k in keys}
    l2 = {k: _mean_over_probes(runs[k], "l2") for k in keys}
    paper = {f"{dln}-none": "cos ≈ 1 throughout", f"{dln}-bn": "cos ≈ 0 (nearly uncorrelated)",
             "cnn-bn": "ICS as large as or larger than without BN", "cnn-none": "—"}
    rows = [Row(f"mean cos(G, G′) over layers 2.. and probes, {label}", num(cos[k]), paper[k], cos[k])
            for k, label in keys.items()]
    rows += [Row(f"mean ‖G − G′‖₂, {label}", num(l2[k]), "—", l2[k]) for k, label in keys.items()]
    for norm in ("none", "bn"):
        run = runs[f"{dln}-{norm}"]
        for layer in LAYERS:
            c = layer_cos(run, layer)
            rows.append(Row(f"DLN {'no BN' if norm == 'none' else 'BN'}: cos(G, G′) at layer {layer}", num(c),
                            "≈ 1" if norm == "none" else "≈ 0 (Fig. 3b)", c))
        rise = rising_fraction(run)
        rows.append(Row(f"DLN {'no BN' if norm == 'none' else 'BN'}: fraction of steps on which the loss rises",
                        pct(rise), "— (a stable run: ≈ 0)", rise, "pct"))
    checks = [Check.compare(f"{model.upper()}: ICS with BN as large or larger (mean cos(G, G′) with BN − without "
                            f"< {COS_MARGIN:g})", cos[f"{key}-bn"], cos[f"{key}-none"], "<=", COS_MARGIN,
                            floor=False, paper="ICS as large or larger with BN (Fig. 3)")
              for model, key in (("cnn", "cnn"), ("dln", dln))]
    checks += [
        Check.level(f"DLN without BN: cos(G, G′) ≈ 1 (mean > {COS_NEAR_ONE:g})", cos[f"{dln}-none"],
                    COS_NEAR_ONE, ">", paper="≈ 1 throughout (Fig. 3b)"),
        Check.level(f"DLN with BN: G and G′ nearly uncorrelated (mean cos < {COS_UNCORRELATED:g})",
                    cos[f"{dln}-bn"], COS_UNCORRELATED, "<", paper="≈ 0 (Fig. 3b)"),
    ]
    return rows, checks


def _ics_panels(labels: dict[str, str], title: str) -> tuple[Panel, ...]:
    return (
        Panel(f"{title}: cos(G, G′)", "step", "mean over layers 2..", layer_curves(labels, "ics", "cos")),
        Panel(f"{title}: ‖G − G′‖₂", "step", "mean over layers 2..", layer_curves(labels, "ics", "l2"), ylog=True),
    )


def _experiment(lr: float, name: str) -> Experiment:
    dln = DLN_LRS[lr]
    labels = {f"{dln}-bn": f"DLN lr {lr:g}, BN", f"{dln}-none": f"DLN lr {lr:g}, no BN"}
    return Experiment(
        name=name,
        title=f"Internal covariate shift measured on gradients (DLN at lr {lr:g})",
        paper="Santurkar et al. 2018, Fig. 3",
        claim=("Measured as the change of a layer's gradient caused by the update of the layers before it, "
               "internal covariate shift is as large or larger with BN; in the deep linear network without BN "
               "cos(G, G′) ≈ 1 throughout, while with BN G and G′ are nearly uncorrelated."),
        protocol=lambda b: (
            cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) + f" This experiment's DLN lr: {lr:g}."
            " At every probe step t, on that step's batch: G_i = ∇_{W_i} L; G′_i = the same gradient after every "
            "parameter of layers 1..i−1 (weights, biases and BN parameters) took its SGD step −lr·G, layers i.. "
            "unchanged; BN running statistics are restored after each probe. Layer 1 is left out of the means "
            "(its G′ = G by definition)."),
        criterion=(f"Four checks: for the CNN and the DLN, BN's mean cos(G, G′) − no-BN's < {COS_MARGIN:g} (paired); "
                   f"the DLN without BN has mean cos > {COS_NEAR_ONE:g}; the DLN with BN has mean cos < "
                   f"{COS_UNCORRELATED:g}. Each passes when its 95% CI lies wholly on the paper's side, fails "
                   "when wholly on the other; reproduced if all pass, not reproduced if any fails. The other "
                   "learning rate has its own experiment and verdict."),
        budgets=GRADIENT_BUDGETS,
        build=lambda setup, b: _gradient_build(setup, b, (lr,)),
        evaluate=lambda runs, b: _ics_evaluate(runs, b, dln),
        figures=(Figure(name, f"Gradient change caused by the previous layers' update (ICS), DLN lr {lr:g}",
                        _ics_panels({"cnn-bn": "CNN, BN", "cnn-none": "CNN, no BN"}, "CNN")
                        + _ics_panels(labels, f"DLN lr {lr:g}")),),
    )


ICS = _experiment(DLN_LR, "ics")
ICS_SLOW = _experiment(DLN_SLOW_LR, "ics-1e-7")
