"""Swap the normalization layers of an existing model: between torch.nn and normlab (:func:`convert`), and
between per-process and synchronized batch normalization (:func:`convert_sync_batchnorm`,
:func:`revert_sync_batchnorm`)."""

from __future__ import annotations

from torch import nn

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.groupnorm import GroupNorm, LayerNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.sync_batchnorm import SyncBatchNorm

__all__ = ["convert", "convert_sync_batchnorm", "revert_sync_batchnorm"]

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


# normlab's layer options (attributes, not constructor arguments: ``momentum`` and ``eps`` already hold the
# convention's values in torch's meaning) and the count of skipped batches, carried wherever the new layer
# has them too; a torch.nn layer has none (it keeps the momentum, and stores the unbiased variance).
_CARRIED = ("guard_stats", "convention", "num_batches_skipped", "_warned_skip")


def _swap(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
    new = cls(**_config(m), device="meta")
    for name in _CARRIED:
        if hasattr(m, name) and hasattr(new, name):
            setattr(new, name, getattr(m, name))
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


def convert(model: nn.Module, to: str = "normlab", fuse: bool = False) -> nn.Module:
    """Replace every normalization layer of ``model`` by its normlab (or, with ``to="torch"``, its
    torch.nn) counterpart, keeping parameters, running statistics, hooks, train/eval mode and configuration.

    Layers are swapped in place inside ``model``; the (possibly new) root module is returned, so
    ``convert(nn.BatchNorm2d(3))`` works too. Parameters are shared, not copied: an optimizer created
    before the conversion still trains the converted model. Only the exact classes listed in
    ``torch.nn`` (BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm) are swapped;
    subclasses, lazy and synchronized variants are left as they are.

    ``fuse=True`` (``to="normlab"`` only) then rewrites each BatchNorm2d → ReLU into
    :class:`~normlab.nn.BatchNormReLU2d` and each BatchNorm2d + residual add → ReLU into
    :class:`~normlab.nn.BatchNormAddReLU2d` (see :func:`normlab.nn.fuse`): same parameters and
    ``state_dict`` keys, same outputs and gradients. Where the model traces with torch.fx the result is a
    ``torch.fx.GraphModule``. What was fused, and why a BatchNorm2d was not, is in the returned model's
    ``fusion_report`` attribute (a :class:`~normlab.nn.fuse.FusionReport`) and logged to ``normlab.fuse``.

    >>> import torch, normlab.nn
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = normlab.nn.convert(model)
    >>> type(model[1]).__module__
    'normlab.nn.batchnorm'
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to must be 'normlab' or 'torch', got {to!r}.")
    if fuse and to != "normlab":
        raise ValueError("convert: fuse=True rewrites layers into normlab's fused layers; it needs to='normlab'.")
    model = _convert(model, _TARGETS[to], {})
    if fuse:
        from normlab.nn.fuse import fuse as fuse_model

        model, report = fuse_model(model)
        model.fusion_report = report
    return model


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


# Layers whose statistics are a plain batch's, which synchronized statistics replace exactly. Subclasses
# (normlab's BatchNormReLU2d and BatchNormAddReLU2d, which fuse a ReLU; LpBatchNorm, whose statistic is
# an ℓp norm) and lazy layers are left as they are.
_SYNCABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)
_BY_INPUT_RANK = {"torch": {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d},
                  "normlab": {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}}


def convert_sync_batchnorm(model: nn.Module, process_group=None, timeout=None) -> nn.Module:
    """Replace every batch normalization layer of ``model`` (torch.nn's and normlab's BatchNorm1d/2d/3d,
    and ``torch.nn.SyncBatchNorm``) by a :class:`normlab.nn.SyncBatchNorm` over ``process_group`` (default:
    the whole world), keeping parameters and buffers (the same objects), requires_grad, hooks, train/eval
    mode, device, and a normlab layer's ``guard_stats``, ``convention`` and ``num_batches_skipped``. Each new layer remembers the class it replaced (for :func:`revert_sync_batchnorm`)
    and its name in ``model`` (for error messages). ``timeout``: see :class:`~normlab.nn.SyncBatchNorm`.

    Swapped in place; the (possibly new) root module is returned. Left as they are: the fused
    BatchNormReLU2d / BatchNormAddReLU2d and the ℓp variants (their statistics or outputs are not plain
    BatchNorm's), lazy layers, and layers with fixed statistics (torchvision's FrozenBatchNorm2d, which has
    nothing to synchronize).

    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> type(normlab.convert_sync_batchnorm(model)[1]).__name__
    'SyncBatchNorm'
    """
    def swap(m: nn.Module, name: str) -> nn.Module:
        new = _swap(m, SyncBatchNorm)
        new.process_group = process_group
        new.timeout = timeout
        new.layer_name = name
        new.replaced = getattr(m, "replaced", None) if isinstance(m, SyncBatchNorm) else type(m)
        return new

    return _replace(model, lambda m: type(m) in _SYNCABLE, swap, "", {})


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every synchronized batch normalization layer of ``model`` (normlab's and torch.nn's
    SyncBatchNorm) by a per-process one, keeping parameters and buffers (the same objects), requires_grad,
    hooks, train/eval mode, device, and the layer options a normlab target has (``guard_stats``,
    ``convention``, ``num_batches_skipped``): for a layer made by :func:`convert_sync_batchnorm`, the class it
    replaced; otherwise the BatchNorm1d/2d/3d (normlab's for normlab's layer, torch.nn's for torch's)
    matching the rank of the last input the layer saw, and BatchNorm2d for a layer that has seen none.

    >>> import torch, normlab
    >>> model = normlab.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    >>> type(normlab.revert_sync_batchnorm(model)[0]).__module__
    'torch.nn.modules.batchnorm'
    """
    def target(m: nn.Module) -> type[nn.Module]:
        if getattr(m, "replaced", None) is not None:
            return m.replaced
        family = "normlab" if isinstance(m, SyncBatchNorm) else "torch"
        return _BY_INPUT_RANK[family].get(getattr(m, "input_rank", None) or 4)

    return _replace(model, lambda m: isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)),
                    lambda m, name: _swap(m, target(m)), "", {})


def _replace(model: nn.Module, match, swap, name: str, done: dict[int, nn.Module]) -> nn.Module:
    """``model`` with every module ``m`` for which ``match(m)`` replaced by ``swap(m, its dotted name)``;
    a module used in several places is swapped once and stays one module."""
    if id(model) in done:
        return done[id(model)]
    if match(model):
        done[id(model)] = swap(model, name)
        return done[id(model)]
    done[id(model)] = model
    for child_name, child in list(model._modules.items()):
        if child is None:
            continue
        new_child = _replace(child, match, swap, f"{name}.{child_name}" if name else child_name, done)
        if new_child is not child:
            setattr(model, child_name, new_child)
    return model
