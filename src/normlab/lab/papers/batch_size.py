"""``batch-size``: BatchNorm as its normalization group shrinks, beside Group/Layer/Instance Norm, batch
renormalization and ghost batch norm (Wu & He 2018, arXiv 1803.08494, Fig. 1 and Table 1; Ioffe 2017,
arXiv 1702.03275, §4.2-4.3).

Claim: BN's error grows as the batch it normalizes over shrinks (ResNet-50 on ImageNet: 23.6% at 32 per
GPU to 34.7% at 2), while GN's does not (24.1% throughout); batch renormalization recovers part of the
loss (normalizing over 4 examples: 74.2% → 76.5% top-1) and most of it on non-i.i.d. batches (67.0% →
78.6%).

Scaled down (PAPERS.md §5): one fixed batch of 64, normalized in groups of G (ghost batch norm with
virtual batches of G: Wu & He's per-GPU batch), G = 32 … 2; batch renormalization over the same groups;
GN, LN and IN on the whole batch (they do not depend on it); test accuracy with the population (running)
statistics. Non-i.i.d.: each group of 32 holds 4 classes x 8 images.

Run it: ``normlab lab run batch-size --suite quick``.
"""

from __future__ import annotations

import math
from typing import Any

from normlab.lab.papers.common import accuracy_check, CI_RULE, POINT
from normlab.lab.spec import (
    Check, Experiment, Figure, Panel, Row, Runs, Setup, Trace, curves, final, pct, run_config, series,
)

__all__ = ["BATCH_SIZE"]

LR = 0.1
MARGIN = POINT
"""Every check is an accuracy difference of two arms of the same seed: the effect must exceed this (raised to
the measured noise floor)."""
NONIID_GROUP, NONIID_CLASSES = 32, 4

WU_HE_BN = {32: "23.6%", 16: "23.7%", 8: "24.8%", 4: "27.3%", 2: "34.7%"}
"""ResNet-50 ImageNet top-1 error by per-GPU batch (Wu & He 2018, Table 1 / Fig. 1)."""

BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"n_train": 512, "n_test": 128, "size": 16, "widths": [4, 8], "pool_after": [0, 1], "batch": 64,
              "steps": 6, "eval_every": 3, "groups": [32, 2]},
    "quick": {"n_train": 10000, "n_test": 2000, "size": 16, "widths": [8, 16, 16], "pool_after": [0, 1, 2],
              "batch": 64, "steps": 300, "eval_every": 50, "groups": [32, 8, 2]},
    "full": {"n_train": None, "n_test": None, "size": None, "widths": [16, 32, 64, 64], "pool_after": [0, 1, 3],
             "batch": 64, "steps": 6000, "eval_every": 250, "groups": [32, 16, 8, 4, 2]},
}


def _schedule(b: dict[str, Any]) -> tuple[int, int, int]:
    """Ioffe's warm-up / r_max / d_max steps (5k, 40k, 25k), as 5%, 40% and 25% of the run."""
    return b["steps"] // 20, b["steps"] * 2 // 5, b["steps"] // 4


def _renorm(group: int, b: dict[str, Any]) -> str:
    warmup, rsteps, dsteps = _schedule(b)
    return f"renorm:v={group},warmup={warmup},rsteps={rsteps},dsteps={dsteps}"


def _run(setup: Setup, b: dict[str, Any], norm: str, noniid: bool = False) -> dict[str, Any]:
    data = {"name": setup.images, "n_train": b["n_train"], "n_test": b["n_test"], "size": b["size"], "n_probe": 64}
    model = {"arch": "vgg", "widths": b["widths"], "pool_after": b["pool_after"], "norm": norm}
    cfg = run_config(setup, data, model, lr=LR, steps=b["steps"], batch=b["batch"], eval_every=b["eval_every"])
    if noniid:
        cfg["optim"]["groups"] = {"size": NONIID_GROUP, "classes": NONIID_CLASSES}
    return cfg


