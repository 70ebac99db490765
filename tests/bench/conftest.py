"""Shared fixtures of the ``normlab bench`` tests: running the command in-process, and its quick JSON."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from normlab import bench


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv)``: run ``normlab bench`` in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="normlab bench")
        bench.configure(parser)
        args = parser.parse_args(list(argv))
        code = args.func(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="package")
def quick_json() -> list[dict]:
    """The records of ``--quick --json``, parsed from stdout (run once for the package)."""
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--quick", "--json", "--threads", "1"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    return json.loads(buf.getvalue())
