import copy

import pytest
import torch

import normlab.nn as nl


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.Sequential(torch.nn.GroupNorm(2, 4, eps=1e-3), torch.nn.InstanceNorm2d(4, affine=True)),
        torch.nn.Flatten(),
        torch.nn.LayerNorm(4 * 4 * 4, bias=False),
        torch.nn.BatchNorm1d(64, affine=False, track_running_stats=False),
    ).double()


def test_convert_swaps_every_norm_layer_and_keeps_state():
    model = _model()
    model[1].running_mean.fill_(2.0)
    model.eval()
    reference = copy.deepcopy(model)
    weight = model[1].weight
    converted = nl.convert(model)
    kinds = [type(m) for m in converted.modules()]
    for cls in (nl.BatchNorm2d, nl.GroupNorm, nl.InstanceNorm2d, nl.LayerNorm, nl.BatchNorm1d):
        assert cls in kinds
    assert converted[1].weight is weight  # shared, so an existing optimizer keeps working
    assert converted[1].momentum is None and converted[2][0].eps == 1e-3
    assert converted[4].bias is None and converted[5].running_mean is None
    assert not converted.training and not converted[1].training
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x))
    assert converted.state_dict().keys() == reference.state_dict().keys()

    back = nl.convert(converted, to="torch")
    assert all(type(m).__module__.startswith("torch.") for m in back.modules())
    torch.testing.assert_close(back(x), reference(x))


def test_convert_a_bare_layer_and_reject_unknown_target():
    layer = nl.convert(torch.nn.BatchNorm3d(2))
    assert type(layer) is nl.BatchNorm3d
    with pytest.raises(ValueError, match="'normlab' or 'torch'"):
        nl.convert(layer, to="jax")


def test_convert_keeps_hooks():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    converted = nl.convert(model)
    converted(torch.randn(4, 3))
    assert calls == ["BatchNorm1d"] and type(converted[0]) is nl.BatchNorm1d


def test_a_layer_used_twice_stays_one_layer():
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(bn, torch.nn.ReLU(), bn, torch.nn.Sequential(bn))
    model = nl.convert(model)
    assert model[0] is model[2] is model[3][0]
    assert isinstance(model[0], nl.BatchNorm2d)
    back = nl.convert(model, to="torch")
    assert back[0] is back[2] is back[3][0] and type(back[0]) is torch.nn.BatchNorm2d


def test_convert_takes_eps_zero_where_torch_does():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4, eps=0.0), torch.nn.GroupNorm(2, 4, eps=0.0)).double()
    converted = nl.convert(copy.deepcopy(model))
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
