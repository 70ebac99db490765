"""Synchronized batch statistics under data parallelism, and how data-parallel training scales.

``sync-bn`` — Wu & He 2018 (Group Normalization, ECCV) and Peng et al. 2018 (MegDet, CVPR). Claim: with a
per-device batch of 2–8, BatchNorm computed per device normalizes with noisy statistics and estimates the
population statistics badly (Wu & He: ResNet-50 ImageNet top-1 error 34.7% at 2 images per GPU against 23.6%
at 32; GroupNorm 24.1% at every batch size); synchronizing the statistics over the devices (MegDet's
cross-GPU BatchNorm, ``normlab.nn.SyncBatchNorm``) gives BatchNorm the statistics of the whole batch again.
Here: the lab's CNN on Fashion-MNIST under DistributedDataParallel on gloo, 2 images per rank (quick suite),
BatchNorm per rank vs SyncBatchNorm vs GroupNorm; test accuracy, and the error of the running statistics
against the population statistics of each BatchNorm layer's input (eval-mode network, 2000 training images).
One seed: at 4 images per rank and 300 steps the same comparison came out the other way (SyncBatchNorm 11.7
points below BatchNorm per rank, its running-variance error 1.9× larger), so the quick suite's verdict is
a single observation at the small end of the claim's range, not a measurement of its size.

``scaling`` — a measurement, no paper: the same run (SyncBatchNorm, one global batch split over the ranks)
with 1 and 2 processes (quick and standard suites; up to 8 in full) on this machine (loopback gloo, one
thread per process): steps/s, final accuracy
and the communication share of a step. The training is the same whatever the process count, which the
check tests on the first training losses (1 vs 2 and 4 processes: 9e-8 and 4e-8 apart at step 1, growing about
tenfold per step from step 4 to 1e-4 by step 9): the final accuracies differ by a few points all the same
(68.1%, 70.1%, 70.9% after 80 steps in one quick run), because float32 rounding, which differs with the split,
is amplified by training as for every CNN run of the lab (see the README's lab section).

    normlab lab run sync-bn scaling --suite quick --out lab-report
"""

from __future__ import annotations

import math
from typing import Any

from normlab.lab.ddp import NORMS, TRACED_STEPS, ddp_config
from normlab.lab.papers.common import accuracy_check, CI_RULE, POINT
from normlab.lab.spec import Check, Experiment, Figure, Panel, Row, Runs, Setup, Trace, curves, final, num, pct

# ---------------------------------------------------------------------------------------------------------
# sync-bn
# ---------------------------------------------------------------------------------------------------------

SYNC_VAR_RATIO = 0.8
"""SyncBatchNorm's running-variance error is below this fraction of per-rank BatchNorm's (a log-ratio, its margin
raised to the measured noise floor)."""
SYNC_ACC_MARGIN = POINT
"""SyncBatchNorm's test accuracy exceeds per-rank BatchNorm's by more than this (raised to the noise floor)."""

SYNC_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"nproc": 2, "per_rank": 4, "steps": 6, "eval_every": 3, "n_train": 256, "n_test": 128, "size": 12,
              "widths": [4, 8]},
    "quick": {"nproc": 2, "per_rank": 2, "steps": 200, "eval_every": 100, "n_train": 4000, "n_test": None,
              "size": 16, "widths": [8, 16, 32, 32]},
    "full": {"nproc": 4, "per_rank": 4, "steps": 4000, "eval_every": 500, "n_train": None, "n_test": None,
             "size": None, "widths": [32, 64, 128, 128]},
}
SYNC_LABELS = {"bn": "BatchNorm per rank", "sync": "SyncBatchNorm", "gn": "GroupNorm"}
assert set(SYNC_LABELS) == set(NORMS)
SYNC_LR = 0.02


def _pool_after(widths: list[int]) -> list[int]:
    return list(range(1, len(widths), 2))


def _sync_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    return {norm: ddp_config(norm, b["nproc"], b["nproc"] * b["per_rank"], b["steps"], SYNC_LR, b["widths"],
                             _pool_after(b["widths"]), b["n_train"], b["n_test"], b["size"], setup.seed,
                             eval_every=b["eval_every"], images=setup.images)
            for norm in SYNC_LABELS}


def _ddp(run: dict[str, Any], key: str) -> float:
    values = run["series"].get("ddp", {}).get(key, [])
    return float(values[-1]) if values and values[-1] is not None else math.nan


