"""Other frameworks' BatchNorm conventions, and loaders for BatchNorm weights exported from them.

A model ported from Keras or Flax gives other outputs than its source when its BatchNorm layers keep
torch's conventions: there ``momentum`` is the weight of the *old* running value, not of the new batch,
the running variance is the *biased* batch variance, and the defaults differ. From each framework's
documentation:

=========  =====================================================  ========  =======  =============
           running update                                         momentum  eps      running var
=========  =====================================================  ========  =======  =============
torch      running = (1 − momentum) · running + momentum · batch  0.1       1e-5     unbiased
keras      moving = moving · momentum + batch · (1 − momentum)    0.99      1e-3     biased
flax       ra = momentum · ra + (1 − momentum) · batch            0.99      1e-5     biased
=========  =====================================================  ========  =======  =============

(Keras 3 and ``tf.keras`` with ``fused=False`` update ``moving_variance`` with the biased batch variance, as
the formula says; TensorFlow's fused kernel, used by ``tf.keras`` 2.x for 4D inputs when ``fused`` is
not ``False``, stores the unbiased one: build such a port with ``convention="torch"`` and a translated
momentum instead.)

``BatchNorm2d(C, convention="keras")`` reads ``eps`` and ``momentum`` (and their defaults) as Keras does
and stores the running variance biased. ``layer.momentum`` always holds torch's meaning (0.01 for Keras'
0.99), so torch code that reads it, :func:`normlab.nn.convert` included, sees the update that happens;
a layer converted to torch.nn's keeps its momentum but goes on to store the unbiased variance.

:func:`load_keras_batchnorm` and :func:`load_flax_batchnorm` copy a layer's exported arrays (NumPy or
anything ``torch.as_tensor`` takes) into a normlab or torch.nn BatchNorm; :func:`keras_kernel` turns a
Keras ``Conv*D``/``Dense`` kernel (channels-last: (*k, in, out) or (in, out)) into torch's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["CONVENTIONS", "Convention", "DEFAULT", "given", "load_keras_batchnorm", "load_flax_batchnorm",
           "keras_kernel"]


class _ConventionDefault:
    """The default of ``eps`` or ``momentum`` in the layer's convention (torch's 1e-5 and 0.1 for "torch"): the
    default of a layer constructor that has to tell "not given" from a value."""

    def __repr__(self) -> str:
        return "<the convention's default>"


DEFAULT = _ConventionDefault()


def given(**values) -> dict:
    """The keyword arguments among ``values`` that were given (are not :data:`DEFAULT`), so that
    :func:`convention_args` fills in the others from the layer's convention."""
    return {name: value for name, value in values.items() if value is not DEFAULT}


@dataclass(frozen=True)
class Convention:
    """How a framework reads BatchNorm's ``momentum`` and which defaults and running variance it has."""

    momentum: float
    eps: float
    momentum_is_decay: bool
    biased_running_var: bool

    def torch_momentum(self, momentum: float | None) -> float | None:
        """``momentum`` in this convention as torch's weight of the new batch (``None`` stays ``None``)."""
        if momentum is None or not self.momentum_is_decay:
            return momentum
        return 1.0 - momentum


CONVENTIONS = {
    "torch": Convention(momentum=0.1, eps=1e-5, momentum_is_decay=False, biased_running_var=False),
    "keras": Convention(momentum=0.99, eps=1e-3, momentum_is_decay=True, biased_running_var=True),
    "flax": Convention(momentum=0.99, eps=1e-5, momentum_is_decay=True, biased_running_var=True),
}


def convention_args(name: str, cls_name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A BatchNorm constructor's ``(args, kwargs)`` with ``eps`` and ``momentum`` (positions 1 and 2, or
    keywords) read in convention ``name``: its defaults where they are not given, momentum in torch's meaning."""
    if name not in CONVENTIONS:
        raise ValueError(f"{cls_name}: convention must be one of {sorted(CONVENTIONS)}, got {name!r}.")
    conv = CONVENTIONS[name]
    if name == "torch":
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    if len(args) < 2 and "eps" not in kwargs:
        kwargs["eps"] = conv.eps
    if len(args) >= 3:
        args[2] = conv.torch_momentum(args[2])
    else:
        kwargs["momentum"] = conv.torch_momentum(kwargs.get("momentum", conv.momentum))
    return tuple(args), kwargs


def _copy(target: torch.Tensor | None, value, what: str, layer: nn.Module) -> None:
    if target is None:
        raise ValueError(f"{type(layer).__name__} has no {what} (built with affine=False or "
                         f"track_running_stats=False) but the exported weights hold one.")
    value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))  # a copy: jax's are read-only
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{what}: exported shape {tuple(value.shape)} does not match the layer's "
                         f"{tuple(target.shape)}; is it the same layer?")
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def _load(layer: nn.Module, weights: Mapping, names: dict[str, str]) -> None:
    """Copy ``weights[exported]`` into the layer's ``names[exported]``; γ = 1 and β = 0 where the export
    has none (Keras' ``scale=False`` / ``center=False``, Flax's ``use_scale``/``use_bias=False``)."""
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"unexpected exported BatchNorm weights {sorted(unknown)}; expected {sorted(names)}")
    for exported, attr in names.items():
        target = getattr(layer, attr)
        if exported in weights:
            _copy(target, weights[exported], exported, layer)
        elif attr in ("weight", "bias") and target is not None:
            with torch.no_grad():
                target.fill_(1.0 if attr == "weight" else 0.0)
        elif attr in ("running_mean", "running_var"):
            raise ValueError(f"the exported weights have no {exported}")
    if getattr(layer, "num_batches_tracked", None) is not None:
        layer.num_batches_tracked.zero_()


def load_keras_batchnorm(layer: nn.Module, weights: Mapping) -> nn.Module:
    """Load a Keras ``BatchNormalization``'s ``gamma``, ``beta``, ``moving_mean`` and ``moving_variance``
    (e.g. ``dict(zip(["gamma", "beta", "moving_mean", "moving_variance"], keras_layer.get_weights()))``,
    fewer with ``scale``/``center`` off) into ``layer``; returns it. Build ``layer`` with
    ``convention="keras"`` (Keras' eps, momentum and biased running variance) to keep training it as Keras
    would; its ``eps`` must be the Keras layer's ``epsilon`` for the outputs to match."""
    _load(layer, weights, {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                           "moving_variance": "running_var"})
    return layer


def load_flax_batchnorm(layer: nn.Module, variables: Mapping) -> nn.Module:
    """Load a Flax ``nn.BatchNorm``'s variables into ``layer``: ``{"params": {"scale", "bias"},
    "batch_stats": {"mean", "var"}}`` as ``model.init``/``apply`` give them for one layer, or the four
    arrays in one flat dict; returns it. Build ``layer`` with ``convention="flax"`` to keep training it."""
    flat = dict(variables)
    if "params" in flat or "batch_stats" in flat:
        flat = {**dict(flat.get("params", {})), **dict(flat.get("batch_stats", {}))}
    _load(layer, flat, {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"})
    return layer


def keras_kernel(kernel) -> torch.Tensor:
    """A Keras kernel in torch's layout: ``Dense`` (in, out) → (out, in); ``Conv1D/2D/3D``
    (*k, in, out) → (out, in, *k). A channels-last Keras model's inputs go in with ``x.permute(0, 3, 1, 2)``
    (2D) and come out of a flatten in a different order: permute back before a flatten."""
    k = torch.as_tensor(kernel)
    if k.dim() == 2:
        return k.t().contiguous()
    return k.permute(k.dim() - 1, k.dim() - 2, *range(k.dim() - 2)).contiguous()
