"""``landscape``: Santurkar et al. 2018, Fig. 4.

Claim: with BN the loss changes less along the gradient, the gradient stays more predictive and the
effective β-smoothness is smaller.

Run it with ``normlab lab run landscape`` (``--suite smoke|quick|full``).
"""

from __future__ import annotations

from typing import Any

from normlab.lab.papers.common import cnn_protocol, dln_protocol
from normlab.lab.papers.ics import GRADIENT_BUDGETS, GRADIENT_LABELS, _gradient_build
from normlab.lab.spec import Check, curves, Experiment, Figure, median, num, Panel, ratio, Row, Runs, series

LANDSCAPE_QUANTITIES = {"loss_range": "loss range", "predictiveness_max": "gradient predictiveness (max over η)",
                        "beta": "effective β-smoothness"}


def _landscape_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows, checks = [], []
    for model in ("cnn", "dln"):
        for key, label in LANDSCAPE_QUANTITIES.items():
            with_bn = median(series(runs[f"{model}-bn"], "landscape", key))
            without = median(series(runs[f"{model}-none"], "landscape", key))
            r = ratio(without, with_bn)
            rows.append(Row(f"{model.upper()}: median {label}, no BN / BN", f"{num(without)} / {num(with_bn)} "
                            f"(×{num(r)})", "much smaller with BN (~100x for predictiveness early)"
                            if key == "predictiveness_max" else "much smaller with BN"))
            checks.append(Check.of(f"{model.upper()}: {label} smaller with BN by ≥ 2x (fails if not smaller)",
                                   f"×{num(r)}", r >= 2, r <= 1))
    return rows, checks


def _landscape_panels(model: str, title: str) -> tuple[Panel, ...]:
    labels = {k: v for k, v in GRADIENT_LABELS.items() if k.startswith(model)}
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
              "probe. These are the same runs as the ics experiment."),
    criterion=("For each model and quantity, compare the median over probes: it passes if no-BN's is ≥ 2x BN's, "
               "fails if no-BN's is not larger. Reproduced if all six pass, not reproduced if any fails, "
               "inconclusive otherwise."),
    budgets=GRADIENT_BUDGETS,
    build=_gradient_build,
    evaluate=_landscape_evaluate,
    figures=(Figure("landscape", "The loss landscape along the gradient",
                    _landscape_panels("cnn", "CNN") + _landscape_panels("dln", "DLN")),),
)