def _sync_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {k: final(runs[k], last=1) for k in SYNC_LABELS}
    var_err = {k: _ddp(runs[k], "running_var_error") for k in ("bn", "sync")}
    mean_err = {k: _ddp(runs[k], "running_mean_error") for k in ("bn", "sync")}
    paper = {"bn": "65.3% (ResNet-50, ImageNet, 2 images/GPU)", "sync": "—", "gn": "75.9% (same, any batch)"}
    rows = [Row(f"test accuracy, {label}", pct(acc[k]), paper[k]) for k, label in SYNC_LABELS.items()]
    rows += [Row(f"running variance error |log(running/population)|, {SYNC_LABELS[k]}", num(var_err[k]), "—")
             for k in var_err]
    rows += [Row(f"running mean error |running − population|/σ, {SYNC_LABELS[k]}", num(mean_err[k]), "—")
             for k in mean_err]
    checks = [
        Check.compare(f"SyncBatchNorm's running-variance error is below {SYNC_VAR_RATIO:g}× that of BatchNorm per "
                      f"rank (ratio, log scale)", var_err["sync"], var_err["bn"], "<", -math.log(SYNC_VAR_RATIO),
                      log=True, paper="— (synchronized statistics are the whole batch's)"),
        accuracy_check(f"SyncBatchNorm's test accuracy exceeds BatchNorm per rank's by more than "
                       f"{100 * SYNC_ACC_MARGIN:g} point", acc["sync"], acc["bn"], ">", SYNC_ACC_MARGIN,
                       paper="+10.6 points (GN 75.9% vs per-GPU BN 65.3% at 2 images; synchronized BN ≈ GN)"),
    ]
    return rows, checks


def _sync_protocol(b: dict[str, Any]) -> str:
    size = "native size" if b["size"] is None else f"{b['size']}x{b['size']}"
    return (f"VGG-style CNN (widths {'→'.join(map(str, b['widths']))}) on Fashion-MNIST (CIFAR-10 when --data-dir "
            f"holds it) at {size}, {b['n_train'] or 'all'} training images; DistributedDataParallel over "
            f"{b['nproc']} gloo processes with {b['per_rank']} images per rank (global batch "
            f"{b['nproc'] * b['per_rank']}), SGD lr {SYNC_LR} momentum 0.9 for {b['steps']} steps; rank 0 "
            f"evaluates with its running statistics on {b['n_test'] or 'all'} test images. GroupNorm: min(32, C) groups. Population statistics: each "
            f"BatchNorm layer's input over 2000 training images, network in eval mode, merged exactly.")


SYNC_BN = Experiment(
    name="sync-bn",
    title="Synchronized BatchNorm at a small per-rank batch",
    paper="Wu & He 2018 (Group Normalization); Peng et al. 2018 (MegDet, cross-GPU BatchNorm)",
    claim="At 2–8 images per device, per-device BatchNorm's statistics are noisy and its running statistics off; "
          "synchronizing them across devices restores whole-batch BatchNorm; GroupNorm does not depend on the batch.",
    protocol=_sync_protocol,
    criterion=(f"Two paired checks: log(SyncBatchNorm's running-variance error / per-rank BatchNorm's) < log "
               f"{SYNC_VAR_RATIO:g}, and SyncBatchNorm's test accuracy − per-rank BatchNorm's > "
               f"{100 * SYNC_ACC_MARGIN:g} point. " + CI_RULE),
    budgets=SYNC_BUDGETS,
    build=_sync_build,
    evaluate=_sync_evaluate,
    figures=(Figure("sync_bn", "BatchNorm per rank vs SyncBatchNorm vs GroupNorm", (
        Panel("test accuracy", "step", "test accuracy", curves(SYNC_LABELS, "eval", "test_acc")),
    )),),
)

# ---------------------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------------------

SCALING_COMPARED_STEPS = 3  # rounding differences grow ~10x per step after these (lr 0.05, momentum 0.9)
SCALING_LOSS_TOL = 1e-5
"""The largest relative difference of those losses, N processes against 1, is below this (float32 rounding);
its CI over the seeds decides."""

