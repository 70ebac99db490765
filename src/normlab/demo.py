"""``normlab demo``: train a small CNN built from normlab layers on Fashion-MNIST, next to the same
CNN built from torch.nn layers, and show that both train identically."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from tqdm import tqdm

import normlab.nn as nl


def small_cnn(norm=nl, num_classes: int = 10, fused: bool = False) -> torch.nn.Sequential:
    """conv-BN-ReLU ×2 with pooling, then a BN'd linear head; ``norm`` is ``normlab.nn`` or ``torch.nn``.

    ``fused=True`` (``normlab.nn`` only) puts :class:`normlab.nn.BatchNormReLU2d` where BatchNorm2d and
    ReLU follow each other: the same function with the same parameters, in the same order (so
    ``parameters()`` and ``buffers()`` of the two variants correspond one to one).
    """
    if fused and not hasattr(norm, "BatchNormReLU2d"):
        raise ValueError(f"fused=True needs normlab.nn (BatchNormReLU2d); {norm.__name__} has no fused layer")

    def bn_relu(channels: int) -> list[torch.nn.Module]:
        if fused:
            return [norm.BatchNormReLU2d(channels)]
        return [norm.BatchNorm2d(channels), torch.nn.ReLU()]

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), *bn_relu(16),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), *bn_relu(32),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 7 * 7, 64, bias=False), norm.BatchNorm1d(64), torch.nn.ReLU(),
        torch.nn.Linear(64, num_classes),
    )


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000)))
    model.train()
    return correct / len(y)


def run(args: argparse.Namespace) -> int:
    from normlab.lab.data import DataError, load_fashion

    try:
        data = load_fashion(Path(args.data_dir) if args.data_dir else None)
    except DataError as exc:
        print(f"normlab demo: {exc}")
        return 2
    torch.manual_seed(args.seed)
    ours = small_cnn(nl)
    theirs = copy.deepcopy(ours)
    theirs = nl.convert(theirs, to="torch")
    opts = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(args.seed)
    n = data.train_x.shape[0]
    print(f"Fashion-MNIST: {n} training and {data.test_x.shape[0]} test images; "
          f"{args.steps} SGD steps of batch {args.batch_size}, lr {args.lr}")
    dtype = torch.float64 if args.float64 else torch.float32
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    elapsed = {"normlab": 0.0, "torch.nn": 0.0}
    losses = {}
    drift = []
    for _ in tqdm(range(args.steps), desc="training", unit="step"):
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        xb, yb = data.train_x[idx].to(dtype), data.train_y[idx]
        for name, model, opt in (("normlab", ours, opts[0]), ("torch.nn", theirs, opts[1])):
            start = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            elapsed[name] += time.perf_counter() - start
            losses[name] = loss.item()
        drift.append(max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())))
    test_x = data.test_x.to(dtype)
    acc = {name: _accuracy(m, test_x, data.test_y) for name, m in (("normlab", ours), ("torch.nn", theirs))}
    print(f"{'layers':<10}{'final loss':>12}{'test accuracy':>16}{'train time':>12}")
    for name in ("normlab", "torch.nn"):
        print(f"{name:<10}{losses[name]:>12.4f}{acc[name]:>16.2%}{elapsed[name]:>11.1f}s")
    print(f"largest parameter difference between the two models: {drift[0]:.1e} after the first step, "
          f"{drift[-1]:.1e} after the last.")
    if not args.float64:
        print("In float32 the two differ by rounding in the last bits at first; SGD amplifies such "
              "differences over many steps, as it would between any two float32 kernels. Run with "
              "--float64 to see the two train identically (differences near 1e-14).")

    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with the Fashion-MNIST idx files "
                        "(default: /usr/share/datasets/fashion-mnist from apt's dataset-fashion-mnist)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="train both models in float64")
    parser.set_defaults(func=run)
