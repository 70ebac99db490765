"""``sequence``: BatchNorm in a Transformer on padded variable-length sequences, against LayerNorm, masked
BatchNorm and batch renormalization, and how much the batch statistics fluctuate (Shen, Yao, Gholami,
Mahoney & Keutzer 2020, "PowerNorm: Rethinking Batch Normalization in Transformers", arXiv 2003.07845).

Claim: in Transformers for language, BN falls behind LN, because the batch statistics of sequence data
fluctuate far more over training than those of images (the paper's Fig. 2: the distance between batch and
running statistics is much larger for IWSLT14 than for CIFAR-10), and that is what PowerNorm addresses.
Here a padded batch adds a fluctuation of its own: how much padding a batch holds; masked BatchNorm takes
the statistics over the real positions only.

Data: Fashion-MNIST images read as sequences of their 28 rows, each cropped to a random run of 8 to 28
rows and padded back to 28 (:mod:`normlab.lab.transformer`).

Run it: ``normlab lab run sequence --suite quick``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normlab.lab.papers.common import accuracy_check, CI_RULE, POINT
from normlab.lab.spec import (
    Check, Experiment, Figure, Panel, Row, Runs, Setup, Trace, curves, final, num, pct, run_config, series,
)

__all__ = ["SEQUENCE"]

LR, MOMENTUM = 0.05, 0.9
MIN_LEN = 8
MARGIN = POINT
"""LN "beats" BN by more than this accuracy, masked BN is not behind BN by more than this (both raised to the
measured noise floor)."""
FLUCTUATION_RATIO = 2.0
"""The Transformer's BN statistics must stray from the running ones at least this many times as far as
the CNN's (PowerNorm, Fig. 2, shows about an order of magnitude)."""
SETTLED = 0.25
"""Fluctuation is averaged over the probes after this fraction of the run (the running statistics start
at 0 and 1)."""

NORMS = {"ln": "LayerNorm", "bn": "BatchNorm (padding counted)", "masked-bn": "masked BatchNorm",
         "renorm": "batch renorm (masked)"}

BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"n_train": 512, "n_test": 128, "width": 16, "depth": 1, "heads": 2, "batch": 32, "steps": 6,
              "eval_every": 3, "probe_every": 2, "cnn_widths": [4, 8]},
    "quick": {"n_train": 10000, "n_test": 2000, "width": 32, "depth": 2, "heads": 4, "batch": 64, "steps": 400,
              "eval_every": 100, "probe_every": 25, "cnn_widths": [8, 16, 16]},
    "full": {"n_train": None, "n_test": None, "width": 64, "depth": 4, "heads": 4, "batch": 64, "steps": 8000,
             "eval_every": 500, "probe_every": 100, "cnn_widths": [16, 32, 64]},
}


def _norm(key: str, b: dict[str, Any]) -> str:
    if key != "renorm":
        return key
    s = b["steps"]  # Ioffe's 5k / 40k / 25k steps as 5%, 40% and 25% of the run
    return f"renorm:warmup={s // 20},rsteps={s * 2 // 5},dsteps={s // 4}"


def _build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    data = {"name": "fashion-mnist", "n_train": b["n_train"], "n_test": b["n_test"], "size": None, "n_probe": 64}
    probe = [{"kind": "batch_stats", "every": b["probe_every"]}]
    runs = {}
    for key in NORMS:
        model = {"arch": "seq-transformer", "width": b["width"], "depth": b["depth"], "heads": b["heads"],
                 "norm": _norm(key, b), "min_len": MIN_LEN}
        runs[key] = run_config(setup, data, model, lr=LR, momentum=MOMENTUM, steps=b["steps"], batch=b["batch"],
                               eval_every=b["eval_every"], probes=probe)
    cnn = {"arch": "vgg", "widths": b["cnn_widths"], "pool_after": list(range(len(b["cnn_widths"]))), "norm": "bn"}
    runs["cnn-bn"] = run_config(setup, data, cnn, lr=LR, momentum=MOMENTUM, steps=b["steps"], batch=b["batch"],
                                eval_every=b["eval_every"], probes=probe)
    return runs


def fluctuation(run: dict[str, Any], key: str = "mean_dev") -> float:
    """Mean over layers and over the probes after :data:`SETTLED` of the run of ``batch_stats``' ``key``."""
    steps, values = series(run, "batch_stats", "step"), series(run, "batch_stats", key)
    if not steps:
        return float("nan")
    start = SETTLED * steps[-1]
    kept = [np.mean(v) for s, v in zip(steps, values) if s >= start and v]
    return float(np.mean(kept)) if kept else float("nan")