SCALING_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"nprocs": [1, 2], "batch": 16, "steps": 6, "n_train": 256, "n_test": 128, "size": 12,
              "widths": [4, 8]},
    "quick": {"nprocs": [1, 2], "batch": 64, "steps": 80, "n_train": 4000, "n_test": 1000, "size": 16,
              "widths": [8, 16, 32, 32]},
    "standard": {"nprocs": [1, 2, 4], "batch": 64, "steps": 80, "n_train": 4000, "n_test": 1000, "size": 16,
                 "widths": [8, 16, 32, 32]},
    "full": {"nprocs": [1, 2, 4, 8], "batch": 128, "steps": 1000, "n_train": None, "n_test": None, "size": None,
             "widths": [32, 64, 128, 128]},
}
SCALING_LR = 0.05


def _scaling_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    return {f"p{n}": ddp_config("sync", n, b["batch"], b["steps"], SCALING_LR, b["widths"], _pool_after(b["widths"]),
                                b["n_train"], b["n_test"], b["size"], setup.seed, images=setup.images)
            for n in b["nprocs"]}


def _first_losses(run: dict[str, Any]) -> list[float]:
    values = run["series"].get("ddp", {}).get("first_losses", [])
    return list(values[-1]) if values else []


def _scaling_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows, checks = [], []
    base = _first_losses(runs[f"p{b['nprocs'][0]}"])
    for n in b["nprocs"]:
        run = runs[f"p{n}"]
        rows.append(Row(f"{n} process(es): steps/s, test accuracy, communication share of a step",
                        f"{num(_ddp(run, 'steps_per_s'))}, {pct(final(run, last=1))}, {pct(_ddp(run, 'comm_share'))}",
                        "—"))
        if n != b["nprocs"][0]:
            pairs = list(zip(_first_losses(run), base))
            gaps = [abs(a / c - 1) for a, c in pairs]
            rows.append(Row(f"{n} process(es): relative gap of the first {len(gaps)} training losses to 1 process's",
                            ", ".join(f"{g:.1e}" for g in gaps), "—"))
            gap = max(gaps[:SCALING_COMPARED_STEPS]) if len(gaps) >= SCALING_COMPARED_STEPS else math.nan
            checks.append(Check.level(f"{n} processes: the first {SCALING_COMPARED_STEPS} training losses agree with "
                                      f"1 process's to {SCALING_LOSS_TOL:g} (largest relative gap)", gap,
                                      SCALING_LOSS_TOL, "<", paper="— (one-process training on the global batch)"))
    return rows, checks


def _scaling_trace(key: str, label: str):
    def make(runs: Runs) -> list[Trace]:
        points = sorted((_ddp(r, "world"), _ddp(r, key)) for r in runs.values())
        return [Trace(label, [p[0] for p in points], [p[1] for p in points])]
    return make


def _scaling_protocol(b: dict[str, Any]) -> str:
    return (f"The lab's CNN (widths {'→'.join(map(str, b['widths']))}) with SyncBatchNorm, global batch {b['batch']} "
            f"split over {', '.join(map(str, b['nprocs']))} gloo processes on this machine (127.0.0.1, one thread "
            f"each), {b['steps']} SGD steps (lr {SCALING_LR}, momentum 0.9). The global training loss of the first "
            f"{TRACED_STEPS} steps is recorded, steps/s measured over the others; communication share = "
            f"1 − (forward+backward without collectives) / (with them), alternated in one run.")


SCALING = Experiment(
    name="scaling",
    title="Data-parallel scaling with SyncBatchNorm (loopback gloo)",
    paper="measurement (no paper)",
    claim="Data-parallel training with SyncBatchNorm is one-process training on the global batch: the training "
          "does not depend on the number of processes, only the speed does.",
    protocol=_scaling_protocol,
    criterion=f"For every process count, the largest relative gap of the first {SCALING_COMPARED_STEPS} training "
              f"losses to 1 process's is below {SCALING_LOSS_TOL:g}; later steps differ by float32 rounding amplified "
              f"~10x per step, shown in the rows. " + CI_RULE,
    budgets=SCALING_BUDGETS,
    build=_scaling_build,
    evaluate=_scaling_evaluate,
    figures=(Figure("scaling", "Steps per second and communication by process count", (
        Panel("throughput", "processes", "steps/s", (_scaling_trace("steps_per_s", "steps/s"),)),
        Panel("communication", "processes", "share of a step", (_scaling_trace("comm_share", "communication"),)),
    )),),
)

EXPERIMENTS = (SYNC_BN, SCALING)
