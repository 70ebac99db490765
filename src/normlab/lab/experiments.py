"""The eight experiments of the lab, each a declarative :class:`~normlab.lab.spec.Experiment`.

Protocols, formulas and the papers' numbers follow /work/shared/lab/PAPERS.md; where a paper leaves
a choice open, the choice is named in the spec's ``protocol``. Budgets are per suite: ``quick``
fits the whole lab in a few minutes on 2 CPU cores, ``full`` scales steps, widths and data towards
the papers' setups (CIFAR-10 when ``--data-dir`` holds it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normlab.lab import measure, papers
from normlab.lab.spec import (
    Check,
    Experiment,
    Figure,
    Panel,
    Row,
    Runs,
    Setup,
    Trace,
    band,
    curves,
    final,
    layer_curves,
    layer_mean,
    median,
    num,
    pct,
    ratio,
    run_config,
    series,
)

POINT = 0.01

# --------------------------------------------------------------------------------------------
# Shared model/data settings: the VGG-style CNN and the deep linear network of Santurkar et al.
# --------------------------------------------------------------------------------------------

CNN_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"n_train": 256, "n_test": 128, "size": 16, "widths": [4, 4, 8, 8, 8, 8],
              "pool_after": [1, 3, 5], "batch": 32, "steps": 6, "eval_every": 3, "probe_every": 3},
    "quick": {"n_train": 10000, "n_test": 2000, "size": 16, "widths": [8, 16, 32, 32, 64, 64],
              "pool_after": [1, 3, 5], "batch": 128, "steps": 500, "eval_every": 50, "probe_every": 25},
    "full": {"n_train": None, "n_test": None, "size": None, "widths": [32, 64, 128, 128, 256, 256],
             "pool_after": [1, 3, 5], "batch": 128, "steps": 15000, "eval_every": 500, "probe_every": 250},
}
DLN_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"n": 64, "dim": 10, "depth": 6, "steps": 6, "eval_every": 3, "probe_every": 3},
    "quick": {"n": 1000, "dim": 10, "depth": 25, "steps": 500, "eval_every": 25, "probe_every": 50},
    "full": {"n": 1000, "dim": 10, "depth": 25, "steps": 10000, "eval_every": 100, "probe_every": 250},
}
CNN_LR = 0.1
DLN_LR = 1e-6
ACTIVATION_BLOCKS = (1, 5)
CNN_LANDSCAPE = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
DLN_LANDSCAPE = [float(f) for f in np.logspace(-2, math.log10(30), 8)]

CNN_PROTOCOL = (
    "VGG-style CNN: six 3x3 convolutions (widths {widths}), ReLU, max-pooling after convolutions 2, 4 "
    "and 6, global average pooling and a linear classifier; Glorot-uniform init; plain SGD, batch {batch}, "
    "{steps} steps, no augmentation; data: {images}{size_note}, {n_train} training images, "
    "{n_test} test images."
)
DLN_PROTOCOL = (
    "Deep linear network: {depth} bias-free {dim}x{dim} linear layers (Glorot-normal init) fitting y = A x "
    "with x and A Gaussian, {n} samples as one full batch, summed squared error, plain SGD at lr 1e-6, "
    "{steps} steps."
)


def _count(n: int | None, full: str) -> str:
    return full if n is None else f"{n:,}"


def _size_text(b: dict[str, Any]) -> str:
    return "native-size" if b["size"] is None else f"{b['size']}x{b['size']}"


def cnn_protocol(b: dict[str, Any], images: str = "Fashion-MNIST (CIFAR-10 when --data-dir holds it)") -> str:
    size_note = "" if b["size"] is None else f" resized to {_size_text(b)}"
    return CNN_PROTOCOL.format(widths="→".join(map(str, b["widths"])), batch=b["batch"], steps=b["steps"],
                               images=images, size_note=size_note, n_train=_count(b["n_train"], "all"),
                               n_test=_count(b["n_test"], "all"))


def dln_protocol(b: dict[str, Any]) -> str:
    return DLN_PROTOCOL.format(**b)


def image_data(setup: Setup, b: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return {"name": name or setup.images, "n_train": b["n_train"], "n_test": b["n_test"],
            "size": b["size"], "n_probe": 512}


def activation_probe(b: dict[str, Any], blocks: tuple[int, ...] = ACTIVATION_BLOCKS) -> dict[str, Any]:
    return {"kind": "activations", "blocks": list(blocks), "sites": ["pre_norm", "act_input"], "train": True,
            "every": b["probe_every"]}


def gradient_probes(b: dict[str, Any], factors: list[float]) -> list[dict[str, Any]]:
    return [{"kind": "ics", "every": b["probe_every"]},
            {"kind": "landscape", "factors": factors, "every": b["probe_every"]}]


def cnn_run(setup: Setup, b: dict[str, Any], norm: str, lr: float = CNN_LR, position: str = "before",
            affine: bool = True, probes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A CNN run; by default it records the activation probe, so runs that several experiments
    share (BN and no BN at lr 0.1) have one config and are trained once."""
    model = {"arch": "vgg", "widths": b["widths"], "pool_after": b["pool_after"], "norm": norm,
             "position": position, "affine": affine}
    return run_config(setup, image_data(setup, b), model, lr=lr, steps=b["steps"], batch=b["batch"],
                      eval_every=b["eval_every"], probes=probes if probes is not None else [activation_probe(b)])


