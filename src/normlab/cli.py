"""The ``normlab`` command line: ``normlab bench``, ``normlab demo``, ``normlab lab`` ``normlab inspect`` and ``normlab fold``."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Batch normalization and its family for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from normlab import bench, demo
    from normlab.folding import cli as fold_cli
    from normlab.lab import cli as lab_cli

    bench.configure(sub.add_parser("bench", help="normlab vs torch.nn, side by side"))
    demo.configure(sub.add_parser("demo", help="train a small CNN with normlab layers on real data"))
    lab_cli.configure(sub.add_parser("lab", help="reproduce the batch-norm papers' experiments"))
    from normlab.health import cli as health_cli

    health_cli.configure(sub.add_parser("inspect", help="health table of a saved model's normalization layers"))
    fold_cli.configure(sub.add_parser("fold", help="fold a saved model's BatchNorm layers into its convolutions"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``normlab bench --list | head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
