"""The benchmark's cases: the default suite, validation, fused layers timed against their composition."""

from __future__ import annotations

import pytest
import torch

import normlab.nn
from normlab import bench

SMALL_BN = bench.Case("BatchNorm2d", (4,), (2, 4, 3, 3), "channels_last", "train_fwd_bwd")


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


def test_case_validation():
    with pytest.raises(ValueError, match="channels_last"):
        bench.Case("BatchNorm1d", (8,), (4, 8), "channels_last")
    with pytest.raises(ValueError, match="mode"):
        bench.Case("BatchNorm1d", (8,), (4, 8), mode="backward")
    with pytest.raises(ValueError, match="peer"):
        bench.run_cases([SMALL_BN], implementations=bench.IMPLEMENTATIONS[:1])


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
