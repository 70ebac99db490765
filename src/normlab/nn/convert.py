"""Swap the normalization layers of an existing model between torch.nn and normlab."""

from __future__ import annotations

from torch import nn

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.groupnorm import GroupNorm, LayerNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = ["convert"]

_PAIRS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.BatchNorm1d, BatchNorm1d),
    (nn.BatchNorm2d, BatchNorm2d),
    (nn.BatchNorm3d, BatchNorm3d),
    (nn.InstanceNorm1d, InstanceNorm1d),
    (nn.InstanceNorm2d, InstanceNorm2d),
    (nn.InstanceNorm3d, InstanceNorm3d),
    (nn.LayerNorm, LayerNorm),
    (nn.GroupNorm, GroupNorm),
)
_TARGETS = {
    "normlab": {torch_cls: ours for torch_cls, ours in _PAIRS},
    "torch": {ours: torch_cls for torch_cls, ours in _PAIRS},
}


def _config(m: nn.Module) -> dict:
    """Constructor arguments that rebuild ``m``'s configuration (not its tensors)."""
    if isinstance(m, nn.LayerNorm):
        cfg = dict(normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)
        affine = m.elementwise_affine
    elif isinstance(m, nn.GroupNorm):
        cfg = dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine)
        affine = m.affine
    else:
        cfg = dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                   track_running_stats=m.track_running_stats)
        affine = m.affine
    if affine and m.bias is None:
        cfg["bias"] = False
    return cfg


def _swap(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
    new = cls(**_config(m), device="meta")
    # Share the very Parameter and buffer objects: state is kept exactly and an optimizer built on
    # the old model keeps updating the same tensors.
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    # Hooks registered on the old layer (forward, backward, state_dict, ...) keep working.
    for name, value in vars(m).items():
        if name.startswith("_") and "hooks" in name and isinstance(value, dict):
            setattr(new, name, type(value)(value))
    new.train(m.training)
    return new


def convert(model: nn.Module, to: str = "normlab") -> nn.Module:
    """Replace every normalization layer of ``model`` by its normlab (or, with ``to="torch"``, its
    torch.nn) counterpart, keeping parameters, running statistics, hooks, train/eval mode and configuration.

    Layers are swapped in place inside ``model``; the (possibly new) root module is returned, so
    ``convert(nn.BatchNorm2d(3))`` works too. Parameters are shared, not copied: an optimizer created
    before the conversion still trains the converted model. Only the exact classes listed in
    ``torch.nn`` (BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm) are swapped;
    subclasses, lazy and synchronized variants are left as they are.

    >>> import torch, normlab.nn
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = normlab.nn.convert(model)
    >>> type(model[1]).__module__
    'normlab.nn.batchnorm'
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to must be 'normlab' or 'torch', got {to!r}.")
    return _convert(model, _TARGETS[to], {})


def _convert(model: nn.Module, table: dict, done: dict[int, nn.Module]) -> nn.Module:
    """:func:`convert` with ``done``: each layer already swapped, by ``id``, so that a layer used in
    several places (weight tying) is swapped once and stays one module."""
    if id(model) in done:
        return done[id(model)]
    target = table.get(type(model))
    if target is not None:
        done[id(model)] = _swap(model, target)
        return done[id(model)]
    done[id(model)] = model
    for name, child in list(model._modules.items()):  # named_children() would skip a repeated child
        if child is None:
            continue
        new_child = _convert(child, table, done)
        if new_child is not child:
            setattr(model, name, new_child)
    return model
