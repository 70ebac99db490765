"""End-to-end timings: the small CNN's training step."""

from __future__ import annotations

import json

import pytest
import torch

import normlab.nn
from normlab.demo import small_cnn
from normlab import bench
from normlab.bench import models


def test_train_step_record():
    rec = bench.train_step(batch=8, repeats=1, warmup=0, threads=1)
    assert rec["op"] == "small_cnn" and rec["mode"] == "train_step" and rec["shape"] == [8, 1, 28, 28]
    assert rec["normlab_ms"] > 0 and rec["torch_ms"] > 0 and rec["threads"] == 1
    assert rec["ratio"] == pytest.approx(rec["torch_ms"] / rec["normlab_ms"])
    assert rec["fused_ms"] > 0 and rec["ratio_fused"] == pytest.approx(rec["torch_ms"] / rec["fused_ms"])
    line = bench.format_step(rec)
    assert "small_cnn" in line and "torch/normlab" in line and "BatchNormReLU2d" in line


def test_fused_small_cnn_is_the_same_function():
    """The CNN the end-to-end number times with BatchNormReLU2d computes what the drop-in one does."""
    torch.manual_seed(0)
    plain, fused = small_cnn(normlab.nn), small_cnn(normlab.nn, fused=True)
    assert sum(isinstance(m, normlab.nn.BatchNormReLU2d) for m in fused) == 2
    with torch.no_grad():
        for a, b in zip([*fused.parameters(), *fused.buffers()], [*plain.parameters(), *plain.buffers()]):
            a.copy_(b)
    x = torch.randn(8, 1, 28, 28)
    for model in (plain, fused):
        model(x).square().sum().backward()
    torch.testing.assert_close(fused(x), plain(x))
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    for a, b in zip(fused.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="BatchNormReLU2d"):
        small_cnn(torch.nn, fused=True)


def test_models_quick_rows_are_timed_profiled_and_checked(run_cli):
    code, out, err = run_cli("--models", "--quick", "--json", "--filter", "b4 contiguous", "--filter", "resnet18")
    assert code == 0
    records = json.loads(out)
    assert [(r["model"], r["mode"]) for r in records] == [("resnet18", "train"), ("resnet18", "eval")]
    for r in records:
        assert r["status"] == "ok" and r["max_err"] <= 1.0 and r["threads"] == 1 and r["quick"]
        assert r["fused_layers"] == 1 + 4 + 4  # stem, and bn1 and bn2 of one block per stage
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["normlab_ms"])
        assert r["ratio_fused"] == pytest.approx(r["torch_ms"] / r["fused_ms"])
        assert 0 < r["norm_share"] < 1 and 0 <= r["relu_share"] < 1
        assert r["limit"] == pytest.approx(1 / (1 - r["norm_share"]))
        assert r["limit_fused"] == pytest.approx(1 / (1 - r["norm_share"] - r["relu_share"]))


def test_models_records_render_as_the_run_printed_them(run_cli, tmp_path):
    code, out, _ = run_cli("--models", "--quick", "--json", "--filter", "small_cnn", "--filter", "eval")
    path = tmp_path / "models.json"
    path.write_text(out)
    code, rendered, err = run_cli("--render", str(path))
    assert code == 0 and err == "" and rendered.startswith("normlab bench --models")
    assert next(line for line in rendered.splitlines() if line.startswith("small_cnn"))


def test_models_table_and_list(run_cli):
    code, out, _ = run_cli("--models", "--quick", "--filter", "transformer", "--filter", "eval")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("Transformer block"))
    assert "eval" in row and row.split()[-1] == "-"  # nothing to fuse: no fused column
    assert "limit = 1 / (1 - share)" in out
    code, out, _ = run_cli("--models", "--list")
    keys = out.split("\n")
    assert code == 0 and "resnet18 b128 channels_last 2t train" in keys and "transformer b32 contiguous 1t eval" in keys
    assert not any("transformer" in k and "channels_last" in k for k in keys)
    code, _, err = run_cli("--models", "--filter", "nothing-like-this")
    assert code == 1 and "no model row matches" in err


def test_profiled_shares_count_normalization_once():
    """A trial that is nothing but BatchNorm is (almost) all normalization; ReLU is counted apart."""
    bn = torch.nn.BatchNorm2d(8)
    x = torch.randn(8, 8, 16, 16)

    class Trial:
        def reset(self):
            pass

        def step(self):
            return torch.relu(bn(x))

    norm, relu = models._shares(Trial())
    assert 0.5 < norm < 1 and 0 < relu < 0.5 and norm + relu <= 1.0 + 1e-9
