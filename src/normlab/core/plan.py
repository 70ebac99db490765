"""Where a normalization reduces and where it scales: one description for every layer.

Every member of the family computes the same thing,

    x̂ = (x − E[x]) / sqrt(Var[x] + eps),    y = γ ⊙ x̂ + β,

and differs only in *which axes the statistics are taken over* and *which axes γ and β vary along*.
A :class:`Plan` records those axes for one input shape. It works on shapes alone, so the NumPy
reference (:mod:`normlab.reference`) and the torch engine (:mod:`normlab.core.engine`) share it.

=============  =====================  ==============================  ======================
layer          view of x              statistics over (reduce)        γ, β vary along
=============  =====================  ==============================  ======================
BatchNorm      (N, C, *S)             N and every spatial axis        C
InstanceNorm   (N, C, *S)             every spatial axis              C
GroupNorm      (N, G, C/G, *S)        C/G and every spatial axis      (G, C/G), i.e. C
LayerNorm      (*B, *D)               the last k = len(D) axes        the last k axes
=============  =====================  ==============================  ======================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import functools

import torch


@dataclass(frozen=True)
class Plan:
    """Axes of one normalization for one input shape.

    Attributes:
        input_shape: shape of the input as given.
        view_shape: shape the input is reshaped to before normalizing (differs from
            ``input_shape`` only for GroupNorm, where the channel axis is split into groups).
        reduce: axes of the view that the mean and variance are taken over.
        param_axes: axes of the view along which γ and β vary.
        param_shape: the shape a user's ``weight``/``bias`` must have.
        param_view: the shape γ and β are reshaped to so that they broadcast against the view.
        channels: the number of running-statistic entries (``C``), or ``None`` where the layer keeps
            no running statistics (LayerNorm, GroupNorm).
        count: number of values each statistic is computed from (``m`` in the formulas).
        param_sum_axes: axes summed over for dγ and dβ: every axis γ does not vary along.
        stat_shape: shape of the per-statistic tensors (mean, var), the reduced axes kept as size 1.
    """

    input_shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    reduce: tuple[int, ...]
    param_axes: tuple[int, ...]
    param_shape: tuple[int, ...]
    param_view: tuple[int, ...]
    channels: int | None

    # A plan is built once per input shape (the constructors below are cached) and asked the same
    # questions at every call, so the derived quantities (count, param_sum_axes, stat_shape) are
    # computed once, here, as plain attributes: ``cached_property`` would take a lock at every first
    # access, which torch.compile cannot trace.

    def __post_init__(self):
        # list comprehensions, not generators: torch.compile traces this when it builds a plan
        derived = {
            "count": math.prod([self.view_shape[d] for d in self.reduce]),
            "param_sum_axes": tuple([d for d in range(len(self.view_shape)) if d not in self.param_axes]),
            "stat_shape": tuple([1 if d in self.reduce else s for d, s in enumerate(self.view_shape)]),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def memo(self, key, build):
        """``build()``, computed once per plan and ``key``: the backends keep their per-shape set-up here."""
        memo = self.__dict__.setdefault("_memo", {})
        try:
            return memo[key]
        except KeyError:
            memo[key] = value = build()
            return value


def _cached(build):
    """One :class:`Plan` per distinct arguments: a layer asks for the plan of the same shape at every call."""
    cached = functools.lru_cache(maxsize=1024)(build)

    @functools.wraps(build)
    def plan(*args):
        if torch.compiler.is_compiling():  # traced once per graph: no cache for torch.compile to look into
            return build(*args)
        try:
            return cached(*args)
        except TypeError:  # a list among the arguments (unhashable): build it afresh
            return build(*args)

    return plan


def _channel_param_view(ndim: int, channels: int) -> tuple[int, ...]:
    # (C, 1, ..., 1): broadcasts from the right against (N, C, *S).
    return (channels,) + (1,) * (ndim - 2)


@_cached
def batch_plan(shape: tuple[int, ...]) -> Plan:
    """BatchNorm: per-channel statistics over N and all spatial axes of (N, C, *S)."""
    shape = tuple(shape)
    c = shape[1]
    return Plan(
        input_shape=shape,
        view_shape=shape,
        reduce=(0,) + tuple(range(2, len(shape))),
        param_axes=(1,),
        param_shape=(c,),
        param_view=_channel_param_view(len(shape), c),
        channels=c,
    )


@_cached
def instance_plan(shape: tuple[int, ...]) -> Plan:
    """InstanceNorm: per-sample, per-channel statistics over the spatial axes of (N, C, *S)."""
    shape = tuple(shape)
    c = shape[1]
    return Plan(
        input_shape=shape,
        view_shape=shape,
        reduce=tuple(range(2, len(shape))),
        param_axes=(1,),
        param_shape=(c,),
        param_view=_channel_param_view(len(shape), c),
        channels=c,
    )


@_cached
def group_plan(shape: tuple[int, ...], num_groups: int) -> Plan:
    """GroupNorm: (N, C, *S) viewed as (N, G, C/G, *S); statistics over C/G and *S per (n, g)."""
    shape = tuple(shape)
    n, c, spatial = shape[0], shape[1], shape[2:]
    view = (n, num_groups, c // num_groups) + spatial
    return Plan(
        input_shape=shape,
        view_shape=view,
        reduce=tuple(range(2, len(view))),
        param_axes=(1, 2),
        param_shape=(c,),
        param_view=(num_groups, c // num_groups) + (1,) * len(spatial),
        channels=None,
    )


@_cached
def layer_plan(shape: tuple[int, ...], normalized_shape: tuple[int, ...]) -> Plan:
    """LayerNorm: statistics over the trailing ``len(normalized_shape)`` axes."""
    shape, normalized_shape = tuple(shape), tuple(normalized_shape)
    k = len(normalized_shape)
    axes = tuple(range(len(shape) - k, len(shape)))
    return Plan(
        input_shape=shape,
        view_shape=shape,
        reduce=axes,
        param_axes=axes,
        param_shape=normalized_shape,
        param_view=normalized_shape,
        channels=None,
    )
