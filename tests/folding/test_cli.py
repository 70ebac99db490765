"""``normlab fold`` as a user runs it: a state_dict with a factory, a pickled model with and without --trust."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

from normlab.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"

FACTORY = textwrap.dedent("""
    import torch.nn as nn

    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
""")


def _trained(tmp_path: Path) -> nn.Module:
    (tmp_path / "netdef.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    try:
        import netdef
        model = netdef.build()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("netdef", None)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    return model


def test_state_dict_with_factory_in_process(tmp_path, capsys):
    model = _trained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "folded.pt"
    code = main(["fold", str(tmp_path / "weights.pt"), "-o", str(out), "--input-shape", "2,3,8,8",
                 "--factory", f"{tmp_path / 'netdef.py'}:build", "--repeats", "3"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "folded 2 BatchNorm layer(s)" in text and "eval speed-up" in text and "float64" in text
    folded = torch.load(out, weights_only=False)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_pickled_model_refused_without_trust_then_folded_with_it(tmp_path):
    model = _trained(tmp_path).eval()
    torch.save(model, tmp_path / "whole.pt")
    out = tmp_path / "folded.pt"
    run = [sys.executable, "-m", "normlab.cli", "fold", str(tmp_path / "whole.pt"), "-o", str(out)]
    env = {"PYTHONPATH": f"{SRC}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(run, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--trust" in refused.stderr and "pickled code" in refused.stderr
    assert not out.exists()
    done = subprocess.run(run + ["--trust", "--input-shape", "1,3,8,8", "--repeats", "3"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "folded 2 BatchNorm layer(s)" in done.stdout and out.exists()
    assert not list(tmp_path.glob(".folded.pt.*"))  # no temporary file left behind


def test_state_dict_without_factory_and_help(tmp_path, capsys):
    torch.save(nn.BatchNorm2d(3).state_dict(), tmp_path / "sd.pt")
    assert main(["fold", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "o.pt")]) == 2
    assert "--factory" in capsys.readouterr().err
    import pytest
    with pytest.raises(SystemExit):
        main(["fold", "--help"])
    assert "--trust" in capsys.readouterr().out
