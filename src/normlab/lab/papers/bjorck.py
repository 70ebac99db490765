"""``bjorck``: Bjorck, Gomes, Selman & Weinberger 2018 (arXiv 1806.02375), Figs. 2–5.

Claim: without BN a step along the gradient blows the loss up at small step sizes, activations and
gradients grow with depth at initialization and only tiny learning rates train; with BN a much
larger learning rate still trains.

Run it with ``normlab lab run bjorck`` (``--suite smoke|quick|full``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normlab.lab.papers.common import _size_text
from normlab.lab.spec import (
    Check, Experiment, Figure, num, Panel, pct, ratio, Row, run_config, Runs, series, Setup, Trace,
)

BJORCK_SIZES = [float(s) for s in np.logspace(-5, -1, 9)]
HIST_EDGES = [float(e) for e in np.linspace(-12, 4, 65)]
BJORCK_LABELS = {"bn": "with BN", "none": "without BN"}
TRAINS_AT = 0.5


def _bjorck_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    data = {"name": setup.images, "n_train": b["n_train"], "n_test": b["n_test"], "size": b["size"],
            "n_probe": 64}
    init_probes = [
        {"kind": "relative_loss", "steps": [0], "sizes": BJORCK_SIZES, "batches": 3},
        {"kind": "channel_stats", "steps": [0]},
        {"kind": "grad_hist", "steps": [0], "edges": HIST_EDGES},
    ]
    runs = {}
    for norm in BJORCK_LABELS:
        runs[f"init-{norm}"] = run_config(
            setup, {**data, "n_test": b["init_n_test"]},
            {"arch": "resnet", "width": b["width"], "blocks": b["deep_blocks"], "norm": norm},
            lr=b["lrs"][0], steps=0, batch=b["batch"], eval_every=1, probes=init_probes)
        for lr in b["lrs"]:
            runs[f"{norm}-lr{lr:g}"] = run_config(
                setup, data, {"arch": "resnet", "width": b["width"], "blocks": b["sweep_blocks"], "norm": norm},
                lr=lr, steps=b["steps"], batch=b["batch"], eval_every=b["steps"], momentum=0.9)
    return runs


def trains(run: dict[str, Any]) -> bool:
    return run["diverged_at"] is None and series(run, "eval", "test_acc")[-1] >= TRAINS_AT


def largest_trainable_lr(runs: Runs, norm: str, lrs: list[float]) -> float:
    ok = [lr for lr in lrs if trains(runs[f"{norm}-lr{lr:g}"])]
    return max(ok) if ok else math.nan


def _median_relative_loss(run: dict[str, Any]) -> list[float]:
    per_batch = np.asarray(series(run, "relative_loss", "per_batch")[0], dtype=float)
    return [float(v) for v in np.median(np.where(np.isnan(per_batch), np.inf, per_batch), axis=0)]


def _end_accuracy(run: dict[str, Any]) -> float:
    return series(run, "eval", "test_acc")[-1]


def _bjorck_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rel = {n: _median_relative_loss(runs[f"init-{n}"]) for n in BJORCK_LABELS}
    std = {n: series(runs[f"init-{n}"], "channel_stats", "std")[0] for n in BJORCK_LABELS}
    grad = {n: series(runs[f"init-{n}"], "grad_hist", "mean_abs")[0] for n in BJORCK_LABELS}
    max_lr = {n: largest_trainable_lr(runs, n, b["lrs"]) for n in BJORCK_LABELS}
    growth = std["none"][-1] / std["none"][0]
    diverge_at = next((s for s, r in zip(BJORCK_SIZES, rel["none"]) if r > 1e3), math.nan)
    bn_spread = max(abs(math.log10(r)) if 0 < r < math.inf else math.inf for r in rel["bn"])
    grad_ratio = ratio(grad["none"], grad["bn"])
    lr_ratio = ratio(max_lr["bn"], max_lr["none"])
    acc_at_max = {n: _end_accuracy(runs[f"{n}-lr{max_lr[n]:g}"]) if not math.isnan(max_lr[n]) else math.nan
                  for n in BJORCK_LABELS}
    rows = [
        Row("largest lr that trains (test accuracy ≥ 50%), with BN", num(max_lr["bn"]), "0.1 (ResNet-110, CIFAR-10)"),
        Row("largest lr that trains, without BN", num(max_lr["none"]), "1e-4"),
        Row("test accuracy at that lr, with BN / without", f"{pct(acc_at_max['bn'])} / {pct(acc_at_max['none'])}",
            "≈93% / ≈82%"),
        Row("relative loss without BN: smallest step size where it exceeds 1e3", num(diverge_at),
            "explodes past 1e6 for s ≳ 1e-3"),
        Row("relative loss with BN: largest |log10| over the sweep", num(bn_spread), "within about 0.5"),
        Row("channel std at init without BN, first → last block", f"{num(std['none'][0])} → {num(std['none'][-1])}",
            "10^-1.5 → 10^3"),
        Row("channel std at init with BN, min–max over depth", f"{num(min(std['bn']))}–{num(max(std['bn']))}",
            "near 1"),
        Row("mean |gradient| of the middle layer, without / with BN", f"×{num(grad_ratio)}", "~100x larger without BN"),
    ]
    checks = [
        Check.of("without BN the relative loss diverges (> 1e3) at some step size ≤ 0.1 (fails if it stays < 10)",
                 num(max(rel["none"])), max(rel["none"]) > 1e3, max(rel["none"]) < 10),
        Check.of("with BN the relative loss stays within 10^±0.5 (fails if it exceeds 1e3 or falls below 1e-3)",
                 num(bn_spread), bn_spread <= 0.5, bn_spread > 3),
        Check.of("at init without BN the channel std grows ≥ 100x with depth (fails under 10x)", f"×{num(growth)}",
                 growth >= 100, growth < 10),
        Check.of("at init with BN the channel std stays within [0.1, 10] (fails outside [0.01, 100])",
                 f"{num(min(std['bn']))}–{num(max(std['bn']))}",
                 0.1 <= min(std["bn"]) and max(std["bn"]) <= 10, min(std["bn"]) < 0.01 or max(std["bn"]) > 100),
        Check.of("middle-layer gradients ≥ 10x larger without BN (fails if not larger)", f"×{num(grad_ratio)}",
                 grad_ratio >= 10, grad_ratio <= 1),
        Check.of("the largest trainable lr is ≥ 10x larger with BN (fails if not larger)", f"×{num(lr_ratio)}",
                 lr_ratio >= 10, lr_ratio <= 1),
    ]
    return rows, checks


def _sweep_traces(runs: Runs) -> list[Trace]:
    lrs = sorted({r["config"]["optim"]["lr"] for k, r in runs.items() if not k.startswith("init-")})
    return [Trace(label, lrs, [_end_accuracy(runs[f"{n}-lr{lr:g}"]) for lr in lrs])
            for n, label in BJORCK_LABELS.items()]


def _relative_loss_traces(runs: Runs) -> list[Trace]:
    return [Trace(label, BJORCK_SIZES, _median_relative_loss(runs[f"init-{n}"]))
            for n, label in BJORCK_LABELS.items()]


def _depth_traces(runs: Runs) -> list[Trace]:
    out = []
    for n, label in BJORCK_LABELS.items():
        run = runs[f"init-{n}"]
        for key, what in (("std", "std"), ("abs_mean", "|mean|")):
            values = series(run, "channel_stats", key)[0]
            out.append(Trace(f"{label}: {what}", list(range(len(values))), values))
    return out


def _hist_traces(runs: Runs) -> list[Trace]:
    return [Trace(label, series(runs[f"init-{n}"], "grad_hist", "edges")[0],
                  series(runs[f"init-{n}"], "grad_hist", "counts")[0], kind="hist")
            for n, label in BJORCK_LABELS.items()]


BJORCK = Experiment(
    name="bjorck",
    title="BN allows large learning rates",
    paper="Bjorck, Gomes, Selman & Weinberger 2018, arXiv 1806.02375, Figs. 2–5",
    claim=("Without BN a step along the gradient blows the loss up already at small step sizes, activations "
           "and gradients grow with depth at initialization, and only tiny learning rates train; with BN the "
           "loss barely moves along the gradient, activations stay near unit scale and a ≥ 10x larger "
           "learning rate still trains."),
    protocol=lambda b: (
        f"Initialization probes on a deep residual net (stem convolution, {b['deep_blocks']} residual blocks of "
        f"width {b['width']}, {2 * b['deep_blocks'] + 2} weight layers, Kaiming-normal init) on {_size_text(b)} "
        "images: relative loss L(θ − s·g)/L(θ) for 9 log-spaced s in [1e-5, 1e-1] (median over 3 mini-batches "
        f"of {b['batch']}), per-block channel mean/std of the residual stream, histogram of log10|gradient| of "
        f"the middle block's first convolution. Learning-rate sweep: a ResNet with {b['sweep_blocks']} residual "
        f"blocks ({2 * b['sweep_blocks'] + 2} weight layers), SGD with momentum 0.9, batch {b['batch']}, lrs "
        f"{', '.join(f'{lr:g}' for lr in b['lrs'])}, {b['steps']} steps; a run 'trains' if it does not diverge "
        "and ends with test accuracy ≥ 50% (5x chance)."),
    criterion=("Six checks, each with its pass and fail threshold stated in the table (relative loss with and "
               "without BN, channel-std growth with and without BN, middle-layer gradient ratio, largest "
               "trainable lr ratio). Reproduced if all pass, not reproduced if any fails, inconclusive "
               "otherwise."),
    budgets={
        "smoke": {"n_train": 256, "n_test": 64, "init_n_test": 32, "size": 16, "width": 4, "deep_blocks": 3,
                  "sweep_blocks": 1, "batch": 16, "steps": 4, "lrs": [1e-3, 1e-1]},
        "quick": {"n_train": 5000, "n_test": 1000, "init_n_test": 256, "size": 16, "width": 16, "deep_blocks": 27,
                  "sweep_blocks": 6, "batch": 64, "steps": 150, "lrs": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]},
        "full": {"n_train": None, "n_test": None, "init_n_test": 1000, "size": None, "width": 16, "deep_blocks": 54,
                 "sweep_blocks": 6, "batch": 128, "steps": 3000, "lrs": [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]},
    },
    build=_bjorck_build,
    evaluate=_bjorck_evaluate,
    figures=(Figure("bjorck", "Bjorck et al.: step sizes, depth and learning rates", (
        Panel("relative loss along the gradient at init", "step size s", "L(θ − s·g) / L(θ)",
              (_relative_loss_traces,), xlog=True, ylog=True, hline=1.0),
        Panel("channel statistics at init vs depth", "residual block", "mean over channels",
              (_depth_traces,), ylog=True),
        Panel("middle-layer gradient at init", "log10 |gradient entry|", "count", (_hist_traces,)),
        Panel("learning-rate sweep (ResNet-14)", "learning rate", "final test accuracy", (_sweep_traces,),
              xlog=True, hline=TRAINS_AT),
    )),),
)
