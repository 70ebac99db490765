"""What the lab's experiments share: the VGG-style CNN and the deep linear network of Santurkar et al.
(budgets per suite, run configs, protocol text), the activation and gradient probes they record, and
accuracy helpers. (Independent of :mod:`normlab.lab.experiments`, which imports the experiments of this
package.)"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.lab import measure
from normlab.lab.spec import Check, Panel, Row, Runs, Setup, curves, final, pct, run_config, series

POINT = 0.01
"""One percentage point of accuracy: the smallest accuracy difference the lab's checks call an effect (their
margin is raised to the measured seed-to-seed noise floor when that is larger)."""

CI_RULE = ("Each check passes when its 95% CI over the paired seeds (one seed: the point) lies wholly on the paper's "
           "side of its margin, raised to the measured noise floor where one applies, fails when it lies wholly on "
           "the other side and is unclear otherwise; reproduced if all pass, not reproduced if any fails, "
           "inconclusive otherwise.")
"""The decision rule, as the criteria of the experiments state it."""

CNN_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"n_train": 256, "n_test": 128, "size": 16, "widths": [4, 4, 8, 8, 8, 8],
              "pool_after": [1, 3, 5], "batch": 32, "steps": 6, "eval_every": 3, "probe_every": 3},
    "quick": {"n_train": 10000, "n_test": None, "size": 16, "widths": [8, 16, 32, 32, 64, 64],
              "pool_after": [1, 3, 5], "batch": 128, "steps": 250, "eval_every": 50, "probe_every": 25},
    "full": {"n_train": None, "n_test": None, "size": None, "widths": [32, 64, 128, 128, 256, 256],
             "pool_after": [1, 3, 5], "batch": 128, "steps": 15000, "eval_every": 500, "probe_every": 250},
}
DLN_BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"n": 64, "dim": 10, "depth": 6, "steps": 6, "eval_every": 1, "probe_every": 3},
    "quick": {"n": 1000, "dim": 10, "depth": 25, "steps": 300, "eval_every": 1, "probe_every": 50},
    "full": {"n": 1000, "dim": 10, "depth": 25, "steps": 10000, "eval_every": 1, "probe_every": 250},
}
"""The DLN is evaluated at every step (a cheap full-batch forward): the fraction of steps on which the loss
rises tells how close its learning rate is to the edge of stability."""
CNN_LR = 0.1
DLN_LR = 1e-6
"""The learning rate Santurkar et al. state for the DLN (summed loss); it sits at the edge of stability here."""
DLN_SLOW_LR = 1e-7
"""Their Fig. 3(b)'s other learning rate: there the largest landscape probe step (30·lr) lies just below
where the DLN without BN diverges (~3e-6), as the paper chose it."""
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
    "with x and A Gaussian, {n} samples as one full batch, summed squared error, plain SGD at lr 1e-6 "
    "(and 1e-7 where stated), {steps} steps, the loss evaluated at every step."
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


def dln_run(setup: Setup, b: dict[str, Any], norm: str, lr: float = DLN_LR, probes: bool = True) -> dict[str, Any]:
    """A deep-linear-network run, with the gradient probes (ICS and landscape) unless ``probes`` is false
    (the probes leave the trajectory unchanged, so a run without them is paired with one with them)."""
    data = {"name": "gaussian", "n": b["n"], "dim": b["dim"]}
    model = {"arch": "dln", "depth": b["depth"], "norm": norm}
    return run_config(setup, data, model, lr=lr, steps=b["steps"], batch=b["n"],
                      eval_every=b["eval_every"], probes=gradient_probes(b, DLN_LANDSCAPE) if probes else [])


def merged(cnn: dict[str, Any], dln: dict[str, Any]) -> dict[str, Any]:
    return {"cnn": cnn, "dln": dln}


def shift(run: dict[str, Any], site: str, blocks: tuple[int, ...] = ACTIVATION_BLOCKS) -> float:
    """Mean over the probed blocks of :func:`measure.distribution_shift` of the probed unit at ``site``."""
    if run["diverged_at"] is not None:
        return math.nan
    return float(np.mean([measure.distribution_shift(series(run, "activations", f"b{k}_{site}_mean"),
                                                     series(run, "activations", f"b{k}_{site}_std"))
                          for k in blocks]))


def accuracy_check(text: str, a: float, b: float, claim: str = ">", margin: float = POINT, paper: str = "—") -> Check:
    """Accuracy ``a`` against ``b`` of the same seed, in percentage points (see :meth:`Check.compare`)."""
    return Check.compare(text, a, b, claim, margin, unit="points", paper=paper)


def accuracy_rows(runs: Runs, labels: dict[str, str], paper: dict[str, str], key: str = "test_acc",
                  what: str = "final test accuracy") -> list[Row]:
    values = {k: final(runs[k], key) for k in labels}
    return [Row(f"{what}, {label}", pct(values[k]), paper.get(k, "—"), values[k], "pct")
            for k, label in labels.items()]


def accuracy_panels(labels: dict[str, str], title: str) -> tuple[Panel, ...]:
    return (
        Panel(f"{title}: test accuracy", "step", "test accuracy", curves(labels, "eval", "test_acc")),
        Panel(f"{title}: training loss", "step", "mean training loss since last evaluation",
              curves(labels, "eval", "train_loss"), ylog=True),
    )


#: the lab's VGG-style CNN on 16x16 Fashion-MNIST, as in the other CNN experiments
CNN: dict[str, dict[str, Any]] = {
    "smoke": {"n_train": 256, "n_test": 128, "size": 16, "widths": [4, 4, 8, 8, 8, 8], "pool_after": [1, 3, 5],
              "batch": 32},
    "quick": {"n_train": 10000, "n_test": 2000, "size": 16, "widths": [8, 16, 32, 32, 64, 64],
              "pool_after": [1, 3, 5], "batch": 128},
    "full": {"n_train": None, "n_test": None, "size": None, "widths": [32, 64, 128, 128, 256, 256],
             "pool_after": [1, 3, 5], "batch": 128},
}


def cnn_model(b: dict[str, Any]) -> dict[str, Any]:
    return {"arch": "vgg", "widths": b["widths"], "pool_after": b["pool_after"], "norm": "bn"}


def test_data(setup, b: dict[str, Any]) -> dict[str, Any]:
    """The run's data, its probe set being the whole test split."""
    return {"name": setup.images, "n_train": b["n_train"], "n_test": b["n_test"], "size": b["size"],
            "n_probe": b["n_test"] or 10000}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool = False, batch: int = 1000) -> float:
    """Accuracy on ``(x, y)`` in batches of ``batch``, in training (batch statistics) or eval mode; the mode
    is restored (running statistics are not: wrap in :func:`normlab.lab.measure.preserved` for that)."""
    was = model.training
    model.train(train)
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return correct / len(y)
