"""What the experiments on trained BN models share: the lab CNN's data and widths per suite, its
protocol text and an accuracy helper. (Independent of :mod:`normlab.lab.experiments`, which imports
the experiments of this package.)"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the lab's VGG-style CNN on 16x16 Fashion-MNIST, as in the other CNN experiments
CNN: dict[str, dict[str, Any]] = {
    "smoke": {"n_train": 256, "n_test": 128, "size": 16, "widths": [4, 4, 8, 8, 8, 8], "pool_after": [1, 3, 5],
              "batch": 32},
    "quick": {"n_train": 10000, "n_test": 2000, "size": 16, "widths": [8, 16, 32, 32, 64, 64],
              "pool_after": [1, 3, 5], "batch": 128},
    "full": {"n_train": None, "n_test": None, "size": None, "widths": [32, 64, 128, 128, 256, 256],
             "pool_after": [1, 3, 5], "batch": 128},
}


def cnn_protocol(b: dict[str, Any]) -> str:
    from normlab.lab.experiments import cnn_protocol as protocol

    return protocol(b)


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
