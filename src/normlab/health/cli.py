"""``normlab inspect MODEL --data DATA``: the health table of a saved model's normalization layers.

MODEL is read with ``torch.load(weights_only=True)``, which runs no code from the file: a state dict
(also under a ``"state_dict"`` key), loaded into the model that ``--factory module:function`` builds.
A whole pickled model (``torch.save(model)``) can only be read by running the code the file names;
``--trust`` allows that, for files you trust. DATA is a ``.npy`` array (read without pickle) or a ``.pt``
tensor (or a tuple/list/dict whose first tensor is the input), cut into batches along its first axis.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["configure", "run", "load_model", "load_batches"]


class InspectError(ValueError):
    """A model or data file that cannot be read as asked; the message says what to do."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "")
    parser.add_argument("model", type=Path, help="a state dict (with --factory) or, with --trust, a pickled model")
    parser.add_argument("--data", type=Path, required=True, help="inputs: a .npy array or a .pt tensor, (N, ...)")
    parser.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="builds the model the state dict is loaded into (MODULE is imported from the "
                             "current directory or sys.path)")
    parser.add_argument("--trust", action="store_true",
                        help="allow loading a pickled model, which runs code named in the file: only for files "
                             "you trust (without it, torch.load(weights_only=True) is used)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="at most this many batches (default 8)")
    parser.add_argument("--out", type=Path, default=Path("inspect-report"),
                        help="folder for health.json and health.html (default inspect-report)")
    parser.add_argument("--fail-on-issues", action="store_true", help="exit with status 1 if anything is flagged")
    parser.set_defaults(func=run)


def _factory(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise InspectError(f"--factory must be MODULE:FUNCTION, e.g. mymodels:resnet18, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise InspectError(f"--factory {spec}: {err}") from err


def load_model(path: Path, factory: str | None = None, trust: bool = False) -> nn.Module:
    """The model in ``path``: a state dict loaded into ``factory()``'s model, or (``trust``) a pickled model."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise InspectError(
            f"{path} is not a plain state dict: loading it would run code named in the file ({err}). If you trust "
            f"the file, pass --trust; otherwise save model.state_dict() and pass --factory MODULE:FUNCTION."
        ) from err
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InspectError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")
    if factory is None:
        raise InspectError(f"{path} holds a state dict: pass --factory MODULE:FUNCTION, a function that builds "
                           f"the model it belongs to")
    model = _factory(factory)()
    model.load_state_dict(obj)
    return model


def load_batches(path: Path, batch_size: int, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` batches of ``batch_size`` from a .npy or .pt file, read without running code."""
    if path.suffix == ".npy":
        data = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, torch.Tensor)), None)
        elif isinstance(data, list | tuple):
            data = next((v for v in data if isinstance(v, torch.Tensor)), None)
    if not isinstance(data, torch.Tensor) or data.dim() < 2:
        raise InspectError(f"{path}: expected an array of inputs of shape (N, ...), got {type(data).__name__}")
    if not data.is_floating_point():
        data = data.float()
    return [data[i:i + batch_size] for i in range(0, min(len(data), batch_size * limit), batch_size)]


def run(args: argparse.Namespace) -> int:
    from normlab.health.checks import inspect
    from normlab.health.render import table, write_html, write_json

    try:
        model = load_model(args.model, args.factory, args.trust)
        batches = load_batches(args.data, args.batch_size, args.batches)
    except (InspectError, FileNotFoundError, RuntimeError) as err:
        print(f"normlab inspect: {err}", file=sys.stderr)
        return 2
    report = inspect(model, batches)
    print(table(report))
    write_json(report, args.out / "health.json")
    write_html(report, args.out / "health.html", title=f"normlab inspect {args.model.name}")
    print(f"wrote {args.out / 'health.json'} and {args.out / 'health.html'}")
    return 1 if args.fail_on_issues and report.flagged else 0