def _build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    runs = {"bn": _run(setup, b, "bn"), "gn": _run(setup, b, "gn"), "ln": _run(setup, b, "ln"),
            "in": _run(setup, b, "in")}
    for g in b["groups"]:
        runs[f"ghost-{g}"] = _run(setup, b, f"ghost:v={g}")
        runs[f"renorm-{g}"] = _run(setup, b, _renorm(g, b))
    runs["noniid-ghost"] = _run(setup, b, f"ghost:v={NONIID_GROUP}", noniid=True)
    runs["noniid-renorm"] = _run(setup, b, _renorm(NONIID_GROUP, b), noniid=True)
    runs["noniid-gn"] = _run(setup, b, "gn", noniid=True)
    return runs


def _err(run: dict[str, Any]) -> float:
    return 1.0 - final(run)


def _evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    groups = b["groups"]
    small, large = min(groups), max(groups)
    rows = [Row("test error, BN over the whole batch of 64", pct(_err(runs["bn"])), "—")]
    for g in groups:
        rows.append(Row(f"test error, normalization groups of {g}: BN (ghost) / batch renorm",
                        f"{pct(_err(runs[f'ghost-{g}']))} / {pct(_err(runs[f'renorm-{g}']))}",
                        f"BN {WU_HE_BN.get(g, '—')} (Wu & He)" + (", BN 25.8% vs renorm 23.5% (Ioffe, over 4)"
                                                                  if g == 4 else "")))
    rows += [
        Row("test error, GN / LN / IN (independent of the groups)",
            f"{pct(_err(runs['gn']))} / {pct(_err(runs['ln']))} / {pct(_err(runs['in']))}",
            "GN 24.1% at every batch; LN 25.3%, IN 28.4% (Wu & He, batch 32)"),
        Row(f"non-i.i.d. ({NONIID_CLASSES} classes x {NONIID_GROUP // NONIID_CLASSES} images per group of "
            f"{NONIID_GROUP}): test accuracy, BN / renorm / GN",
            f"{pct(final(runs['noniid-ghost']))} / {pct(final(runs['noniid-renorm']))} / "
            f"{pct(final(runs['noniid-gn']))}",
            "BN 67.0%, renorm 78.6% (Ioffe, 16 labels x 2 images)"),
    ]
    ghost_small = final(runs[f"ghost-{small}"])
    checks = [
        accuracy_check(f"BN's accuracy with groups of {large} exceeds its accuracy with groups of {small} by more "
                       f"than {100 * MARGIN:g} point", final(runs[f"ghost-{large}"]), ghost_small, ">", MARGIN,
                       paper="+11.1 points (error 23.6% at 32 → 34.7% at 2)"),
        accuracy_check(f"GN beats BN with groups of {small} by more than {100 * MARGIN:g} point", final(runs["gn"]),
                       ghost_small, ">", MARGIN, paper="+10.6 points (GN 24.1% vs BN 34.7% error at 2)"),
        accuracy_check(f"batch renorm beats BN with groups of {small} by more than {100 * MARGIN:g} point",
                       final(runs[f"renorm-{small}"]), ghost_small, ">", MARGIN,
                       paper="+2.3 points (over 4: 74.2% → 76.5%)"),
        accuracy_check(f"non-i.i.d. groups: batch renorm beats BN by more than {100 * MARGIN:g} point",
                       final(runs["noniid-renorm"]), final(runs["noniid-ghost"]), ">", MARGIN,
                       paper="+11.6 points (67.0% → 78.6%)"),
    ]
    return rows, checks


def _by_group(prefix: str, label: str, with_full_batch: bool = False):
    def make(runs: Runs) -> list[Trace]:
        keys = sorted((k for k in runs if k.startswith(prefix + "-")), key=lambda k: -int(k.split("-")[1]))
        xs = [math.log2(int(k.split("-")[1])) for k in keys]
        ys = [100 * _err(runs[k]) for k in keys]
        if with_full_batch:
            xs, ys = [6.0] + xs, [100 * _err(runs["bn"])] + ys
        return [Trace(label, xs, ys)]
    return make


