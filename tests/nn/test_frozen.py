"""FrozenBatchNorm1d/2d/3d: torch.nn's state_dict, checks, and the layers unfreeze_bn builds."""

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nl


def test_state_dict_loads_both_ways_and_shared_parameters_are_kept():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.normal_()
    frozen = nl.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())
    assert torch.equal(frozen.running_mean, bn.running_mean)
    nn.BatchNorm2d(3).load_state_dict(frozen.state_dict())
    model = nn.Sequential(bn)
    weight = bn.weight
    normlab.freeze_bn(model)
    assert model[0].weight is weight
    normlab.unfreeze_bn(model)
    assert model[0] is bn and bn.weight is weight and weight.requires_grad


def test_frozen_layer_errors_and_direct_unfreeze():
    with pytest.raises(ValueError, match="FrozenBatchNorm2d"):
        nl.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="eps"):
        nl.FrozenBatchNorm1d(3, eps=-1.0)  # eps=0 is accepted in eval mode, as torch accepts it
    back = normlab.unfreeze_bn(nn.Sequential(nl.FrozenBatchNorm3d(2)))
    assert type(back[0]) is nl.BatchNorm3d
