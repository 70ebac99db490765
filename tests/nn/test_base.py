"""normlab.nn.base: what BatchNorm and InstanceNorm layers share (eps and momentum checked at construction
and per call, the skip count cleared by reset_running_stats), and the former name of the base."""

import pytest
import torch

import normlab.nn as nl
from normlab.nn.base import _NormBase

LAYERS = {
    "BatchNorm2d": lambda **kw: nl.BatchNorm2d(3, **kw),
    "InstanceNorm2d": lambda **kw: nl.InstanceNorm2d(3, track_running_stats=True, **kw),
}


def test_batchnorm_and_instancenorm_share_the_base():
    from normlab.nn.batchnorm import _RunningStatsMixin

    assert _RunningStatsMixin is _NormBase
    for cls in (nl.BatchNorm1d, nl.BatchNorm2d, nl.BatchNorm3d, nl.InstanceNorm1d, nl.InstanceNorm2d,
                nl.InstanceNorm3d):
        assert issubclass(cls, _NormBase)


@pytest.mark.parametrize("name", LAYERS)
def test_eps_and_momentum_are_checked_at_construction_and_per_call(name):
    with pytest.raises(ValueError, match="eps"):
        LAYERS[name](eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LAYERS[name](momentum=1.5)
    layer = LAYERS[name]()
    x = torch.randn(2, 3, 4, 4)
    layer(x)
    layer.momentum = -0.5  # set after construction: refused at the next call, running statistics untouched
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match="momentum"):
        layer(x)
    assert torch.equal(layer.running_mean, before)


@pytest.mark.parametrize("name", LAYERS)
def test_reset_running_stats_clears_the_skip_count(name):
    layer = LAYERS[name]()
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x)
    assert layer.num_batches_skipped == 1
    layer.reset_running_stats()
    assert layer.num_batches_skipped == 0
