"""``santurkar-lr``: Santurkar, Tsipras, Ilyas & Madry 2018 (arXiv 1805.11604), Fig. 1.

Claim: BN trains faster at lr 0.1 and 0.5, yet the distribution of a layer's input changes over
training about as much with BN as without.

Run it with ``normlab lab run santurkar-lr`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normlab.lab.papers.common import (
    accuracy_check, accuracy_rows, ACTIVATION_BLOCKS, CNN_BUDGETS, cnn_protocol, cnn_run, POINT, shift,
)
from normlab.lab.spec import band, Check, curves, Experiment, Figure, num, Panel, ratio, Row, Runs, series, Setup

SANTURKAR_LRS = (0.1, 0.5)
DISTRIBUTION_LR = 0.1
LR_LABELS = {f"{norm}-lr{lr:g}": f"{'BN' if norm == 'bn' else 'no BN'}, lr {lr:g}"
             for lr in SANTURKAR_LRS for norm in ("bn", "none")}


def _lr_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    return {f"{norm}-lr{lr:g}": cnn_run(setup, b, norm, lr) for lr in SANTURKAR_LRS for norm in ("bn", "none")}


def _mean_train_acc(run: dict[str, Any]) -> float:
    """Mean training accuracy over the evaluation schedule; a run that diverged keeps the accuracy
    it ended at for the evaluations it did not reach."""
    values = [v for v in series(run, "eval", "train_acc") if v is not None and not math.isnan(v)]
    if not values:
        return math.nan
    optim, every = run["config"]["optim"], run["config"]["eval_every"]
    scheduled = math.ceil(optim["steps"] / every)
    return float(np.mean(values + [values[-1]] * max(0, scheduled - len(values))))


TRAIN_MARGIN = POINT
"""At each lr BN's mean training accuracy over the run must beat no-BN's by more than this."""
SAME_FACTOR = 2.0
"""The layer-input shifts with and without BN "look about the same": their ratio within 1/2 … 2."""
SITES = {"pre_norm": "the convolution's output (before BN)", "act_input": "the ReLU's input (after BN)"}
CHECKED_SITE = "pre_norm"
"""The site the check reads: after BN, in training mode, the unit's mean and std over the probe batch are β and
γ by construction, so its shift there is the affine parameters' drift and is reported, not checked."""


def _lr_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows = accuracy_rows(runs, LR_LABELS, {"bn-lr0.1": "83% (CIFAR-10, 15k steps)",
                                           "none-lr0.1": "80% (CIFAR-10, 15k steps)"})
    checks = []
    for lr in SANTURKAR_LRS:
        bn, none = _mean_train_acc(runs[f"bn-lr{lr:g}"]), _mean_train_acc(runs[f"none-lr{lr:g}"])
        rows.append(Row(f"mean training accuracy over training (BN − no BN), lr {lr:g}",
                        f"{100 * (bn - none):+.1f} points", "BN trains faster (Fig. 1)", bn - none))
        checks.append(accuracy_check(f"lr {lr:g}: BN's mean training accuracy over the run beats no-BN's by more "
                                     f"than {100 * TRAIN_MARGIN:g} point", bn, none, ">", TRAIN_MARGIN,
                                     paper="BN trains faster (Fig. 1; CIFAR-10 test 83% vs 80% at lr 0.1)"))
    for site, where in SITES.items():
        s_bn = shift(runs[f"bn-lr{DISTRIBUTION_LR:g}"], site)
        s_none = shift(runs[f"none-lr{DISTRIBUTION_LR:g}"], site)
        rows.append(Row(f"distribution shift per probe at {where}, BN / no BN, lr {DISTRIBUTION_LR:g}",
                        f"{num(s_bn)} / {num(s_none)}", "about the same (Fig. 1, layers 3 and 11)",
                        ratio(s_bn, s_none)))
        if site == CHECKED_SITE:
            checks.append(Check.compare(
                f"lr {DISTRIBUTION_LR:g}, {where}: the distribution moves about as much with BN as without "
                f"(ratio BN/no BN within 1/{SAME_FACTOR:g} … {SAME_FACTOR:g})",
                s_bn, s_none, "=", math.log(SAME_FACTOR), log=True, paper="about the same (Fig. 1, layers 3 and 11)"))
    return rows, checks


def _activation_panels(keys: dict[str, str], title: str) -> tuple[Panel, ...]:
    return tuple(
        Panel(f"{title}: conv {block + 1}, {label}", "step", "conv output before norm (15/50/85th pct)",
              (band(key, label, "activations", f"b{block}_pre_norm_pct"),))
        for block in ACTIVATION_BLOCKS for key, label in keys.items())


SANTURKAR_LR = Experiment(
    name="santurkar-lr",
    title="BN at a small and a large learning rate, and what happens to layer inputs",
    paper="Santurkar, Tsipras, Ilyas & Madry 2018, arXiv 1805.11604, Fig. 1",
    claim=("BN trains faster at both learning rates (0.1 and 0.5), yet the distribution of an activation in a "
           "low and a high layer changes over training about as much with BN as without."),
    protocol=lambda b: cnn_protocol(b) + (
        " Distributions: unit 0 of convolutions 2 and 6 (every position counts), the convolution's output "
        "before any normalization, on 512 fixed test images in training mode, every probe interval. "
        "Shift = mean over consecutive probes of (|Δmean| + |Δstd|) / mean std. Both sites are "
        "measured: the convolution's output (before BN) and the ReLU's input (after BN; there the unit's mean "
        "and std over the probe batch are β and γ by construction, so its shift is the affine parameters' drift)."),
    criterion=(f"Reproduced if at each learning rate BN's mean training accuracy over the run (a diverged run "
               f"counts with the chance-level accuracy it ends at) beats no-BN's by more than {100 * TRAIN_MARGIN:g} "
               f"point, and at lr {DISTRIBUTION_LR:g} the shift ratio BN/no BN of {SITES[CHECKED_SITE]} lies within "
               f"1/{SAME_FACTOR:g} … {SAME_FACTOR:g} (equivalence: the 90% CI of the log-ratio inside ±log "
               f"{SAME_FACTOR:g}); the shift after BN is reported beside it (β and γ's drift by construction). "
               "Not reproduced if any check's CI lies wholly on the other side."),
    budgets=CNN_BUDGETS,
    build=_lr_build,
    evaluate=_lr_evaluate,
    figures=(
        Figure("santurkar-lr-accuracy", "Training and test accuracy, with and without BN", (
            Panel("training accuracy", "step", "training accuracy (since last evaluation)",
                  curves(LR_LABELS, "eval", "train_acc")),
            Panel("test accuracy", "step", "test accuracy", curves(LR_LABELS, "eval", "test_acc")),
        )),
        Figure("santurkar-lr-activations", "Distribution of one activation over training, lr 0.1",
               _activation_panels({"bn-lr0.1": "BN", "none-lr0.1": "no BN"}, "lr 0.1")),
    ),
)
