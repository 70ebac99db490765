"""``bjorck``: Bjorck, Gomes, Selman & Weinberger 2018 (arXiv 1806.02375), Figs. 2–5.

Claim: without BN a step along the gradient blows the loss up at small step sizes, activations and
gradients grow with depth at initialization and only tiny learning rates train; with BN a much
larger learning rate still trains.

Run it with ``normlab lab run bjorck`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from normlab.lab.papers.common import _size_text
from normlab.lab.spec import (
    Check, Experiment, Figure, num, Panel, pct, ratio, Row, run_config, Runs, series, Setup, Trace,
)

BJORCK_SIZES = [float(s) for s in np.logspace(-5, -1, 9)]
HIST_EDGES = [float(e) for e in np.linspace(-12, 4, 65)]
BJORCK_LABELS = {"bn": "with BN", "none": "without BN"}
HALF_DECADES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
DIVERGES_ABOVE = 100.0
"""A sweep run diverges when its loss is ever non-finite or above this many times its initial loss (a blow-up
to 5e13 that then sits at chance is a divergence, not a slow start)."""
TRAINS_BELOW = 0.5
"""A sweep run that does not diverge trains when its final training loss is below this fraction of its initial
loss (for 10 classes the initial loss is ≈ ln 10)."""
REL_DIVERGES = 1e3
"""Bjorck et al.'s divergence mark for the relative loss L(θ − s·g)/L(θ)."""
BN_REL_SPREAD = 0.5
"""With BN the relative loss stays within 10^±this over the sweep."""
STD_GROWTH = 100.0
"""Without BN the channel std grows by more than this factor from the first to the last block at init."""
BN_STD_DECADES = 1.0
"""With BN the channel std stays within 10^±this of 1 at every depth."""
GRAD_RATIO = 10.0
"""The middle layer's gradients are larger without BN by more than this factor."""
LR_RATIO = 10.0
"""The largest lr that trains is larger with BN by more than this factor."""


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
                lr=lr, steps=b["steps"], batch=b["batch"], eval_every=max(1, b["steps"] // 3), momentum=0.9)
    return runs


def initial_loss(run: dict[str, Any]) -> float:
    return series(run, "eval", "test_loss")[0]


def diverges(run: dict[str, Any]) -> bool:
    """Non-finite loss, or a training loss above :data:`DIVERGES_ABOVE` times the initial one at any step."""
    peaks = [v for v in series(run, "eval", "train_loss_max") if v is not None]
    peak = max((math.inf if math.isnan(v) else v for v in peaks[1:]), default=math.inf)
    return run["diverged_at"] is not None or peak > DIVERGES_ABOVE * initial_loss(run)


def trains(run: dict[str, Any]) -> bool:
    """Does not diverge and ends with a training loss below :data:`TRAINS_BELOW` times the initial loss."""
    return not diverges(run) and series(run, "eval", "train_loss")[-1] < TRAINS_BELOW * initial_loss(run)


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
    bn_decades = max(abs(math.log10(v)) if v > 0 else math.inf for v in std["bn"])
    diverged = {n: sum(diverges(runs[f"{n}-lr{lr:g}"]) for lr in b["lrs"]) for n in BJORCK_LABELS}
    acc_at_max = {n: _end_accuracy(runs[f"{n}-lr{max_lr[n]:g}"]) if not math.isnan(max_lr[n]) else math.nan
                  for n in BJORCK_LABELS}
    rows = [
        Row("largest lr that trains (loss-based rule), with BN", num(max_lr["bn"]), "0.1 (ResNet-110, CIFAR-10)",
            max_lr["bn"]),
        Row("largest lr that trains, without BN", num(max_lr["none"]), "1e-4", max_lr["none"]),
        Row("learning rates of the sweep that diverge (blow-up included), with BN / without",
            f"{diverged['bn']} / {diverged['none']} of {len(b['lrs'])}", "—"),
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
        Check.level(f"without BN the relative loss diverges (max over the sweep > {REL_DIVERGES:g}; an overflow "
                    "counts as the largest float)", min(max(rel["none"]), sys.float_info.max), REL_DIVERGES, ">",
                    log=True, paper="explodes past 1e6 for s ≳ 1e-3"),
        Check.level(f"with BN the relative loss stays within 10^±{BN_REL_SPREAD:g} (largest |log10| over the sweep)",
                    bn_spread, BN_REL_SPREAD, "<", paper="within about 0.5"),
        Check.level(f"at init without BN the channel std grows more than {STD_GROWTH:g}x with depth", growth,
                    STD_GROWTH, ">", log=True, paper="10^-1.5 → 10^3 (×3e4)"),
        Check.level(f"at init with BN the channel std stays within 10^±{BN_STD_DECADES:g} (largest |log10 std|)",
                    bn_decades, BN_STD_DECADES, "<", paper="near 1"),
        Check.level(f"middle-layer gradients more than {GRAD_RATIO:g}x larger without BN", grad_ratio, GRAD_RATIO, ">",
                    log=True, paper="~100x"),
        Check.level(f"the largest lr that trains is more than {LR_RATIO:g}x larger with BN", lr_ratio, LR_RATIO, ">",
                    log=True, paper="×1000 (0.1 vs 1e-4)"),
    ]
    return rows, checks


def _sweep_traces(runs: Runs) -> list[Trace]:
    lrs = sorted({r["config"]["optim"]["lr"] for k, r in runs.items() if not k.startswith("init-")})
    return [Trace(label, lrs, [series(runs[f"{n}-lr{lr:g}"], "eval", "train_loss")[-1]
                               / initial_loss(runs[f"{n}-lr{lr:g}"]) for lr in lrs])
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
        f"{', '.join(f'{lr:g}' for lr in b['lrs'])} (half-decades), {b['steps']} steps; a run diverges if its loss is "
        f"ever non-finite or above {DIVERGES_ABOVE:g}x its initial loss, and trains if it does not diverge and "
        f"ends with a training loss (mean over the last third of the run) below {TRAINS_BELOW:g}x its initial loss."),
    criterion=(f"Six checks against the paper's marks: without BN the relative loss exceeds {REL_DIVERGES:g}; with BN "
               f"it stays within 10^±{BN_REL_SPREAD:g}; without BN the channel std grows more than {STD_GROWTH:g}x "
               f"with depth; with BN it stays within 10^±{BN_STD_DECADES:g}; middle-layer gradients are more than "
               f"{GRAD_RATIO:g}x larger without BN; the largest lr that trains is more than {LR_RATIO:g}x larger "
               "with BN. Over several seeds each is decided from the 95% CI of its (log) value: reproduced if all "
               "pass, not reproduced if any lies wholly on the other side."),
    budgets={
        "smoke": {"n_train": 256, "n_test": 64, "init_n_test": 32, "size": 16, "width": 4, "deep_blocks": 3,
                  "sweep_blocks": 1, "batch": 16, "steps": 4, "lrs": [1e-3, 1e-1]},
        "quick": {"n_train": 5000, "n_test": 1000, "init_n_test": 256, "size": 16, "width": 16, "deep_blocks": 27,
                  "sweep_blocks": 6, "batch": 64, "steps": 90, "lrs": HALF_DECADES[2:]},
        "full": {"n_train": None, "n_test": None, "init_n_test": 1000, "size": None, "width": 16, "deep_blocks": 54,
                 "sweep_blocks": 6, "batch": 128, "steps": 3000, "lrs": HALF_DECADES},
    },
    build=_bjorck_build,
    evaluate=_bjorck_evaluate,
    figures=(Figure("bjorck", "Bjorck et al.: step sizes, depth and learning rates", (
        Panel("relative loss along the gradient at init", "step size s", "L(θ − s·g) / L(θ)",
              (_relative_loss_traces,), xlog=True, ylog=True, hline=1.0),
        Panel("channel statistics at init vs depth", "residual block", "mean over channels",
              (_depth_traces,), ylog=True),
        Panel("middle-layer gradient at init", "log10 |gradient entry|", "count", (_hist_traces,)),
        Panel("learning-rate sweep (ResNet-14)", "learning rate", "final / initial training loss", (_sweep_traces,),
              xlog=True, ylog=True, hline=TRAINS_BELOW),
    )),),
)
