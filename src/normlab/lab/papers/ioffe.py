"""``ioffe-mnist``: Ioffe & Szegedy 2015 (arXiv 1502.03167), Fig. 1.

Claim: with BN a sigmoid MLP trains faster and reaches a higher accuracy, and the
distribution of a last-hidden-layer unit's sigmoid input stays put, while without BN it drifts.

Run it with ``normlab lab run ioffe-mnist`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.lab import measure
from normlab.lab.papers.common import _count, accuracy_check, accuracy_rows, POINT
from normlab.lab.spec import (
    band, Check, curves, Experiment, Figure, final, num, Panel, ratio, Row, run_config, Runs, series, Setup,
)

IOFFE_LABELS = {"bn": "with BN", "none": "without BN"}


def _ioffe_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    data = {"name": "fashion-mnist", "n_train": b["n_train"], "n_test": b["n_test"], "size": None, "n_probe": 512}
    probe = {"kind": "activations", "blocks": [2], "sites": ["act_input"], "train": True,
             "every": b["probe_every"]}
    return {norm: run_config(setup, data, {"arch": "mlp", "hidden": [100, 100, 100], "init_std": b["init_std"],
                                           "norm": norm},
                             lr=b["lr"], steps=b["steps"], batch=b["batch"], eval_every=b["eval_every"],
                             probes=[probe])
            for norm in IOFFE_LABELS}


def steps_to_reach(run: dict[str, Any], target: float) -> float:
    """First evaluated step whose test accuracy reaches ``target`` (NaN if never)."""
    for step, acc in zip(series(run, "eval", "step"), series(run, "eval", "test_acc")):
        if acc is not None and acc >= target:
            return float(step)
    return math.nan


def _ioffe_drift(run: dict[str, Any]) -> float:
    pcts = series(run, "activations", "b2_act_input_pct")
    return measure.percentile_drift(pcts[0], pcts[-1])


ACC_MARGIN = POINT
"""BN's final test accuracy must beat no-BN's by more than this (raised to the noise floor)."""
DRIFT_FACTOR = 2.0
"""BN's percentile drift must be smaller than no-BN's by more than this factor."""


def _ioffe_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc_bn, acc_none = final(runs["bn"]), final(runs["none"])
    drift_bn, drift_none = _ioffe_drift(runs["bn"]), _ioffe_drift(runs["none"])
    target = acc_none
    reach_bn, reach_none = steps_to_reach(runs["bn"], target), steps_to_reach(runs["none"], target)
    rows = accuracy_rows(runs, IOFFE_LABELS, {"bn": "MNIST: higher and earlier than without BN (Fig. 1a)",
                                              "none": "—"})
    rows += [
        Row("steps to reach no-BN's final accuracy, BN vs no BN",
            f"{num(reach_bn)} vs {num(reach_none)} ({num(ratio(reach_none, reach_bn))}x fewer)",
            "Inception: 2.1M vs 31.0M steps to 72.2% (14x fewer)"),
        Row("drift of the sigmoid input's 15/50/85th percentiles (mean |end − start|), BN",
            num(drift_bn), "stays put (Fig. 1c)", drift_bn),
        Row("same, without BN", num(drift_none), "drifts (Fig. 1b)", drift_none),
    ]
    checks = [
        accuracy_check(CHECK_TEXT[0], acc_bn, acc_none, ">", ACC_MARGIN, paper="BN higher and earlier (MNIST, Fig. 1a)"),
        Check.compare(CHECK_TEXT[1], drift_bn, drift_none, "<", math.log(DRIFT_FACTOR), log=True,
                      paper="BN's percentiles stay put, no-BN's drift (Fig. 1b, c)"),
    ]
    return rows, checks


CHECK_TEXT = (f"BN's final test accuracy exceeds no-BN's by more than {100 * ACC_MARGIN:g} point",
              f"BN's percentile drift is under 1/{DRIFT_FACTOR:g} of no-BN's (ratio BN/no BN)")


IOFFE = Experiment(
    name="ioffe-mnist",
    title="The original BN paper: a sigmoid MLP with and without BN",
    paper="Ioffe & Szegedy 2015, arXiv 1502.03167, Fig. 1",
    claim=("With BN the network trains faster and reaches a higher test accuracy, and the distribution of "
           "a last-hidden-layer unit's sigmoid input stays put, while without BN it drifts."),
    protocol=lambda b: (
        f"3 fully connected hidden layers of 100 sigmoid units, softmax output, weights N(0, {b['init_std']}²) "
        "(the paper's 'small Gaussian'; its value is not stated), biases 0, BN on every hidden layer before the "
        f"sigmoid. The paper states no optimizer: plain SGD, lr {b['lr']:g}, batch {b['batch']}, {b['steps']} "
        f"steps. Fashion-MNIST (the paper used MNIST), {_count(b['n_train'], 'all 60,000')} training images. "
        "Percentiles of unit 0 of the third hidden layer's sigmoid input, over 512 fixed test images in "
        "training mode (batch statistics, as the sigmoid sees them while training)."),
    criterion=(f"Two paired checks: BN's final test accuracy (mean of the last three evaluations) minus no-BN's "
               f"> {100 * ACC_MARGIN:g} point, and the ratio of the percentile drifts (mean over the 15/50/85th "
               f"percentiles of |value at the end − value at step 0|) BN/no BN < 1/{DRIFT_FACTOR:g} (decided on "
               "the log-ratio). Each passes when its 95% CI lies wholly on the paper's side of the margin, fails "
               "when wholly on the other side; reproduced if both pass, not reproduced if either fails."),
    budgets={
        "smoke": {"steps": 6, "batch": 20, "lr": 0.1, "init_std": 0.05, "n_train": 256, "n_test": 128,
                  "eval_every": 3, "probe_every": 3},
        "quick": {"steps": 3000, "batch": 60, "lr": 0.1, "init_std": 0.05, "n_train": None, "n_test": None,
                  "eval_every": 100, "probe_every": 100},
        "full": {"steps": 50000, "batch": 60, "lr": 0.1, "init_std": 0.05, "n_train": None, "n_test": None,
                 "eval_every": 1000, "probe_every": 1000},
    },
    build=_ioffe_build,
    evaluate=_ioffe_evaluate,
    figures=(Figure("ioffe-mnist", "Ioffe & Szegedy Fig. 1 on Fashion-MNIST", (
        Panel("(a) test accuracy", "step", "test accuracy", curves(IOFFE_LABELS, "eval", "test_acc")),
        Panel("(b) sigmoid input without BN: 15/50/85th pct", "step", "sigmoid input",
              (band("none", "without BN", "activations", "b2_act_input_pct"),)),
        Panel("(c) sigmoid input with BN: 15/50/85th pct", "step", "sigmoid input",
              (band("bn", "with BN", "activations", "b2_act_input_pct"),)),
    )),),
)