def cnn_gradient_run(setup: Setup, b: dict[str, Any], norm: str) -> dict[str, Any]:
    return cnn_run(setup, b, norm, probes=gradient_probes(b, CNN_LANDSCAPE))


def dln_run(setup: Setup, b: dict[str, Any], norm: str) -> dict[str, Any]:
    """A deep-linear-network run with the gradient probes (ICS and landscape)."""
    data = {"name": "gaussian", "n": b["n"], "dim": b["dim"]}
    model = {"arch": "dln", "depth": b["depth"], "norm": norm}
    return run_config(setup, data, model, lr=DLN_LR, steps=b["steps"], batch=b["n"],
                      eval_every=b["eval_every"], probes=gradient_probes(b, DLN_LANDSCAPE))


def merged(cnn: dict[str, Any], dln: dict[str, Any]) -> dict[str, Any]:
    return {"cnn": cnn, "dln": dln}


def shift(run: dict[str, Any], site: str, blocks: tuple[int, ...] = ACTIVATION_BLOCKS) -> float:
    """Mean over the probed blocks of :func:`measure.distribution_shift` of the probed unit at ``site``."""
    if run["diverged_at"] is not None:
        return math.nan
    return float(np.mean([measure.distribution_shift(series(run, "activations", f"b{k}_{site}_mean"),
                                                     series(run, "activations", f"b{k}_{site}_std"))
                          for k in blocks]))


def accuracy_check(text: str, diff: float, margin: float) -> Check:
    """Pass when ``diff`` (an accuracy difference) is at least ``margin``, fail when it is at most
    ``-margin``: a margin inside which two runs on one seed are not told apart."""
    return Check.of(text, f"{100 * diff:+.1f} points", diff >= margin, diff <= -margin)


def accuracy_rows(runs: Runs, labels: dict[str, str], paper: dict[str, str]) -> list[Row]:
    return [Row(f"final test accuracy, {label}", pct(final(runs[key])), paper.get(key, "—"))
            for key, label in labels.items()]


def accuracy_panels(labels: dict[str, str], title: str) -> tuple[Panel, ...]:
    return (
        Panel(f"{title}: test accuracy", "step", "test accuracy", curves(labels, "eval", "test_acc")),
        Panel(f"{title}: training loss", "step", "mean training loss since last evaluation",
              curves(labels, "eval", "train_loss"), ylog=True),
    )


# --------------------------------------------------------------------------------------------
# 1. Ioffe & Szegedy 2015
# --------------------------------------------------------------------------------------------

IOFFE_LABELS = {"bn": "with BN", "none": "without BN"}