def _evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows = [Row(f"test accuracy, {label}", pct(final(runs[key])),
                {"ln": "LN ahead of BN in NLP (IWSLT14: BLEU 35.5 vs 34.4)", "bn": "behind LN"}.get(key, "—"))
            for key, label in NORMS.items()]
    fluct = {key: fluctuation(runs[key]) for key in (*NORMS, "cnn-bn") if key != "ln"}
    var_fluct = {key: fluctuation(runs[key], "var_dev") for key in fluct}
    for key, label in (*((k, v) for k, v in NORMS.items() if k != "ln"), ("cnn-bn", "CNN BatchNorm (images)")):
        rows.append(Row(f"batch vs running statistics, {label}: mean |μ_B − μ|/σ, |σ²_B/σ² − 1|",
                        f"{num(fluct[key])}, {num(var_fluct[key])}",
                        "much larger for IWSLT14 than for CIFAR-10 (Fig. 2)" if key in ("bn", "cnn-bn") else "—"))
    checks = [
        accuracy_check(f"LayerNorm beats BatchNorm on padded sequences by more than {100 * MARGIN:g} point",
                       final(runs["ln"]), final(runs["bn"]), ">", MARGIN,
                       paper="LN ahead (IWSLT14 BLEU 35.5 vs 34.4)"),
        Check.compare(f"the Transformer's batch means stray from the running ones more than {FLUCTUATION_RATIO:g}x "
                      f"as far as the CNN's (ratio, log scale)", fluct["bn"], fluct["cnn-bn"], ">",
                      math.log(FLUCTUATION_RATIO), log=True, paper="about 10x (Fig. 2)"),
        accuracy_check(f"masked BatchNorm is not behind BatchNorm counting the padding by more than "
                       f"{100 * MARGIN:g} point", final(runs["masked-bn"]), final(runs["bn"]), ">=", MARGIN,
                       paper="— (PowerNorm masks the padding)"),
    ]
    return rows, checks


def _fluctuation_trace(key: str, label: str, field: str):
    def make(runs: Runs) -> list[Trace]:
        run = runs[key]
        return [Trace(label, list(series(run, "batch_stats", "step")),
                      [float(np.mean(v)) if v else float("nan") for v in series(run, "batch_stats", field)])]
    return make


_BN_RUNS = {"bn": "BatchNorm (padding counted)", "masked-bn": "masked BatchNorm", "renorm": "batch renorm (masked)",
            "cnn-bn": "CNN BatchNorm (images)"}

SEQUENCE = Experiment(
    name="sequence",
    title="BatchNorm in a Transformer on padded sequences: LN vs BN vs masked BN vs batch renorm",
    paper="Shen, Yao, Gholami, Mahoney & Keutzer 2020 (PowerNorm), arXiv 2003.07845, Table 1 and Fig. 2",
    claim=("In Transformers on sequence data BN falls behind LN, and the batch statistics fluctuate far more "
           "over training than in a CNN on images."),
    protocol=lambda b: (
        f"Fashion-MNIST images as sequences of 28 rows of 28 pixels, each cropped to a random run of {MIN_LEN}-28 "
        f"rows (drawn afresh every step; a fixed crop per test image) and zero-padded to 28, with the mask of the "
        f"real rows. Post-norm Transformer encoder: row embedding to width {b['width']} plus learned positions, "
        f"{b['depth']} layers of {b['heads']}-head self-attention (padding masked out of the keys) and a ReLU "
        f"feed-forward of width {2 * b['width']}, mean over the real rows, linear classifier. Normalization: LN; "
        f"BN over every position (padding included); masked BN (real positions only); batch renorm over the real "
        f"positions (plain BN for 5% of the steps, r_max 3 at 40%, d_max 5 at 25%). SGD lr {LR}, momentum "
        f"{MOMENTUM}, batch {b['batch']}, {b['steps']} steps, {b['n_train'] or 'all'} training images. "
        f"Fluctuation: every {b['probe_every']} steps, the coming batch's statistics against the running ones in "
        f"every BN layer, averaged over layers and over the last {100 * (1 - SETTLED):.0f}% of the run; the CNN "
        f"(VGG-style {'→'.join(map(str, b['cnn_widths']))}, BN, same optimizer) gives the images' baseline."),
    criterion=(f"Three paired checks: LN's test accuracy − BN's > {100 * MARGIN:g} point; the log of the ratio of "
               f"the Transformer's batch-mean fluctuation to the CNN's > log {FLUCTUATION_RATIO:g}; masked BN's "
               f"accuracy − BN's > −{100 * MARGIN:g} point (non-inferiority). " + CI_RULE),
    budgets=BUDGETS,
    build=_build,
    evaluate=_evaluate,
    figures=(Figure("sequence", "Normalization in a Transformer on padded sequences", (
        Panel("test accuracy", "step", "test accuracy", curves(NORMS, "eval", "test_acc")),
        Panel("batch means vs running means", "step", "mean over channels and layers of |μ_B − μ|/σ",
              tuple(_fluctuation_trace(k, lab, "mean_dev") for k, lab in _BN_RUNS.items()), ylog=True),
        Panel("batch variances vs running variances", "step", "mean over channels and layers of |σ²_B/σ² − 1|",
              tuple(_fluctuation_trace(k, lab, "var_dev") for k, lab in _BN_RUNS.items()), ylog=True),
    )),),
)