def _smallest(prefix: str, label: str):
    """Test accuracy over training of the run with the smallest normalization group."""
    def make(runs: Runs) -> list[Trace]:
        key = min((k for k in runs if k.startswith(prefix + "-")), key=lambda k: int(k.split("-")[1]))
        run = runs[key]
        return [Trace(f"{label}, groups of {key.split('-')[1]}", list(series(run, "eval", "step")),
                      list(series(run, "eval", "test_acc")))]
    return make


def _size(b: dict[str, Any]) -> str:
    return "native-size" if b["size"] is None else f"{b['size']}x{b['size']}"


def _flat(key: str, label: str):
    def make(runs: Runs) -> list[Trace]:
        xs = sorted({math.log2(int(k.split("-")[1])) for k in runs if k.startswith("ghost-")} | {6.0}, reverse=True)
        return [Trace(label, xs, [100 * _err(runs[key])] * len(xs))]
    return make


BATCH_SIZE = Experiment(
    name="batch-size",
    title="Small normalization groups: BN vs GN, LN, IN, batch renorm and ghost BN",
    paper="Wu & He 2018, arXiv 1803.08494 (Fig. 1, Table 1); Ioffe 2017, arXiv 1702.03275 (§4.2-4.3)",
    claim=("BN's error grows as the group it normalizes over shrinks while GN's stays flat (ResNet-50: BN 23.6% "
           "at 32 to 34.7% at 2, GN 24.1%); batch renorm recovers part of it (over 4 examples: 74.2% → 76.5%) "
           "and most of it on non-i.i.d. batches (67.0% → 78.6%)."),
    protocol=lambda b: (
        f"VGG-style CNN ({'→'.join(map(str, b['widths']))} 3x3 convolutions, ReLU, max-pooling, global average "
        f"pooling, linear classifier), plain SGD lr {LR}, one batch of {b['batch']} per step, {b['steps']} steps, "
        f"{_size(b)} images of the lab's dataset. BN normalizes over groups of "
        f"{', '.join(map(str, b['groups']))} inside the batch (ghost BN, running statistics from the whole "
        f"batch); batch renorm over the same groups, one group after the other (r_max 3 and d_max 5, plain BN for "
        f"the first 5% of the steps, r_max reached at 40%, d_max at 25%: Ioffe's 5k/40k/25k scaled to the run); "
        f"GN with groups of 4 channels, LN (one group), IN (one channel per group), on the whole batch. Test "
        f"accuracy in eval mode (population statistics), mean of the last 3 evaluations. Non-i.i.d.: each group "
        f"of {NONIID_GROUP} holds {NONIID_CLASSES} random classes x {NONIID_GROUP // NONIID_CLASSES} images."),
    criterion=(f"Four paired accuracy differences, each > {100 * MARGIN:g} point: BN at the largest group − BN at "
               f"the smallest; GN − BN at the smallest group; batch renorm − BN at the smallest group; batch renorm "
               f"− BN on non-i.i.d. groups. " + CI_RULE),
    budgets=BUDGETS,
    build=_build,
    evaluate=_evaluate,
    figures=(Figure("batch-size", "Normalization groups inside a batch of 64", (
        Panel("test error by normalization group (i.i.d.)", "log2 of the samples per normalization group",
              "test error (%)", (_by_group("ghost", "BN (ghost BN; 6 = the whole batch of 64)", True),
                                 _by_group("renorm", "batch renorm"), _flat("gn", "GN"), _flat("ln", "LN"),
                                 _flat("in", "IN"))),
        Panel("test accuracy, non-i.i.d. groups", "step", "test accuracy",
              curves({"noniid-ghost": "BN", "noniid-renorm": "batch renorm", "noniid-gn": "GN"}, "eval",
                     "test_acc")),
        Panel("test accuracy, smallest groups (i.i.d.)", "step", "test accuracy",
              (_smallest("ghost", "BN (ghost)"), _smallest("renorm", "batch renorm"),
               curves({"gn": "GN"}, "eval", "test_acc")[0])),
    )),),
)