def _ioffe_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    data = {"name": "fashion-mnist", "n_train": b["n_train"], "n_test": b["n_test"], "size": None, "n_probe": 512}
    probe = {"kind": "activations", "blocks": [2], "sites": ["act_input"], "train": True,
             "every": b["probe_every"]}
    return {norm: run_config(setup, data, {"arch": "mlp", "hidden": [100, 100, 100], "init_std": b["init_std"],
                                           "norm": norm},
                             lr=b["lr"], steps=b["steps"], batch=b["batch"], eval_every=b["eval_every"],
                             probes=[probe])
            for norm in IOFFE_LABELS}


def steps_to_reach(run: dict[str, Any], target: float) -> float:
    """First evaluated step whose test accuracy reaches ``target`` (NaN if never)."""
    for step, acc in zip(series(run, "eval", "step"), series(run, "eval", "test_acc")):
        if acc is not None and acc >= target:
            return float(step)
    return math.nan


def _ioffe_drift(run: dict[str, Any]) -> float:
    pcts = series(run, "activations", "b2_act_input_pct")
    return measure.percentile_drift(pcts[0], pcts[-1])


def _ioffe_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc_bn, acc_none = final(runs["bn"]), final(runs["none"])
    drift_bn, drift_none = _ioffe_drift(runs["bn"]), _ioffe_drift(runs["none"])
    target = acc_none
    reach_bn, reach_none = steps_to_reach(runs["bn"], target), steps_to_reach(runs["none"], target)
    rows = accuracy_rows(runs, IOFFE_LABELS, {"bn": "MNIST: higher and earlier than without BN (Fig. 1a)",
                                              "none": "—"})
    rows += [
        Row("steps to reach no-BN's final accuracy, BN vs no BN",
            f"{num(reach_bn)} vs {num(reach_none)} ({num(ratio(reach_none, reach_bn))}x fewer)",
            "Inception: 2.1M vs 31.0M steps to 72.2% (14x fewer)"),
        Row("drift of the sigmoid input's 15/50/85th percentiles (mean |end − start|), BN",
            num(drift_bn), "stays put (Fig. 1c)"),
        Row("same, without BN", num(drift_none), "drifts (Fig. 1b)"),
    ]
    checks = [
        accuracy_check("BN's final test accuracy exceeds no-BN's by at least 1 point", acc_bn - acc_none, POINT),
        Check.of("BN's percentile drift is under half of no-BN's (fails if it is not smaller at all)",
                 f"{num(drift_bn)} vs {num(drift_none)}", drift_bn < 0.5 * drift_none, drift_bn >= drift_none),
    ]
    return rows, checks


