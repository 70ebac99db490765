"""``normlab bench``: the command's options, its JSON and table output, and its mismatch detection."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normlab.nn
from normlab.demo import small_cnn
from normlab import bench

SMALL_BN = bench.Case("BatchNorm2d", (4,), (2, 4, 3, 3), "channels_last", "train_fwd_bwd")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="normlab bench")
    bench.configure(parser)
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def quick_json() -> list[dict]:
    """The records of ``--quick --json``, parsed from stdout (run once for the module)."""
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--quick", "--json", "--threads", "1"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    return json.loads(buf.getvalue())


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


def test_threads_are_restored():
    before = torch.get_num_threads()
    bench.run_cases([SMALL_BN], repeats=1, warmup=0, threads=1)
    assert torch.get_num_threads() == before


def test_filter_selects_cases(capsys):
    code, out, _ = run_cli(capsys, "--quick", "--json", "--filter", "groupnorm", "--filter", "channels_last")
    records = json.loads(out)
    assert code == 0 and len(records) == 1
    assert records[0]["op"] == "GroupNorm" and records[0]["layout"] == "channels_last"


def test_filter_matching_nothing_fails(capsys):
    code, out, err = run_cli(capsys, "--quick", "--filter", "no-such-case")
    assert code == 1 and out == "" and "no case matches" in err


def test_default_suite_matches_the_issue():
    cases = bench.default_cases()
    bn = {(c.shape, c.layout, c.mode) for c in cases if c.layer.startswith("BatchNorm")}
    for shape in [(64, 64, 56, 56), (256, 256, 14, 14), (32, 512, 7, 7)]:
        for layout in ("contiguous", "channels_last"):
            assert {(shape, layout, m) for m in bench.MODES} <= bn
    assert {((4096, 1024), "contiguous", m) for m in bench.MODES} <= bn
    assert any(c.layer == "GroupNorm" and c.layout == "channels_last" for c in cases)
    assert any(c.layer == "LayerNorm" for c in cases)
    assert len({c.key for c in cases}) == len(cases)


def test_a_peer_that_disagrees_is_named_and_left_out_while_the_case_is_timed():
    wrong_peer = bench.Implementation("compile", torch.nn, wrap=lambda m: (lambda x: m(x) + 0.01))
    case = bench.Case("LayerNorm", (32,), (8, 32), mode="eval")
    (rec,) = bench.run_cases([case], repeats=1, warmup=0, implementations=[*bench.IMPLEMENTATIONS, wrong_peer])
    assert rec["status"] == "ok" and rec["max_err"] <= 1.0
    assert rec["normlab_ms"] > 0 and rec["torch_ms"] > 0 and rec["ratio"] > 0
    assert rec["compile_ms"] is None and rec["ratio_compile"] is None
    assert "answers differ from torch's on LayerNorm(32) 8x32 contiguous eval fwd (output off by" in rec["compile_error"]
    table = bench.format_table([rec], [*bench.IMPLEMENTATIONS, wrong_peer])
    assert "compile failed: answers differ" in table and "MISMATCH" not in table.split("\n", 4)[-1]


def test_a_fused_layer_torch_lacks_is_timed_against_its_composition():
    case = bench.Case("BatchNormReLU2d", (4,), (3, 4, 5, 5), mode="train_fwd_bwd")
    theirs, ours = case.make(torch.nn), case.make(normlab.nn)
    assert isinstance(theirs, torch.nn.BatchNorm2d) and type(ours) is normlab.nn.BatchNormReLU2d
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(theirs(x), torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True)))
    rec = bench.run_cases([case], repeats=1, warmup=0)[0]
    assert rec["status"] == "ok" and rec["op"] == "BatchNormReLU2d" and rec["max_err"] <= 1.0
    with pytest.raises(AttributeError, match="no layer 'NoSuchNorm'"):
        bench.Case("NoSuchNorm", (4,), (3, 4)).make(torch.nn)


def test_table_has_header_and_rows(capsys):
    code, out, _ = run_cli(capsys, "--quick", "--filter", "BatchNorm1d")
    assert code == 0
    assert f"torch {torch.__version__}" in out and "threads" in out
    assert "torch/normlab = torch ms / normlab ms" in out and "> 1 means normlab is faster" in out
    rows = [line for line in out.splitlines() if line.startswith("BatchNorm1d(32)")]
    assert len(rows) == len(bench.MODES)
    assert all(line.rstrip().endswith("x") for line in rows)
    header = next(line for line in out.splitlines() if line.startswith("module"))
    assert "normlab ms" in header and "torch ms" in header


WRONG_OUTPUT = bench.Implementation("normlab", normlab.nn, wrap=lambda m: (lambda x: m(x) + 0.01))
WRONG_GRADIENT = bench.Implementation(
    "normlab", normlab.nn, wrap=lambda m: (lambda x: m(x) + 0.5 * (x - x.detach()))
)
TORCH = bench.IMPLEMENTATIONS[1]


@pytest.mark.parametrize(
    "impl, case, tensor",
    [
        (WRONG_OUTPUT, bench.Case("LayerNorm", (32,), (8, 32), mode="eval"), "output"),
        (WRONG_GRADIENT, SMALL_BN, "grad_input"),
    ],
)
def test_mismatch_is_detected_and_not_timed(impl, case, tensor):
    (rec,) = bench.run_cases([case], repeats=1, warmup=0, implementations=[impl, TORCH])
    assert rec["status"] == "MISMATCH" and rec["mismatch"] == ["normlab"] and rec["mismatch_in"] == tensor
    assert rec["max_err"] > 1.0
    assert rec["normlab_ms"] is None and rec["torch_ms"] is None and rec["ratio"] is None
    table = bench.format_table([rec])
    assert "MISMATCH" in table and "x tol" in table


def test_extra_peer_gets_its_own_columns():
    peer = bench.Implementation("eager", torch.nn)
    (rec,) = bench.run_cases([SMALL_BN], repeats=1, warmup=0, implementations=[*bench.IMPLEMENTATIONS, peer])
    assert rec["status"] == "ok" and rec["eager_ms"] > 0 and rec["ratio_eager"] > 0 and rec["ratio"] > 0
    table = bench.format_table([rec], [*bench.IMPLEMENTATIONS, peer])
    assert "eager ms" in table and "eager/normlab" in table


def test_case_validation():
    with pytest.raises(ValueError, match="channels_last"):
        bench.Case("BatchNorm1d", (8,), (4, 8), "channels_last")
    with pytest.raises(ValueError, match="mode"):
        bench.Case("BatchNorm1d", (8,), (4, 8), mode="backward")
    with pytest.raises(ValueError, match="peer"):
        bench.run_cases([SMALL_BN], implementations=bench.IMPLEMENTATIONS[:1])


def test_bandwidth_columns():
    (rec,) = bench.run_cases([SMALL_BN], repeats=1, warmup=0)
    size = 4 * 2 * 4 * 3 * 3  # float32 bytes of the input
    assert rec["bytes"] == bench.moved_bytes(SMALL_BN) == 5 * size  # fwd: x, y; bwd: x, dy, dx
    assert rec["copy_ms"] > 0 and rec["copy_gbps"] == pytest.approx(2 * size / rec["copy_ms"] / 1e6)
    for name in ("normlab", "torch"):
        assert rec[f"{name}_gbps"] == pytest.approx(rec["bytes"] / rec[f"{name}_ms"] / 1e6)
        assert rec[f"{name}_pct_copy"] == pytest.approx(100 * rec[f"{name}_gbps"] / rec["copy_gbps"])
    table = bench.format_table([rec])
    for column in ("normlab GB/s", "copy GB/s", "normlab %copy", "torch %copy"):
        assert column in table


def test_a_peer_that_fails_is_reported_not_fatal():
    def no_compiler(module):
        raise RuntimeError("no C++ compiler found\nlong details")

    broken = bench.Implementation("compile", torch.nn, wrap=no_compiler)
    impls = [*bench.IMPLEMENTATIONS, broken]
    (rec,) = bench.run_cases([SMALL_BN], repeats=1, warmup=0, implementations=impls)
    assert rec["status"] == "ok" and rec["normlab_ms"] > 0 and rec["ratio"] > 0
    assert rec["compile_ms"] is None and rec["ratio_compile"] is None
    assert rec["compile_error"] == "RuntimeError: no C++ compiler found"
    table = bench.format_table([rec], impls)
    assert "failed" in table and "compile failed: RuntimeError: no C++ compiler found" in table


@pytest.mark.slow
def test_compile_peer_is_timed_or_says_why():
    case = bench.Case("BatchNorm2d", (4,), (2, 4, 3, 3), mode="eval")
    (rec,) = bench.run_cases([case], repeats=1, warmup=0, implementations=[*bench.IMPLEMENTATIONS, bench.COMPILE])
    assert rec["status"] == "ok"
    assert (rec["compile_ms"] or 0) > 0 or rec["compile_error"]


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_says_so(capsys):
    code, out, err = run_cli(capsys, "--quick", "--device", "cuda")
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


def test_render_prints_saved_records_as_the_run_did(capsys, tmp_path, quick_json):
    """``--render`` turns what ``--json`` saved (here with a CNN step record and as if measured on another
    machine) into the table and the end-to-end line, naming the machine and the torch that measured them."""
    step = bench.train_step(batch=8, repeats=1, warmup=0, threads=1)
    records = [dict(r, torch="9.9.9+elsewhere", device_name="Some GPU") for r in quick_json + [step]]
    assert {"torch", "device_name"} <= quick_json[0].keys() and quick_json[0]["torch"] == torch.__version__
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    code, out, err = run_cli(capsys, "--render", str(path))
    assert code == 0 and err == ""
    assert "cpu (Some GPU), torch 9.9.9+elsewhere, 1 threads" in out.splitlines()[0]
    rows = [line for line in out.splitlines() if line.rstrip().endswith("x") and not line.startswith("End to end")]
    assert len(rows) == len(quick_json)
    assert out.rstrip().splitlines()[-1] == bench.format_step(records[-1])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No such file"),
        ("not json", "not JSON"),
        ("{}", "expected the non-empty list of records"),
        ('[{"op": "BatchNorm2d"}]', "lacks a field"),
    ],
)
def test_render_refuses_what_is_not_saved_records(capsys, tmp_path, content, message):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli(capsys, "--render", str(path))
    assert code == 2 and out == "" and message in err and str(path) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu.sh"
    out = subprocess.run(["bash", str(script), str(tmp_path / "results")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert not (tmp_path / "results").exists()
