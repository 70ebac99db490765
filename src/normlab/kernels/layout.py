"""How a :class:`~normlab.core.plan.Plan` maps onto the kernels' flat views of memory.

Two shapes of plan cover the whole family:

* **channel** — BatchNorm: the view is the input, statistics over every axis but 1 (the channel),
  γ and β along the channel. Contiguous (N, C, *S) data is seen as (N, C, S); 2D input and
  channels_last data as (M, C) rows with C contiguous.
* **row** — GroupNorm, InstanceNorm, LayerNorm: statistics over the trailing axes of the view from
  some axis ``k`` on, so contiguous data is R = prod(view[:k]) rows of K = prod(view[k:]) values.
  γ and β vary along at most the last leading axis (GroupNorm's groups, InstanceNorm's channels:
  ``groups``) and a prefix of the reduced axes (GroupNorm's channels within a group, LayerNorm's
  normalized axes: ``per_row``), so value j of row r is scaled by parameter
  ``(r mod groups) · per_row + j // (K / per_row)``. With channels_last data and k = 2 the same
  statistics are computed on (N, S, C).

Plans of any other shape are not handled by the kernels.

Each shape is read from memory in one of four *families* (:func:`family`), the same names in every
backend: :data:`CHANNEL_PLANES`, :data:`CHANNEL_ROWS`, :data:`ROW` and :data:`ROW_CHANNELS_LAST`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from normlab.core.plan import Plan

CHANNEL_PLANES = "channel_planes"
"""A channel shape on contiguous (N, C, S) data with S > 1: each channel N runs of S values, C·S apart."""
CHANNEL_ROWS = "channel_rows"
"""A channel shape read as (M, C) rows with C contiguous: 2D input, channels_last data, 1x1 maps."""
ROW = "row"
"""A row shape on contiguous data: R rows of K contiguous values."""
ROW_CHANNELS_LAST = "row_channels_last"
"""A row shape with one parameter per channel (GroupNorm, InstanceNorm: ``lead == 2``, a run of every
spatial value) on channels_last data, read as (N, S, C) in place."""


@dataclass(frozen=True)
class ChannelShape:
    """A BatchNorm plan: ``n`` samples, ``channels`` channels, ``spatial`` values per sample and channel."""

    n: int
    channels: int
    spatial: int


@dataclass(frozen=True)
class RowShape:
    """A per-row plan: ``rows`` statistics of ``size`` values each; see the module docstring."""

    rows: int
    size: int
    groups: int
    per_row: int
    lead: int

    @property
    def run(self) -> int:
        """Consecutive values of a row that share one parameter (H·W for GroupNorm, 1 for LayerNorm)."""
        return self.size // self.per_row


def classify(plan: Plan) -> ChannelShape | RowShape | None:
    """The kernel shape of ``plan``, or ``None`` when its axes fit neither (computed once per plan)."""
    return plan.memo("kernel_shape", lambda: _classify(plan))


def _classify(plan: Plan) -> ChannelShape | RowShape | None:
    view, ndim = plan.view_shape, len(plan.view_shape)
    if plan.view_shape == plan.input_shape and plan.param_axes == (1,) and plan.reduce == (0, *range(2, ndim)):
        return ChannelShape(view[0], view[1], math.prod(view[2:]))
    if not plan.reduce or plan.reduce != tuple(range(plan.reduce[0], ndim)):
        return None
    k = plan.reduce[0]
    lead = tuple(a for a in plan.param_axes if a < k)
    inner = tuple(a for a in plan.param_axes if a >= k)
    if lead not in ((), (k - 1,)) or inner != tuple(range(k, k + len(inner))):
        return None
    return RowShape(
        rows=math.prod(view[:k]),
        size=math.prod(view[k:]),
        groups=math.prod(view[a] for a in lead),
        per_row=math.prod(view[a] for a in inner),
        lead=k,
    )


def family(plan: Plan, channels_last: bool) -> str:
    """How the kernels read an input of ``plan`` (``channels_last``: stored so, see
    :func:`normlab.core.conventions.is_channels_last`); ``plan`` must be one :func:`classify` handles. A
    backend without kernels for :data:`ROW_CHANNELS_LAST` copies such input to contiguous and reads it as
    :data:`ROW`."""
    shape = classify(plan)
    if isinstance(shape, ChannelShape):
        return CHANNEL_ROWS if channels_last or shape.spatial == 1 else CHANNEL_PLANES
    if channels_last and shape.lead == 2 and shape.run == math.prod(plan.input_shape[2:]):
        return ROW_CHANNELS_LAST
    return ROW
