"""``normlab bench``: the command's options, its JSON output and its exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normlab import bench


def test_quick_json_records(quick_json):
    assert len(quick_json) == len(bench.quick_cases())
    for rec in quick_json:
        assert {"op", "shape", "layout", "mode", "normlab_ms", "torch_ms", "ratio", "repeats", "threads"} <= rec.keys()
        assert rec["status"] == "ok" and rec["max_err"] <= 1.0
        assert rec["normlab_ms"] > 0 and rec["torch_ms"] > 0 and rec["ratio"] > 0
        assert rec["ratio"] == pytest.approx(rec["torch_ms"] / rec["normlab_ms"])
        assert rec["repeats"] == 1 and rec["threads"] == 1
        assert rec["mode"] in bench.MODES


def test_quick_covers_every_op_layout_and_mode(quick_json):
    assert {r["op"] for r in quick_json} == {"BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm", "BatchNormReLU2d"}
    assert {r["layout"] for r in quick_json} == {"contiguous", "channels_last"}
    assert {r["mode"] for r in quick_json} == set(bench.MODES)
    assert all(len(r["shape"]) == 4 for r in quick_json if r["layout"] == "channels_last")


def test_filter_selects_cases(run_cli):
    code, out, _ = run_cli("--quick", "--json", "--filter", "groupnorm", "--filter", "channels_last")
    records = json.loads(out)
    assert code == 0 and len(records) == 1
    assert records[0]["op"] == "GroupNorm" and records[0]["layout"] == "channels_last"


def test_filter_matching_nothing_fails(run_cli):
    code, out, err = run_cli("--quick", "--filter", "no-such-case")
    assert code == 1 and out == "" and "no case matches" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_says_so(run_cli):
    code, out, err = run_cli("--quick", "--device", "cuda")
    assert code == 2 and out == "" and "CUDA" in err and "--device cpu" in err


@pytest.mark.parametrize(
    "argv, compiled, cnn",
    [
        ([], True, True),
        (["--quick"], False, False),
        (["--filter", "LayerNorm"], True, False),
        (["--no-compile", "--no-cnn"], False, False),
        (["--quick", "--compile", "--cnn"], True, True),
    ],
)
def test_compile_peer_and_cnn_step_defaults(argv, compiled, cnn):
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    implementations, with_cnn = bench.peers(parser.parse_args(argv))
    assert (bench.COMPILE in implementations) == compiled and with_cnn == cnn
    assert implementations[:2] == bench.IMPLEMENTATIONS


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu.sh"
    out = subprocess.run(["bash", str(script), str(tmp_path / "results")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert not (tmp_path / "results").exists()