IOFFE = Experiment(
    name="ioffe-mnist",
    title="The original BN paper: a sigmoid MLP with and without BN",
    paper="Ioffe & Szegedy 2015, arXiv 1502.03167, Fig. 1",
    claim=("With BN the network trains faster and reaches a higher test accuracy, and the distribution of "
           "a last-hidden-layer unit's sigmoid input stays put, while without BN it drifts."),
    protocol=lambda b: (
        f"3 fully connected hidden layers of 100 sigmoid units, softmax output, weights N(0, {b['init_std']}²) "
        "(the paper's 'small Gaussian'; its value is not stated), biases 0, BN on every hidden layer before the "
        f"sigmoid. The paper states no optimizer: plain SGD, lr {b['lr']:g}, batch {b['batch']}, {b['steps']} "
        f"steps. Fashion-MNIST (the paper used MNIST), {_count(b['n_train'], 'all 60,000')} training images. "
        "Percentiles of unit 0 of the third hidden layer's sigmoid input, over 512 fixed test images in "
        "training mode (batch statistics, as the sigmoid sees them while training)."),
    criterion=("Reproduced if BN's final test accuracy (mean of the last three evaluations) beats no-BN's by "
               "≥ 1 point and BN's percentile drift (mean over the 15/50/85th percentiles of |value at the "
               "end − value at step 0|) is below half of no-BN's. Not reproduced if BN is ≥ 1 point worse or "
               "its drift is not smaller at all. Inconclusive otherwise."),
    budgets={
        "smoke": {"steps": 6, "batch": 20, "lr": 0.1, "init_std": 0.05, "n_train": 256, "n_test": 128,
                  "eval_every": 3, "probe_every": 3},
        "quick": {"steps": 3000, "batch": 60, "lr": 0.1, "init_std": 0.05, "n_train": None, "n_test": 2000,
                  "eval_every": 100, "probe_every": 100},
        "full": {"steps": 50000, "batch": 60, "lr": 0.1, "init_std": 0.05, "n_train": None, "n_test": None,
                 "eval_every": 1000, "probe_every": 1000},
    },
    build=_ioffe_build,
    evaluate=_ioffe_evaluate,
    figures=(Figure("ioffe-mnist", "Ioffe & Szegedy Fig. 1 on Fashion-MNIST", (
        Panel("(a) test accuracy", "step", "test accuracy", curves(IOFFE_LABELS, "eval", "test_acc")),
        Panel("(b) sigmoid input without BN: 15/50/85th pct", "step", "sigmoid input",
              (band("none", "without BN", "activations", "b2_act_input_pct"),)),
        Panel("(c) sigmoid input with BN: 15/50/85th pct", "step", "sigmoid input",
              (band("bn", "with BN", "activations", "b2_act_input_pct"),)),
    )),),
)


# --------------------------------------------------------------------------------------------
# 2a. Santurkar et al. Fig. 1: learning rates and layer-input distributions
# --------------------------------------------------------------------------------------------

SANTURKAR_LRS = (0.1, 0.5)
DISTRIBUTION_LR = 0.1
LR_LABELS = {f"{norm}-lr{lr:g}": f"{'BN' if norm == 'bn' else 'no BN'}, lr {lr:g}"
             for lr in SANTURKAR_LRS for norm in ("bn", "none")}


def _lr_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    return {f"{norm}-lr{lr:g}": cnn_run(setup, b, norm, lr) for lr in SANTURKAR_LRS for norm in ("bn", "none")}


def _mean_train_acc(run: dict[str, Any]) -> float:
    """Mean training accuracy over the evaluation schedule; a run that diverged keeps the accuracy
    it ended at for the evaluations it did not reach."""
    values = [v for v in series(run, "eval", "train_acc") if v is not None and not math.isnan(v)]
    if not values:
        return math.nan
    optim, every = run["config"]["optim"], run["config"]["eval_every"]
    scheduled = math.ceil(optim["steps"] / every)
    return float(np.mean(values + [values[-1]] * max(0, scheduled - len(values))))


def _lr_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows = accuracy_rows(runs, LR_LABELS, {"bn-lr0.1": "83% (CIFAR-10, 15k steps)",
                                           "none-lr0.1": "80% (CIFAR-10, 15k steps)"})
    checks = []
    for lr in SANTURKAR_LRS:
        bn, none = runs[f"bn-lr{lr:g}"], runs[f"none-lr{lr:g}"]
        diff = _mean_train_acc(bn) - _mean_train_acc(none)
        rows.append(Row(f"mean training accuracy over training (BN − no BN), lr {lr:g}",
                        f"{100 * diff:+.1f} points", "BN trains faster (Fig. 1)"))
        checks.append(accuracy_check(f"lr {lr:g}: BN's mean training accuracy over the run beats no-BN's by ≥ 1 point",
                                     diff, POINT))
    s_bn = shift(runs[f"bn-lr{DISTRIBUTION_LR:g}"], "pre_norm")
    s_none = shift(runs[f"none-lr{DISTRIBUTION_LR:g}"], "pre_norm")
    r = ratio(s_bn, s_none)
    rows.append(Row(f"layer-input distribution shift per probe, BN / no BN, lr {DISTRIBUTION_LR:g}",
                    f"{num(s_bn)} / {num(s_none)}", "about the same (Fig. 1, layers 3 and 11)"))
    checks.append(Check.of(
        f"lr {DISTRIBUTION_LR:g}: the activation distributions move about as much with BN as without "
        "(shift ratio BN/no BN within [1/2, 2]; fails outside [1/4, 4])",
        num(r), 0.5 <= r <= 2, r < 0.25 or r > 4))
    return rows, checks


