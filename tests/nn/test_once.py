"""Exactly-once running-statistics updates: checkpointed training gives the plain run's statistics exactly,
and update_once limits a layer run several times in one step to its first call's update."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import normlab
import normlab.nn as nl

pytestmark = pytest.mark.usefixtures("backend")


def _blocks(norm):
    torch.manual_seed(0)
    make = {
        "BatchNorm2d": lambda c: nl.BatchNorm2d(c),
        "BatchNorm2d momentum=None": lambda c: nl.BatchNorm2d(c, momentum=None),
        "BatchNormReLU2d": lambda c: nl.BatchNormReLU2d(c),
        "InstanceNorm2d": lambda c: nl.InstanceNorm2d(c, affine=True, track_running_stats=True),
        "LpBatchNorm2d": lambda c: nl.LpBatchNorm2d(c, p=1),
        # limits that change at every step: a recomputation must use its step's r_max and d_max
        "BatchRenorm2d": lambda c: nl.BatchRenorm2d(c, r_max=1.5, d_max=0.5, warmup_steps=1, r_max_steps=4,
                                                    d_max_steps=3),
        "BatchRenorm2d momentum=None": lambda c: nl.BatchRenorm2d(c, momentum=None, r_max=1.2, d_max=0.1,
                                                                  warmup_steps=0, r_max_steps=0, d_max_steps=0),
        "GhostBatchNorm2d": lambda c: nl.GhostBatchNorm2d(c, virtual_batch_size=3),
    }[norm]
    return torch.nn.ModuleList([
        torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), make(6), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1), make(6), torch.nn.ReLU()),
    ])


def _train(blocks, mode, steps=4):
    opt = torch.optim.SGD(blocks.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        h = torch.randn(4, 3, 5, 5, generator=gen).requires_grad_(mode == "reentrant")
        for block in blocks:
            if mode == "plain":
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=mode == "reentrant")
        h.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v for k, v in blocks.state_dict().items()}


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("norm", ["BatchNorm2d", "BatchNorm2d momentum=None", "BatchNormReLU2d", "InstanceNorm2d",
                                  "LpBatchNorm2d", "BatchRenorm2d", "BatchRenorm2d momentum=None",
                                  "GhostBatchNorm2d"])
def test_checkpointed_training_matches_the_plain_run_exactly(norm, mode):
    plain = _train(_blocks(norm), "plain")
    checkpointed = _train(_blocks(norm), mode)
    for key, value in plain.items():
        assert torch.equal(value, checkpointed[key]), key
    if not norm.startswith(("InstanceNorm", "LpBatchNorm")):
        assert int(checkpointed["0.1.num_batches_tracked"]) == 4


def test_update_once_keeps_the_first_call_s_update():
    bn = nl.BatchNorm1d(3)
    reference = nl.BatchNorm1d(3)
    a, b = torch.randn(8, 3), torch.randn(8, 3) + 5
    with normlab.update_once():
        ya, yb = bn(a), bn(b)
    reference(a)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var) and int(bn.num_batches_tracked) == 1
    # each call still normalizes with its own batch's statistics
    torch.testing.assert_close(yb, torch.nn.functional.batch_norm(b, None, None, bn.weight, bn.bias, training=True))
    with normlab.update_once():
        bn(b)
    assert int(bn.num_batches_tracked) == 2  # a new context is a new step
    bn(a), bn(b)
    assert int(bn.num_batches_tracked) == 4  # outside it, every call updates


def test_update_once_as_a_decorator_and_with_instance_norm():
    norm = nl.InstanceNorm1d(2, track_running_stats=True)
    x = torch.randn(4, 2, 6)

    @normlab.update_once()
    def siamese_step(x):
        return norm(x) + norm(x * 3 + 1)

    siamese_step(x)
    reference = nl.InstanceNorm1d(2, track_running_stats=True)
    reference(x)
    assert torch.equal(norm.running_mean, reference.running_mean)
    assert torch.equal(norm.running_var, reference.running_var)


def test_masked_statistics_update_once_and_not_on_recomputation():
    bn, reference = nl.BatchNorm1d(3), nl.BatchNorm1d(3)
    a, b = torch.randn(8, 3, 5), torch.randn(8, 3, 5) + 5
    mask = torch.rand(8, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    with normlab.update_once():
        bn(a, mask), bn(b, mask)
    reference(a, mask)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var) and int(bn.num_batches_tracked) == 1
    x = a.clone().requires_grad_(True)
    checkpoint(lambda t: bn(t, mask), x, use_reentrant=False).sum().backward()
    reference(a, mask)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var) and int(bn.num_batches_tracked) == 2


def test_ghost_batch_norm_updates_once_per_step():
    bn, reference = nl.GhostBatchNorm1d(3, 4), nl.GhostBatchNorm1d(3, 4)
    a, b = torch.randn(8, 3), torch.randn(8, 3) + 5
    with normlab.update_once():
        bn(a), bn(b)
    reference(a)
    x = a.clone().requires_grad_(True)
    checkpoint(bn, x, use_reentrant=False).sum().backward()
    reference(a)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var) and int(bn.num_batches_tracked) == 2


def test_batch_renorm_updates_once_and_later_calls_use_the_step_s_start():
    """Inside update_once the first call updates (and advances the schedule's step); a later call, like a
    checkpointed recomputation, renormalizes against the running statistics and step the step started from."""
    make = lambda: nl.BatchRenorm1d(3, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=2, d_max_steps=2)  # noqa: E731
    bn, first, second = make(), make(), make()
    a, b = torch.randn(8, 3), torch.randn(8, 3) * 3 + 2
    with normlab.update_once():
        ya, yb = bn(a), bn(b)
    assert torch.equal(ya, first(a)) and torch.equal(yb, second(b))
    assert torch.equal(bn.running_mean, first.running_mean) and torch.equal(bn.running_var, first.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.limits() == first.limits() != second.limits(0)
