"""``position``: the CaffeNet benchmark the source documents quote (PAPERS.md §4).

Claim: BN after the ReLU beats BN before it, scale & bias change little, and no placement is worse than no
BN (the source's table shows BN before the ReLU only 0.4 points above no BN, so "no effect" is allowed).

Run it with ``normlab lab run position`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
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


AFTER_BEATS = POINT
"""BN after the ReLU beats BN before it by more than this (CaffeNet: +2.5 points plain, +1.5 with scale&bias)."""
AFFINE_SAME = POINT
"""Scale & bias change little: with and without them within ± this (CaffeNet: +0.4 and −0.6 points)."""
NOT_WORSE = POINT
"""Every placement is at least as good as no BN, to within this: the source's before-ReLU BN is only 0.4 points
above no BN, so "no effect" is consistent with it, and only a loss of more than this contradicts it."""


def _paper_diff(a: str, b: str) -> str:
    """The source's difference of two placements, in points, with the two accuracies."""
    pa, pb = float(POSITION_PAPER[a].rstrip("%")), float(POSITION_PAPER[b].rstrip("%"))
    return f"{pa - pb:+.1f} points ({POSITION_PAPER[a]} vs {POSITION_PAPER[b]})"


def _position_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {k: final(r) for k, r in runs.items()}
    rows = accuracy_rows(runs, POSITION_LABELS, {k: f"{v} (CaffeNet, ImageNet 128px)" for k, v in POSITION_PAPER.items()})
    checks = [accuracy_check(f"BN after ReLU beats BN before ReLU{suffix} by more than {100 * AFTER_BEATS:g} point",
                             acc[f"after{key}"], acc[f"before{key}"], ">", AFTER_BEATS,
                             paper=_paper_diff(f"after{key}", f"before{key}"))
              for key, suffix in (("", ""), ("-affine", ", with scale&bias"))]
    checks += [accuracy_check(f"scale & bias change little, BN {where} ReLU (within ±{100 * AFFINE_SAME:g} point)",
                              acc[f"{where}-affine"], acc[where], "=", AFFINE_SAME,
                              paper=_paper_diff(f"{where}-affine", where)) for where in ("before", "after")]
    checks += [accuracy_check(f"{POSITION_LABELS[k]} is not worse than no BN (by more than {100 * NOT_WORSE:g} "
                              "point; no effect allowed)", acc[k], acc["none"], ">=", NOT_WORSE,
                              paper=_paper_diff(k, "none"))
               for k in POSITION_LABELS if k != "none"]
    return rows, checks


POSITION = Experiment(
    name="position",
    title="Where BN goes: before or after the ReLU, with or without scale & bias",
    paper="CaffeNet benchmark quoted by the documents (PAPERS.md §4)",
    claim=("BN after the ReLU beats BN before it (CaffeNet: 49.9% vs 47.4%), scale & bias change little, and "
           "no placement is worse than no BN (47.0%; BN before ReLU is only 0.4 points above it)."),
    protocol=lambda b: cnn_protocol(b) + " lr 0.1; BN with affine=False for the plain variants.",
    criterion=(f"Eight paired accuracy checks: after − before ReLU > {100 * AFTER_BEATS:g} point (with and without "
               f"scale & bias); with − without scale & bias within ±{100 * AFFINE_SAME:g} point (equivalence, 90% CI, "
               f"before and after ReLU); each placement − no BN > −{100 * NOT_WORSE:g} point (non-inferiority: the "
               "source shows BN before ReLU only 0.4 points above no BN, so no effect is allowed). Margins are "
               "raised to the measured noise floor. Reproduced if all pass, not reproduced if any CI lies wholly on "
               "the other side."),
    budgets=CNN_BUDGETS,
    build=_position_build,
    evaluate=_position_evaluate,
    figures=(Figure("position", "BN placement", accuracy_panels(POSITION_LABELS, "lr 0.1")),),
)
