"""``position``: the CaffeNet benchmark the source documents quote (PAPERS.md §4).

Claim: BN after the ReLU beats BN before it, scale & bias change little, and every placement beats no
BN.

Run it with ``normlab lab run position`` (``--suite smoke|quick|full``).
"""

from __future__ import annotations

from typing import Any

from normlab.lab.papers.common import (
    accuracy_check, accuracy_panels, accuracy_rows, CNN_BUDGETS, cnn_protocol, cnn_run, POINT,
)
from normlab.lab.spec import Check, Experiment, Figure, final, Row, Runs, Setup

POSITION_LABELS = {"before": "BN before ReLU", "before-affine": "BN before ReLU + scale&bias",
                   "after": "BN after ReLU", "after-affine": "BN after ReLU + scale&bias", "none": "no BN"}
POSITION_PAPER = {"before": "47.4%", "before-affine": "47.8%", "after": "49.9%", "after-affine": "49.3%",
                  "none": "47.0%"}


def _position_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    runs = {"none": cnn_run(setup, b, "none")}
    for position in ("before", "after"):
        runs[position] = cnn_run(setup, b, "bn", position=position, affine=False)
        runs[f"{position}-affine"] = cnn_run(setup, b, "bn", position=position, affine=True)
    return runs


def _position_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {k: final(r) for k, r in runs.items()}
    rows = accuracy_rows(runs, POSITION_LABELS, {k: f"{v} (CaffeNet, ImageNet 128px)" for k, v in POSITION_PAPER.items()})
    checks = [accuracy_check(f"BN after ReLU beats BN before ReLU{suffix} by ≥ 1 point",
                             acc[f"after{key}"] - acc[f"before{key}"], POINT)
              for key, suffix in (("", ""), ("-affine", ", with scale&bias"))]
    checks += [accuracy_check(f"{POSITION_LABELS[k]} beats no BN by ≥ 1 point", acc[k] - acc["none"], POINT)
               for k in POSITION_LABELS if k != "none"]
    return rows, checks


POSITION = Experiment(
    name="position",
    title="Where BN goes: before or after the ReLU, with or without scale & bias",
    paper="CaffeNet benchmark quoted by the documents (PAPERS.md §4)",
    claim=("BN after the ReLU beats BN before it (CaffeNet: 49.9% vs 47.4%), scale & bias change little, and "
           "every placement beats no BN (47.0%)."),
    protocol=lambda b: cnn_protocol(b) + " lr 0.1; BN with affine=False for the plain variants.",
    criterion=("Six accuracy comparisons with a ±1 point margin: after vs before ReLU (with and without scale & "
               "bias), and each BN placement vs no BN. Each passes at ≥ +1 point and fails at ≤ −1 point. "
               "Reproduced if all pass, not reproduced if any fails, inconclusive otherwise."),
    budgets=CNN_BUDGETS,
    build=_position_build,
    evaluate=_position_evaluate,
    figures=(Figure("position", "BN placement", accuracy_panels(POSITION_LABELS, "lr 0.1")),),
)