def _activation_panels(keys: dict[str, str], title: str) -> tuple[Panel, ...]:
    return tuple(
        Panel(f"{title}: conv {block + 1}, {label}", "step", "conv output before norm (15/50/85th pct)",
              (band(key, label, "activations", f"b{block}_pre_norm_pct"),))
        for block in ACTIVATION_BLOCKS for key, label in keys.items())


SANTURKAR_LR = Experiment(
    name="santurkar-lr",
    title="BN at a small and a large learning rate, and what happens to layer inputs",
    paper="Santurkar, Tsipras, Ilyas & Madry 2018, arXiv 1805.11604, Fig. 1",
    claim=("BN trains faster at both learning rates (0.1 and 0.5), yet the distribution of an activation in a "
           "low and a high layer changes over training about as much with BN as without."),
    protocol=lambda b: cnn_protocol(b) + (
        " Distributions: unit 0 of convolutions 2 and 6 (every position counts), the convolution's output "
        "before any normalization, on 512 fixed test images in training mode, every probe interval. "
        "Shift = mean over consecutive probes of (|Δmean| + |Δstd|) / mean std. (After BN the unit's mean "
        "and std over the probe batch are β and γ by construction, so the comparison is made before it.)"),
    criterion=("Reproduced if at each learning rate BN's mean training accuracy over the run beats no-BN's by ≥ 1 "
               "point (a diverged run counts with the chance-level accuracy it ends at) and, at lr 0.1, the shift "
               "ratio BN/no BN lies in [1/2, 2]. Not reproduced if BN is ≥ 1 point behind or the ratio leaves "
               "[1/4, 4]. Inconclusive otherwise."),
    budgets=CNN_BUDGETS,
    build=_lr_build,
    evaluate=_lr_evaluate,
    figures=(
        Figure("santurkar-lr-accuracy", "Training and test accuracy, with and without BN", (
            Panel("training accuracy", "step", "training accuracy (since last evaluation)",
                  curves(LR_LABELS, "eval", "train_acc")),
            Panel("test accuracy", "step", "test accuracy", curves(LR_LABELS, "eval", "test_acc")),
        )),
        Figure("santurkar-lr-activations", "Distribution of one activation over training, lr 0.1",
               _activation_panels({"bn-lr0.1": "BN", "none-lr0.1": "no BN"}, "lr 0.1")),
    ),
)


# --------------------------------------------------------------------------------------------
# 2b. Santurkar et al. Fig. 2: noisy BN
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# 2c. Santurkar et al. Fig. 3: internal covariate shift measured on gradients
# --------------------------------------------------------------------------------------------

GRADIENT_LABELS = {"cnn-bn": "CNN, BN", "cnn-none": "CNN, no BN", "dln-bn": "DLN, BN", "dln-none": "DLN, no BN"}
GRADIENT_BUDGETS = {suite: merged(CNN_BUDGETS[suite], DLN_BUDGETS[suite]) for suite in CNN_BUDGETS}


def _gradient_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    runs = {}
    for norm in ("bn", "none"):
        runs[f"cnn-{norm}"] = cnn_gradient_run(setup, b["cnn"], norm)
        runs[f"dln-{norm}"] = dln_run(setup, b["dln"], norm)
    return runs


def _mean_over_probes(run: dict[str, Any], key: str) -> float:
    return float(np.mean(layer_mean(run, "ics", key))) if series(run, "ics", key) else math.nan


