"""``normlab fold MODEL -o OUT``: fold the BN layers of a saved model for inference."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from normlab._io import write_atomic

HELP = """Fold every BatchNorm layer of a saved model into its convolutions (see normlab.fold) and write
the folded eval-mode model. MODEL is either a state_dict (loaded with torch.load(weights_only=True),
which runs no code; pass --factory to build the model it belongs to) or a whole pickled model.
Unpickling a whole model runs code from the file: it is refused unless you pass --trust, which you
should do only for files you made or trust. OUT is written as a pickled module; load it with
torch.load(OUT, weights_only=False)."""


class CliError(Exception):
    """A problem with the user's files or arguments: printed as ``error: ...``, exit status 2."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape takes integers such as 1,3,32,32, got {text!r}")
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape takes positive integers such as 1,3,32,32, got {text!r}")
    return shape


def _factory(spec: str):
    """``module:function`` or ``path/to/file.py:function`` -> the function."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise CliError(f"--factory takes module:function or path/to/file.py:function, got {spec!r}")
    if where.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
        if loaded is None or not Path(where).is_file():
            raise CliError(f"--factory: no file {where}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise CliError(f"--factory: cannot import {where!r}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CliError(f"--factory: {where} has no function {name!r}")
    return fn


def load_model(path: Path, factory: str | None, trust: bool):
    """The model in ``path``: a state_dict loaded into ``factory()``, or (with ``trust``) a pickled module."""
    import pickle

    import torch
    from torch import nn

    if not path.is_file():
        raise CliError(f"no file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise CliError(
                f"{path} holds pickled code (e.g. a whole model saved with torch.save(model)), which "
                f"torch.load(weights_only=True) refuses to run. If you trust the file, pass --trust; "
                f"otherwise save model.state_dict() and pass --factory module:function.") from exc
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict):
        raise CliError(f"{path} holds a {type(obj).__name__}, neither a model nor a state_dict")
    if factory is None:
        raise CliError(f"{path} holds a state_dict; pass --factory module:function that builds its model")
    model = _factory(factory)()
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CliError(f"the state_dict in {path} does not fit the model from {factory}: {exc}") from exc
    return model


def save_atomic(model, path: Path) -> None:
    """``torch.save(model, path)`` so that ``path`` holds either its old content or the whole new file."""
    import torch

    write_atomic(path, lambda fh: torch.save(model, fh))


def cmd_fold(args: argparse.Namespace) -> int:
    import torch

    from normlab.folding import fold
    from normlab.folding.timing import eval_speedup

    try:
        model = load_model(args.model, args.factory, args.trust)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    count = sum(p.numel() for p in model.parameters())
    print(f"loaded {args.model}: {type(model).__name__}, {count} parameters (put in eval mode)")
    inputs = None
    if args.input_shape is not None:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        inputs = (torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)).to(dtype),)
    try:
        folded, report = fold(model, None if inputs is None else inputs)
    except Exception as exc:
        print(f"error: folding failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report)
    save_atomic(folded, args.output)
    print(f"wrote {args.output} (a pickled module: torch.load({str(args.output)!r}, weights_only=False))")
    if inputs is None:
        print("pass --input-shape (e.g. 1,3,224,224) to check the output difference and time the speed-up")
    else:
        print(f"eval speed-up on input {tuple(args.input_shape)}: {eval_speedup(model, folded, inputs, args.repeats)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``normlab fold``; sets ``func``."""
    parser.description = HELP
    parser.add_argument("model", type=Path, metavar="MODEL", help="a state_dict file (with --factory) or, "
                        "with --trust only, a whole pickled model")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="where to write the folded model")
    parser.add_argument("--input-shape", type=_shape, default=None, metavar="SHAPE",
                        help="shape of an example input, e.g. 1,3,32,32: check outputs and time the speed-up")
    parser.add_argument("--factory", default=None, metavar="MODULE:FUNCTION",
                        help="function (module:function or file.py:function) that builds the model of a state_dict")
    parser.add_argument("--trust", action="store_true",
                        help="allow MODEL to be a whole pickled model: unpickling runs code from the file, so "
                             "pass this only for files you trust")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing samples (default 15)")
    parser.set_defaults(func=cmd_fold)
