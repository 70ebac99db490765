"""``noisy-bn``: Santurkar et al. 2018, Fig. 2.

Claim: BN followed by random per-step shifts and scales of every unit trains about as well as BN and
better than no BN, although its layer inputs are less stable; the same noise without BN stops training.

Run it with ``normlab lab run noisy-bn`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.lab.papers.common import (
    accuracy_check, accuracy_panels, accuracy_rows, ACTIVATION_BLOCKS, CNN_BUDGETS, cnn_protocol, cnn_run, POINT,
    shift,
)
from normlab.lab.spec import band, Check, Experiment, Figure, final, num, Panel, pct, Row, Runs, Setup

NOISY_LABELS = {"bn": "BN", "bn+noise": "BN + noise", "none": "no BN", "noise": "no BN + noise"}


def _noisy_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    return {norm: cnn_run(setup, b, norm) for norm in NOISY_LABELS}


AS_WELL = 2 * POINT
"""Noisy BN "trains about as well as BN": its training accuracy is not below BN's by more than this."""
BEATS = POINT
"""Noisy BN beats no BN in training accuracy by more than this."""
LESS_STABLE = 1.5
"""Noisy BN's ReLU inputs shift more than no-BN's by more than this factor."""
STOPS = 10 * POINT
"""The same noise without BN "stops training": its training accuracy is below no-BN's by more than this."""
CHANCE = 0.1


def train_accuracy(run: dict[str, Any]) -> float:
    """Final training accuracy (mean over the batches since the last evaluation, noise on, as the papers plot
    it); a diverged run counts at chance."""
    return CHANCE if run["diverged_at"] is not None else final(run, "train_acc")


def _noisy_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {k: train_accuracy(r) for k, r in runs.items()}
    rows = [Row(f"final training accuracy, {label}", pct(acc[k]), paper, acc[k], "pct")
            for (k, label), paper in zip(NOISY_LABELS.items(), ("reference", "about as good as BN",
                                                                 "well below BN and noisy BN", "does not train"))]
    rows += accuracy_rows(runs, NOISY_LABELS, {}, what="final test accuracy (noise off at test time)")
    shifts = {}
    for site, where in SITES.items():
        shifts[site] = {k: shift(r, site) for k, r in runs.items()}
        rows += [Row(f"distribution shift per probe at {where}, {label}", num(shifts[site][k]),
                     "noisy BN: less stable than no BN" if k == "bn+noise" else "—", shifts[site][k])
                 for k, label in NOISY_LABELS.items()]
    checks = [
        accuracy_check(f"noisy BN trains about as well as BN (training accuracy not more than {100 * AS_WELL:g} "
                       "points below)", acc["bn+noise"], acc["bn"], ">=", AS_WELL,
                       paper="about as good as BN (Fig. 2)"),
        accuracy_check(f"noisy BN beats no BN in training accuracy by more than {100 * BEATS:g} point",
                       acc["bn+noise"], acc["none"], ">", BEATS, paper="well above no BN (Fig. 2)"),
        Check.compare(f"noisy BN's ReLU inputs shift more than no-BN's (by more than {LESS_STABLE:g}x)",
                      shifts["act_input"]["bn+noise"], shifts["act_input"]["none"], ">", math.log(LESS_STABLE),
                      log=True, paper="noisy BN's layer inputs less stable than no-BN's (Fig. 2)"),
        accuracy_check(f"the same noise without BN stops training (training accuracy more than {100 * STOPS:g} "
                       "points below no BN; a diverged run counts at chance)", acc["noise"], acc["none"], "<",
                       STOPS, paper="does not train (§2)"),
    ]
    return rows, checks


SITES = {"pre_norm": "the convolution's output", "act_input": "the ReLU's input (after BN and noise)"}


NOISY_BN = Experiment(
    name="noisy-bn",
    title="Noisy BN: BN with injected covariate shift",
    paper="Santurkar et al. 2018, Fig. 2",
    claim=("BN followed by random per-step shifts and scales of every unit (more unstable layer inputs than "
           "without BN) trains about as well as BN and better than no BN; the same noise without BN stops "
           "training. So BN's benefit is not the stability of layer inputs."),
    protocol=lambda b: cnn_protocol(b) + (
        " Noise: normlab.nn.extra.CovariateShiftNoise after every BN layer (before the ReLU), exactly PAPERS.md "
        "§2: per step and unit μ ~ U(−0.5, 0.5), σ ~ U(1, 1.25); per element m ~ U(μ ± 0.1), s ~ N(σ, 0.1); "
        "a → s·a + m, seeded generators. lr 0.1. Shift as in santurkar-lr, at both sites: the convolution's "
        "output and the ReLU's input (after BN and noise: the layer input the noise makes unstable, which the "
        "check uses). Accuracy: training accuracy with the noise on, as Fig. 2 plots it (at test time the noise "
        "is off, so the tested net is not the trained one; test accuracy is shown beside it)."),
    criterion=(f"Four paired checks on training accuracy (what Fig. 2 plots) and shifts: noisy BN − BN > "
               f"−{100 * AS_WELL:g} points; noisy BN − no BN > {100 * BEATS:g} point; noisy BN's ReLU-input shift "
               f"/ no-BN's > {LESS_STABLE:g} (log-ratio); noise without BN − no BN < −{100 * STOPS:g} points. Each "
               "passes when its 95% CI lies wholly on the paper's side, fails when wholly on the other; reproduced "
               "if all pass, not reproduced if any fails."),
    budgets=CNN_BUDGETS,
    build=_noisy_build,
    evaluate=_noisy_evaluate,
    figures=(
        Figure("noisy-bn", "Noisy BN vs BN vs no BN", accuracy_panels(NOISY_LABELS, "lr 0.1")),
        Figure("noisy-bn-activations", "Distribution of one activation over training (conv 6, noise on)",
               tuple(Panel(label, "step", "ReLU input (15/50/85th pct)",
                           (band(key, label, "activations", f"b{ACTIVATION_BLOCKS[-1]}_act_input_pct"),))
                     for key, label in NOISY_LABELS.items())),
    ),
)