def _ics_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    cos = {k: _mean_over_probes(r, "cos") for k, r in runs.items()}
    l2 = {k: _mean_over_probes(r, "l2") for k, r in runs.items()}
    paper = {"dln-none": "cos ≈ 1 throughout", "dln-bn": "cos ≈ 0 (nearly uncorrelated)",
             "cnn-bn": "ICS as large as or larger than without BN", "cnn-none": "—"}
    rows = [Row(f"mean cos(G, G′) over layers 2.. and probes, {label}", num(cos[k]), paper[k])
            for k, label in GRADIENT_LABELS.items()]
    rows += [Row(f"mean ‖G − G′‖₂, {label}", num(l2[k]), "—") for k, label in GRADIENT_LABELS.items()]
    checks = []
    for model in ("cnn", "dln"):
        d = cos[f"{model}-bn"] - cos[f"{model}-none"]
        checks.append(Check.of(
            f"{model.upper()}: ICS with BN is as large or larger: mean cos(G, G′) with BN ≤ without + 0.02 "
            "(fails if > without + 0.05)", f"{d:+.3f}", d <= 0.02, d > 0.05))
    checks += [
        Check.of("DLN without BN: cos(G, G′) ≈ 1 (≥ 0.99; fails below 0.9)", num(cos["dln-none"]),
                 cos["dln-none"] >= 0.99, cos["dln-none"] < 0.9),
        Check.of("DLN with BN: G and G′ nearly uncorrelated (cos ≤ 0.5; fails at ≥ 0.9)", num(cos["dln-bn"]),
                 cos["dln-bn"] <= 0.5, cos["dln-bn"] >= 0.9),
    ]
    return rows, checks


def _ics_panels(model: str, title: str) -> tuple[Panel, ...]:
    labels = {k: v for k, v in GRADIENT_LABELS.items() if k.startswith(model)}
    return (
        Panel(f"{title}: cos(G, G′)", "step", "mean over layers 2..", layer_curves(labels, "ics", "cos")),
        Panel(f"{title}: ‖G − G′‖₂", "step", "mean over layers 2..", layer_curves(labels, "ics", "l2"), ylog=True),
    )


ICS = Experiment(
    name="ics",
    title="Internal covariate shift measured on gradients",
    paper="Santurkar et al. 2018, Fig. 3",
    claim=("Measured as the change of a layer's gradient caused by the update of the layers before it, "
           "internal covariate shift is as large or larger with BN; in the deep linear network without BN "
           "cos(G, G′) ≈ 1 throughout, while with BN G and G′ are nearly uncorrelated."),
    protocol=lambda b: (cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) +
              " At every probe step t, on that step's batch: G_i = ∇_{W_i} L; G′_i = the same gradient after every "
              "parameter of layers 1..i−1 (weights, biases and BN parameters) took its SGD step −lr·G, layers i.. "
              "unchanged; BN running statistics are restored after each probe. Layer 1 is left out of the "
              "means (its G′ = G by definition)."),
    criterion=("Reproduced if, for the CNN and the DLN, the mean cos(G, G′) with BN is at most 0.02 above "
               "no-BN's, the DLN without BN has cos ≥ 0.99 and the DLN with BN has cos ≤ 0.5. Not reproduced if "
               "BN's cos is > 0.05 above no-BN's in either model, the DLN without BN has cos < 0.9 or the DLN "
               "with BN has cos ≥ 0.9. Inconclusive otherwise."),
    budgets=GRADIENT_BUDGETS,
    build=_gradient_build,
    evaluate=_ics_evaluate,
    figures=(Figure("ics", "Gradient change caused by the previous layers' update (ICS)",
                    _ics_panels("cnn", "CNN") + _ics_panels("dln", "DLN")),),
)


# --------------------------------------------------------------------------------------------
# 2d. Santurkar et al. Fig. 4: the landscape along the gradient
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# 2e. Santurkar et al. §3.3: ℓp normalization
# --------------------------------------------------------------------------------------------

LP_NORMS = {"bn": "BN", "lp1": "ℓ1", "lp2": "ℓ2", "lpinf": "ℓ∞", "none": "no norm"}
LP_BUDGETS = {suite: merged(CNN_BUDGETS[suite], DLN_BUDGETS[suite]) for suite in CNN_BUDGETS}


