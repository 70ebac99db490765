"""The lab's normalizations for small batches (normlab.lab.norms) and the non-i.i.d. batches (lab.data)."""

import pytest
import torch

import normlab.functional as F
import normlab.nn as nnl
from normlab.lab import data as labdata
from normlab.lab.norms import VirtualRenorm, parse, small_batch_norm


def test_parse_and_kinds():
    assert parse("renorm:v=4,warmup=10") == ("renorm", {"v": 4, "warmup": 10})
    assert parse("gn") == ("gn", {})
    assert isinstance(small_batch_norm("ghost:v=8", 16, True), nnl.GhostBatchNorm2d)
    gn = small_batch_norm("gn", 16, True)
    assert isinstance(gn, nnl.GroupNorm) and gn.num_groups == 4
    assert small_batch_norm("ln", 16, True).num_groups == 1 and small_batch_norm("in", 16, True).num_groups == 16
    with pytest.raises(ValueError):
        small_batch_norm("in", 16, False)


def test_virtual_renorm_is_renorm_per_virtual_batch_with_one_update_per_step():
    """Each virtual batch renormalized with r, d from the running statistics as the step found them (F.batch_renorm
    on each chunk with its own copy of them), the running statistics updated once with the whole batch's."""
    torch.manual_seed(0)
    layer = VirtualRenorm(3, 4, spatial=True, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    with torch.no_grad():
        layer.bn.running_var.fill_(0.3)
        layer.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
    rm, rv = layer.bn.running_mean.clone(), layer.bn.running_var.clone()
    x = torch.randn(12, 3, 2, 2) * 2 + 1
    x.requires_grad_(True)
    y = layer(x)
    chunks = [c.detach().requires_grad_(True) for c in x.split(4)]
    expected = torch.cat([F.batch_renorm(c, rm.clone(), rv.clone(), layer.weight.detach(), layer.bias.detach(), True,
                                         0.1, 1e-5, 1.5, 0.5) for c in chunks])
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, torch.cat([c.grad for c in chunks]))
    full = nnl.BatchNorm2d(3)
    full.running_var.fill_(0.3)
    full(x.detach())
    torch.testing.assert_close(layer.bn.running_var, full.running_var)
    assert layer.bn.num_batches_tracked.item() == 1


def test_class_batches_hold_few_classes_per_group():
    labels = torch.arange(100) % 10
    batches = labdata.class_batches(labels, 64, 32, 4, torch.Generator().manual_seed(0))
    for _ in range(5):
        idx = next(batches)
        assert idx.shape == (64,)
        for group in idx.split(32):
            classes = labels[group]
            assert len(set(classes.tolist())) == 4 and (classes.bincount(minlength=10).max() == 8)
    with pytest.raises(ValueError):
        next(labdata.class_batches(labels, 64, 30, 4, torch.Generator()))
