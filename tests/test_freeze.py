"""freeze_bn / unfreeze_bn and FrozenBatchNorm under .train(), for torch.nn's and normlab's layers."""

import copy
import io

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nl


def _model(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5), bn1d(5))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8))
    return model


@pytest.mark.parametrize("bn2d,bn1d", [(nn.BatchNorm2d, nn.BatchNorm1d), (nl.BatchNorm2d, nl.BatchNorm1d)])
def test_frozen_model_in_train_mode_computes_the_eval_model_and_never_changes(bn2d, bn1d):
    model = _model(bn2d, bn1d)
    reference = copy.deepcopy(model).eval()
    state = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model]
    frozen = normlab.freeze_bn(model).train()
    assert isinstance(frozen[1], nl.FrozenBatchNorm2d) and isinstance(frozen[5], nl.FrozenBatchNorm1d)
    x = torch.randn(6, 3, 8, 8)
    assert torch.allclose(frozen(x), reference(x), atol=1e-6)
    assert not frozen[1].weight.requires_grad and frozen[0].weight.requires_grad
    frozen(x).sum().backward()
    assert frozen[1].weight.grad is None and frozen[0].weight.grad is not None
    assert set(frozen.state_dict()) == set(state)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k]), k
    back = normlab.unfreeze_bn(frozen)
    assert [type(m) for m in back] == types and back[1].training
    assert all(p.requires_grad for p in back.parameters())
    back(x)  # live again: train mode updates the statistics
    assert not torch.equal(back[1].running_mean, state["1.running_mean"])


def test_trainable_affine_and_prefix_selection():
    model = nn.Sequential()
    model.add_module("layer1", nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    model.add_module("layer10", nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    model.layer1[1].bias.requires_grad_(False)
    normlab.freeze_bn(model, affine=True, modules="layer1")
    assert isinstance(model.layer1[1], nl.FrozenBatchNorm2d)
    assert type(model.layer10[1]) is nn.BatchNorm2d
    assert model.layer1[1].weight.requires_grad and not model.layer1[1].bias.requires_grad
    model.train()(torch.randn(2, 2, 3, 3)).sum().backward()
    assert model.layer1[1].weight.grad is not None
    assert torch.equal(model.layer1[1].running_mean, torch.zeros(2))
    normlab.unfreeze_bn(model)
    assert type(model.layer1[1]) is nn.BatchNorm2d and not model.layer1[1].bias.requires_grad
    with pytest.raises(ValueError, match="no submodule is named 'layer2'"):
        normlab.freeze_bn(model, modules=["layer2"])
    normlab.freeze_bn(model, modules=model.layer10)
    assert isinstance(model.layer10[1], nl.FrozenBatchNorm2d) and type(model.layer1[1]) is nn.BatchNorm2d


def test_frozen_survives_deepcopy_save_and_load_then_unfreezes():
    model = normlab.freeze_bn(_model())
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (clone, loaded):
        back = normlab.unfreeze_bn(m)
        assert type(back[1]) is nn.BatchNorm2d
        assert torch.equal(back[1].running_var, model[1].running_var)
        assert back[1].weight is back.state_dict(keep_vars=True)["1.weight"]


def test_layers_that_are_more_than_bn_are_left_live():
    model = nn.Sequential(nl.BatchNormReLU2d(2), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.warns(UserWarning, match="left live"):
        normlab.freeze_bn(model)
    assert type(model[0]) is nl.BatchNormReLU2d and type(model[1]) is nn.BatchNorm2d
