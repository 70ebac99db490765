"""``normlab bench --variants``: the variants checked against their torch.nn compositions, timed beside plain
BatchNorm, and a wrong variant caught."""

from __future__ import annotations

import argparse
import json

import torch

from normlab import bench
from normlab.bench import variants as bench_variants


def test_quick_variants_agree_with_their_torch_compositions_and_are_timed_against_batchnorm(capsys):
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--variants", "--quick", "--json", "--threads", "1", "--filter", "train_fwd_bwd"])
    assert args.func(args) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["op"] for r in records} == {"GhostBatchNorm1d", "GhostBatchNorm2d", "BatchRenorm1d", "BatchRenorm2d",
                                          "MaskedBatchNorm1d"}
    for r in records:
        assert r["status"] == "ok" and r["max_err"] <= 1.0, r
        assert r["normlab_ms"] > 0 and r["bn_ms"] > 0
        assert r["ratio_bn"] == r["bn_ms"] / r["normlab_ms"]
    text = bench_variants.summary(records)
    assert len(text.splitlines()) == len(records) + 1 and f"goal <= {bench_variants.GOAL}x" in text


def test_the_reference_catches_a_wrong_variant():
    """A renorm that forgot d (BatchNorm scaled by r only) is a MISMATCH, not timed."""

    class NoShift(torch.nn.BatchNorm2d):
        def __init__(self, c, **kwargs):
            super().__init__(c)

    wrong = bench.Implementation("normlab", type("ns", (), {"BatchRenorm2d": NoShift}))
    case = next(c for c in bench_variants.quick_cases() if c.layer == "BatchRenorm2d")
    (record,) = bench.run_cases([case], repeats=1, warmup=0,
                                implementations=(wrong, *bench_variants.IMPLEMENTATIONS[1:]))
    assert record["status"] == "MISMATCH" and record["normlab_ms"] is None


def test_bench_mask_keeps_about_three_quarters():
    mask = bench_variants.bench_mask((64, 196, 768))
    assert mask.shape == (64, 196) and 0.6 < mask.float().mean().item() < 0.9 and mask[:, 0].all()
