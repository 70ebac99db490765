"""The command line as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

from normlab.cli import build_parser, main

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("bench", "demo", "lab"):
        assert command in out


def test_demo_trains_normlab_and_torch_identically_in_float64(capsys):
    if not FASHION.is_dir():
        pytest.fail("Fashion-MNIST is missing: run `bash scripts/setup.sh` (installs dataset-fashion-mnist)")
    assert main(["demo", "--steps", "2", "--batch-size", "16", "--float64"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "normlab" in out and "torch.nn" in out
    first, last = (float(v) for v in out.split("models: ")[1].replace(" after the first step, ", " ")
                   .split(" after the last")[0].split())
    assert first < 1e-10 and last < 1e-10


def test_demo_names_the_package_when_data_is_missing(tmp_path, capsys, monkeypatch):
    import normlab.lab.data

    monkeypatch.setattr(normlab.lab.data, "DEFAULT_FASHION_DIR", tmp_path / "absent")
    assert main(["demo", "--data-dir", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "normlab.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "lab" in result.stdout
    assert build_parser().prog == "normlab"


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capsys):
    """``normlab bench --list | head -1``: the pipe closes early; no BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr("sys.stdout", stdout)
    try:
        assert main(["bench", "--list"]) == 141
    finally:
        stdout.close()
    assert "Traceback" not in capsys.readouterr().err
