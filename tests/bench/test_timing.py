"""Checked, interleaved timing: mismatches are caught and not timed, peers that fail or disagree are named."""

from __future__ import annotations

import pytest
import torch

import normlab.nn
from normlab import bench


SMALL_BN = bench.Case("BatchNorm2d", (4,), (2, 4, 3, 3), "channels_last", "train_fwd_bwd")


def test_threads_are_restored():
    before = torch.get_num_threads()
    bench.run_cases([SMALL_BN], repeats=1, warmup=0, threads=1)
    assert torch.get_num_threads() == before


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