def _lp_build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    runs = {}
    for norm in LP_NORMS:
        runs[f"cnn-{norm}"] = cnn_run(setup, b["cnn"], norm)
        runs[f"dln-{norm}"] = dln_run(setup, b["dln"], norm)
    return runs


def _lp_evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    acc = {n: final(runs[f"cnn-{n}"]) for n in LP_NORMS}
    loss = {n: final(runs[f"dln-{n}"], "test_loss") for n in LP_NORMS}
    rows = [Row(f"CNN final test accuracy, {label}", pct(acc[n]), "ℓp matches or beats BN" if n.startswith("lp")
                else "—") for n, label in LP_NORMS.items()]
    rows += [Row(f"DLN final loss, {label}", num(loss[n]), "ℓ1 beats BN" if n == "lp1" else "—")
             for n, label in LP_NORMS.items()]
    checks = [Check.of(f"CNN: {LP_NORMS[n]} matches or beats BN (≥ BN − 1 point; fails below BN − 3 points)",
                       f"{100 * (acc[n] - acc['bn']):+.1f} points", acc[n] >= acc["bn"] - POINT,
                       acc[n] < acc["bn"] - 3 * POINT) for n in ("lp1", "lp2", "lpinf")]
    rel = ratio(loss["lp1"], loss["bn"])
    checks.append(Check.of("DLN: ℓ1 ends with a lower loss than BN (fails if > 1.1x BN's)", f"ℓ1/BN = {num(rel)}",
                           rel < 1, rel > 1.1))
    return rows, checks


LP_NORM = Experiment(
    name="lp-norm",
    title="ℓp normalization instead of BN",
    paper="Santurkar et al. 2018, §3.3",
    claim=("Normalizing by the batch-average ℓ1, ℓ2 or ℓ∞ norm instead of the standard deviation matches or "
           "beats BN; on the deep linear network ℓ1 beats BN."),
    protocol=lambda b: (cnn_protocol(b["cnn"]) + " " + dln_protocol(b["dln"]) +
              " ℓp layers: normlab.nn.extra.LpBatchNorm{1d,2d}: subtract the batch mean, divide by "
              "(mean |x − μ|^p)^(1/p) (ℓ∞: max |x − μ|), affine, in place of BN."),
    criterion=("Reproduced if every ℓp CNN ends within 1 point of BN or above it and the ℓ1 DLN ends with a lower "
               "loss than the BN DLN. Not reproduced if an ℓp CNN ends > 3 points below BN or the ℓ1 DLN's loss is "
               "> 1.1x BN's. Inconclusive otherwise."),
    budgets=LP_BUDGETS,
    build=_lp_build,
    evaluate=_lp_evaluate,
    figures=(Figure("lp-norm", "ℓp normalization vs BN vs none", (
        Panel("CNN: test accuracy", "step", "test accuracy",
              curves({f"cnn-{n}": lab for n, lab in LP_NORMS.items()}, "eval", "test_acc")),
        Panel("DLN: loss", "step", "summed squared error",
              curves({f"dln-{n}": lab for n, lab in LP_NORMS.items()}, "eval", "test_loss"), ylog=True),
    )),),
)


# --------------------------------------------------------------------------------------------
# 3. Bjorck et al. 2018
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# 4. Where BN goes
# --------------------------------------------------------------------------------------------

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


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (IOFFE, SANTURKAR_LR, NOISY_BN, ICS, LANDSCAPE, LP_NORM,
                                                          BJORCK, POSITION)}
EXPERIMENTS.update({e.name: e for e in papers.EXPERIMENTS})
from normlab.lab.papers.sync_bn import EXPERIMENTS as _SYNC_BN  # noqa: E402  (one file per paper)
EXPERIMENTS.update({e.name: e for e in _SYNC_BN})
EXPERIMENTS.update({e.name: e for e in (__import__(f"normlab.lab.papers.{m}", fromlist=["EXPERIMENT"]).EXPERIMENT for m in ("precise_stats", "domain_shift", "transfer", "fold"))})  # noqa: E501
