"""``landscape``: Santurkar et al. 2018, Fig. 4.

Claim: with BN the loss changes less along the gradient, the gradient stays more predictive and the
effective β-smoothness is smaller.

The DLN is probed at both learning rates of the ics experiments; at 1e-7 (where the probe steps reach just
below the no-BN divergence point, as the paper chose them) the DLN comparison can come out the other way
round than at 1e-6, and the report says so rather than picking the lr that passes.

Run it with ``normlab lab run landscape`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
from typing import Any

from normlab.lab.papers.common import cnn_protocol, DLN_LR, dln_protocol, DLN_SLOW_LR
from normlab.lab.papers.ics import GRADIENT_BUDGETS, _gradient_build
from normlab.lab.spec import Check, curves, Experiment, Figure, median, num, Panel, ratio, Row, Runs, series

LANDSCAPE_QUANTITIES = {"loss_range": "loss range", "predictiveness_max": "gradient predictiveness (max over η)",
                        "beta": "effective β-smoothness"}


EARLY = 0.5
"""The paper stresses early training: each quantity is the median over the probes of the first half of the run."""
SMOOTHER = 1.0
"""No BN / BN must exceed this factor (beyond the measured noise floor): "smaller with BN". A ratio whose CI
straddles it is "no effect shown" (inconclusive), one wholly below it is the opposite."""
MODELS = {"cnn": "CNN", "dln": f"DLN lr {DLN_LR:g}", "dln7": f"DLN lr {DLN_SLOW_LR:g}"}


def early_median(run: dict[str, Any], key: str) -> float:
    values = series(run, "landscape", key)
    return median(values[:max(1, math.ceil(EARLY * len(values)))])


def _landscape_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows, checks = [], []
    for model, name in MODELS.items():
        for key, label in LANDSCAPE_QUANTITIES.items():
            with_bn = early_median(runs[f"{model}-bn"], key)
            without = early_median(runs[f"{model}-none"], key)
            r = ratio(without, with_bn)
            rows.append(Row(f"{name}: early-training median {label}, no BN / BN",
                            f"{num(without)} / {num(with_bn)} (×{num(r)})",
                            "much smaller with BN (~100x for predictiveness early)"
                            if key == "predictiveness_max" else "much smaller with BN", r))
            checks.append(Check.compare(f"{name}: {label} smaller with BN (no BN / BN > {SMOOTHER:g})",
                                        without, with_bn, ">", math.log(SMOOTHER), log=True,
                                        paper="much smaller with BN (Fig. 4; ~100x for predictiveness early)"
                                        if key == "predictiveness_max" else "much smaller with BN (Fig. 4)"))
    return rows, checks


def _landscape_panels(model: str, title: str) -> tuple[Panel, ...]:
    labels = {f"{model}-bn": f"{title}, BN", f"{model}-none": f"{title}, no BN"}
    return tuple(Panel(f"{title}: {label}", "step", label, curves(labels, "landscape", key), ylog=True)
                 for key, label in LANDSCAPE_QUANTITIES.items())


LANDSCAPE = Experiment(
    name="landscape",
    title="Smoothness of the loss landscape along the gradient",
    paper="Santurkar et al. 2018, Fig. 4",
    claim=("With BN the loss changes less along the gradient direction, the gradient stays more predictive and "
           "the effective β-smoothness is smaller, for the CNN and the deep linear network."),
    protocol=lambda b: (cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) +
              " At every probe step, on that step's batch in training mode, with g = ∇L(θ): L(θ − ηg) and "
              "∇L(θ − ηg) for η in {0.5, 1, …, 4}·lr (CNN) or 8 log-spaced values in [1/100, 30]·lr (DLN). "
              "Loss range = max − min of L(θ − ηg); predictiveness = max over η of ‖g − ∇L(θ − ηg)‖₂; "
              "β = max over η of ‖g − ∇L(θ − ηg)‖₂ / ‖ηg‖₂. Parameters and BN buffers are restored after each "
              "probe. These are the same runs as the ics and ics-1e-7 experiments. At lr 1e-7 the DLN's largest "
              "probe step (30·lr = 3e-6) lies just below where the DLN without BN diverges, as the paper chose it; "
              "at 1e-6 it lies ~10x beyond. Reported over the first half of the run's probes."),
    criterion=(f"For each model (CNN, DLN at lr {DLN_LR:g} and at {DLN_SLOW_LR:g}) and quantity, the paired log-ratio "
               f"of the early-training medians no BN / BN (first {EARLY:.0%} of the probes): it passes when the 95% "
               f"CI of the ratio lies wholly above {SMOOTHER:g} (plus the noise floor), fails when wholly below "
               "it, and shows no effect (inconclusive) when it straddles it. Reproduced if all pass, not "
               "reproduced if any fails."),
    budgets=GRADIENT_BUDGETS,
    build=lambda setup, b: _gradient_build(setup, b, (DLN_LR, DLN_SLOW_LR)),
    evaluate=_landscape_evaluate,
    figures=(Figure("landscape", "The loss landscape along the gradient",
                    _landscape_panels("cnn", "CNN") + _landscape_panels("dln", f"DLN lr {DLN_LR:g}")
                    + _landscape_panels("dln7", f"DLN lr {DLN_SLOW_LR:g}")),),
)
