"""``noisy-bn``: Santurkar et al. 2018, Fig. 2.

Claim: BN followed by random per-step shifts and scales of every unit trains about as well as BN and
better than no BN, although its layer inputs are less stable; the same noise without BN stops training.

Run it with ``normlab lab run noisy-bn`` (``--suite smoke|quick|full``).
"""

from __future__ import annotations

from typing import Any

from normlab.lab.papers.common import (
    accuracy_check, accuracy_panels, accuracy_rows, ACTIVATION_BLOCKS, CNN_BUDGETS, cnn_protocol, cnn_run, POINT,
    shift,
)
from normlab.lab.spec import band, Check, Experiment, Figure, final, num, Panel, Row, Runs, Setup

NOISY_LABELS = {"bn": "BN", "bn+noise": "BN + noise", "none": "no BN", "noise": "no BN + noise"}


def _noisy_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    return {norm: cnn_run(setup, b, norm) for norm in NOISY_LABELS}


def _noisy_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {k: final(r) for k, r in runs.items()}
    shifts = {k: shift(r, "act_input") for k, r in runs.items()}
    rows = accuracy_rows(runs, NOISY_LABELS, {"bn": "reference", "bn+noise": "about as good as BN",
                                              "none": "well below BN and noisy BN",
                                              "noise": "does not train"})
    rows += [Row(f"layer-input distribution shift per probe, {label}", num(shifts[k]),
                 "noisy BN: less stable than no BN" if k == "bn+noise" else "—")
             for k, label in NOISY_LABELS.items()]
    noisy_vs_bn = acc["bn+noise"] - acc["bn"]
    noise_vs_none = acc["noise"] - acc["none"]
    checks = [
        Check.of("noisy BN trains about as well as BN (within 2 points; fails if > 5 points behind)",
                 f"{100 * noisy_vs_bn:+.1f} points", noisy_vs_bn >= -2 * POINT, noisy_vs_bn < -5 * POINT),
        accuracy_check("noisy BN beats no BN by ≥ 1 point", acc["bn+noise"] - acc["none"], POINT),
        Check.of("noisy BN's layer inputs shift more than no-BN's (by ≥ 1.5x; fails if less)",
                 f"{num(shifts['bn+noise'])} vs {num(shifts['none'])}",
                 shifts["bn+noise"] >= 1.5 * shifts["none"], shifts["bn+noise"] < shifts["none"]),
        Check.of("the same noise without BN stops training (≥ 10 points below no BN or diverged; "
                 "fails if within 2 points)", f"{100 * noise_vs_none:+.1f} points",
                 noise_vs_none <= -10 * POINT or runs["noise"]["diverged_at"] is not None,
                 noise_vs_none >= -2 * POINT),
    ]
    return rows, checks


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
        "a → s·a + m, seeded generators. lr 0.1. Shift as in santurkar-lr, but measured at the input of the "
        "ReLU (after BN and noise), the layer input the noise makes unstable."),
    criterion=("Reproduced if noisy BN ends within 2 points of BN, beats no BN by ≥ 1 point, its layer inputs "
               "shift ≥ 1.5x as much as no-BN's, and noise without BN ends ≥ 10 points below no BN (or "
               "diverges). Not reproduced if noisy BN is > 5 points behind BN or ≥ 1 point behind no BN, shifts "
               "less than no BN, or noise without BN stays within 2 points of no BN. Inconclusive otherwise."),
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
