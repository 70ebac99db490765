"""Freeze the BN layers of a model for fine-tuning, and undo it exactly: :func:`freeze_bn`, :func:`unfreeze_bn`.

:func:`freeze_bn` swaps each BN layer for a :class:`~normlab.nn.FrozenBatchNorm2d` (1d/3d) that shares
its parameters and buffers, so the statistics stay fixed through any later ``model.train()`` (unlike
calling ``.eval()`` on each layer). :func:`unfreeze_bn` puts the original layer object back — torch.nn's,
normlab's or any subclass — with the parameters, buffers and ``requires_grad`` flags it had, in the
frozen layer's current train/eval mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.nn import batchnorm as _normlab_bn
from normlab.nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = ["freeze_bn", "unfreeze_bn", "is_plain_batchnorm"]

_PLAIN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward, _normlab_bn._BatchNorm.forward}
_FROZEN = ((nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d),
           (nn.BatchNorm3d, FrozenBatchNorm3d))


def is_plain_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a BN layer whose output is batch normalization alone: an instance of torch.nn's
    ``_BatchNorm`` whose class keeps the forward of torch.nn's or normlab's BatchNorm or SyncBatchNorm
    (not e.g. ``BatchNormReLU2d``, which applies a ReLU too)."""
    return isinstance(m, _BatchNorm) and type(m).forward in _PLAIN_FORWARDS


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    for name, value in vars(src).items():
        if name.startswith("_") and "hooks" in name and isinstance(value, dict):
            setattr(dst, name, type(value)(value))


def _selected(model: nn.Module, modules) -> set[int]:
    """ids of the modules inside the parts of ``model`` that ``modules`` names."""
    named = dict(model.named_modules())
    if modules is None:
        return {id(m) for m in named.values()}
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    chosen: set[int] = set()
    for entry in modules:
        if isinstance(entry, nn.Module):
            roots = [entry]
        else:
            roots = [m for name, m in named.items()
                     if entry == "" or name == entry or name.startswith(entry + ".")]
        if not roots:
            raise ValueError(f"freeze_bn: no submodule is named {entry!r} or lies under it; "
                             f"the names are those of model.named_modules().")
        for root in roots:
            chosen.update(id(m) for m in root.modules())
    return chosen


def _replace(model: nn.Module, swap, done: dict[int, nn.Module]) -> nn.Module:
    """Replace, depth-first, every module for which ``swap(m)`` returns a new one; a module used in several
    places is swapped once and stays one module."""
    if id(model) in done:
        return done[id(model)]
    new = swap(model)
    if new is not None:
        done[id(model)] = new
        return new
    done[id(model)] = model
    for name, child in list(model._modules.items()):
        if child is not None:
            new_child = _replace(child, swap, done)
            if new_child is not child:
                setattr(model, name, new_child)
    return model


def freeze_bn(model: nn.Module, affine: bool = False, modules: str | nn.Module | Iterable | None = None) -> nn.Module:
    """Swap the BN layers of ``model`` (in place) for frozen ones: fixed statistics in every mode.

    Args:
        model: the model; the (possibly new) root is returned, so ``freeze_bn(nn.BatchNorm2d(3))`` works.
        affine: keep γ and β trainable (their ``requires_grad`` as it was); by default they are frozen
            too (``requires_grad=False``).
        modules: only the BN layers inside these parts: a name prefix of ``model.named_modules()``
            (``"layer1"`` covers ``layer1.0.bn1`` but not ``layer10``), a submodule, or a list of them.

    Parameters and buffers are shared with the frozen layers (an optimizer built before still holds
    them). Layers without running statistics, and BN subclasses whose forward does more than batch
    normalization (``BatchNormReLU2d``), are left live, with a warning.
    """
    chosen = _selected(model, modules)
    skipped: list[str] = []
    names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}

    def swap(m: nn.Module):
        if id(m) not in chosen or not isinstance(m, _BatchNorm):
            return None
        if not is_plain_batchnorm(m) or m.running_mean is None:
            skipped.append(names.get(id(m), type(m).__name__))
            return None
        cls = next((f for b, f in _FROZEN if isinstance(m, b)), FrozenBatchNorm)
        flags = {k: p.requires_grad for k, p in m._parameters.items() if p is not None}
        frozen = cls.from_batchnorm(m, trainable_affine=affine)
        if affine:
            for k, p in frozen._parameters.items():
                if p is not None:
                    p.requires_grad_(flags[k])
        _copy_hooks(m, frozen)
        frozen.__dict__["_unfrozen"] = (m, flags)  # not a submodule: absent from state_dict and modules()
        return frozen

    model = _replace(model, swap, {})
    if skipped:
        warnings.warn(f"freeze_bn: left live (no running statistics, or a forward that is more than "
                      f"batch normalization): {', '.join(skipped)}", stacklevel=2)
    return model


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn` (in place): every frozen layer becomes the original layer object again,
    with the frozen layer's current parameters and buffers, the ``requires_grad`` flags the original had,
    and the frozen layer's train/eval mode. A frozen layer built directly (not by :func:`freeze_bn`)
    becomes normlab's BatchNorm of its rank (momentum 0.1). Returns the (possibly new) root."""

    def swap(m: nn.Module):
        if not isinstance(m, FrozenBatchNorm):
            return None
        origin = m.__dict__.get("_unfrozen")
        if origin is None:
            cls = {FrozenBatchNorm1d: _normlab_bn.BatchNorm1d, FrozenBatchNorm3d: _normlab_bn.BatchNorm3d}.get(
                type(m), _normlab_bn.BatchNorm2d)
            live, flags = cls(m.num_features, eps=m.eps, affine=m.affine, device="meta"), {}
        else:
            live, flags = origin
        live._parameters.update(m._parameters)
        live._buffers.update(m._buffers)
        for k, p in live._parameters.items():
            if p is not None:
                p.requires_grad_(flags.get(k, True))
        _copy_hooks(m, live)
        live.train(m.training)
        return live

    return _replace(model, swap, {})
