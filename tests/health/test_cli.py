"""`normlab inspect` run as a user runs it: a state dict with --factory, a pickled model only with --trust."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from .conftest import make_batches

SRC = str(Path(__file__).resolve().parents[2] / "src")
FACTORY = textwrap.dedent("""
    import torch
    import normlab.nn as nl

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nl.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))
""")


def _normlab(*args, cwd):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _setup(tmp_path):
    (tmp_path / "mymodels.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodels

        model = mymodels.build()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodels", None)
    with torch.no_grad():
        for x in make_batches(30, seed=1):
            model(x)
    np.save(tmp_path / "data.npy", torch.cat(make_batches(4, seed=2)).numpy())
    return model.eval()


def test_state_dict_with_factory(tmp_path):
    model = _setup(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    run = _normlab("inspect", "model.pt", "--data", "data.npy", "--factory", "mymodels:build", "--out", "report",
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "all normalization layers healthy" in run.stdout and "BatchNorm2d" in run.stdout
    data = json.loads((tmp_path / "report" / "health.json").read_text())
    assert data["batches"] == 2 and data["layers"][0]["flags"] == []  # 128 inputs in batches of 64
    assert "data:image/png;base64," in (tmp_path / "report" / "health.html").read_text()


def test_a_pickled_model_needs_trust_and_faults_can_fail_the_run(tmp_path):
    model = _setup(tmp_path)
    model[1].running_mean[2] = float("nan")
    torch.save(model, tmp_path / "whole.pt")
    refused = _normlab("inspect", "whole.pt", "--data", "data.npy", cwd=tmp_path)
    assert refused.returncode == 2 and "--trust" in refused.stderr and "Traceback" not in refused.stderr
    trusted = _normlab("inspect", "whole.pt", "--data", "data.npy", "--trust", "--fail-on-issues", cwd=tmp_path)
    assert trusted.returncode == 1, trusted.stderr
    assert "nonfinite_stats" in trusted.stdout


def test_help_says_how_models_are_loaded(tmp_path):
    out = _normlab("inspect", "--help", cwd=tmp_path).stdout
    assert "weights_only=True" in out and "--trust" in out and "--factory" in out
    missing = _normlab("inspect", "model.pt", "--data", "data.npy", cwd=tmp_path)
    assert missing.returncode == 2 and "No such file" in missing.stderr
