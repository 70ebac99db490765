"""The benchmark's cases: which layer, on what input shape, in which memory layout and mode.

A :class:`Case` names a layer class present in both ``torch.nn`` and ``normlab.nn``; :func:`default_cases`
is the full suite, :func:`quick_cases` the same on small shapes, :func:`select` filters by substring.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["COMPOSED", "Case", "MODES", "Mode", "default_cases", "moved_bytes", "quick_cases", "select"]


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a case is run: the module's train/eval state, whether autograd records, whether to backprop."""

    name: str
    label: str
    train: bool
    grad: bool
    backward: bool


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("train_fwd", "train fwd", train=True, grad=True, backward=False),
        Mode("train_fwd_bwd", "train fwd+bwd", train=True, grad=True, backward=True),
        Mode("eval", "eval fwd", train=False, grad=False, backward=False),
    )
}
"""The modes a case can be run in, by name. ``eval`` runs under ``torch.no_grad()``."""

_MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row: ``layer(*args)`` applied to a float32 input of ``shape`` in ``layout``.

    ``layer`` names a class present in both ``torch.nn`` and ``normlab.nn`` (e.g. ``"BatchNorm2d"``);
    ``layout`` is ``"contiguous"`` or ``"channels_last"`` (4D inputs only); ``mode`` a key of
    :data:`MODES`.
    """

    layer: str
    args: tuple[Any, ...]
    shape: tuple[int, ...]
    layout: str = "contiguous"
    mode: str = "train_fwd"
    options: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments of the constructor, as (name, value) pairs."""

    def __post_init__(self) -> None:
        if self.layout not in _MEMORY_FORMATS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {sorted(_MEMORY_FORMATS)}")
        if self.layout == "channels_last" and len(self.shape) != 4:
            raise ValueError(f"channels_last applies to 4D inputs only, got shape {self.shape}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {sorted(MODES)}")

    @property
    def module(self) -> str:
        """The constructor call, e.g. ``"GroupNorm(32, 256)"``."""
        return f"{self.layer}({', '.join([*map(str, self.args), *(f'{k}={v}' for k, v in self.options)])})"

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def key(self) -> str:
        """The text ``--filter`` matches against: module, shape, layout and mode."""
        return f"{self.module} {self.shape_text} {self.layout} {self.mode}"

    def make(self, layers: ModuleType) -> nn.Module:
        """Build this case's layer from a namespace of layer classes (``torch.nn`` or ``normlab.nn``); a
        fused layer the namespace lacks (``BatchNormReLU2d`` in ``torch.nn``) is built as the composition it
        fuses (see :data:`COMPOSED`)."""
        cls = getattr(layers, self.layer, None)
        if cls is None and self.layer in COMPOSED:
            cls = _composed(self.layer, layers)
        if cls is None:
            raise AttributeError(f"{getattr(layers, '__name__', layers)!s} has no layer {self.layer!r}")
        return cls(*self.args, **dict(self.options))


COMPOSED: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "BatchNormReLU2d": ("BatchNorm2d", torch.relu),
}
"""Fused layers by name, as (the layer they start from, what follows it): where a namespace has no such
layer, its peer is that layer with the rest applied to the output, keeping the layer's parameters,
buffers and ``state_dict`` keys (torch.nn's BatchNorm2d then ``torch.relu``)."""


@functools.cache
def _composed(name: str, layers: Any) -> type[nn.Module]:
    base_name, after = COMPOSED[name]
    base = getattr(layers, base_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return after(base.forward(self, x))

    return type(name, (base,), {"forward": forward, "__doc__": f"{base_name} followed by {after.__name__}."})


def _suite(
    bn_shapes: Sequence[tuple[int, ...]],
    gn: tuple[int, tuple[int, ...]],
    ln_shapes: Sequence[tuple[int, ...]],
    fused_shapes: Sequence[tuple[int, ...]] = (),
) -> list[Case]:
    """BatchNorm in every mode and layout, GroupNorm in both layouts and LayerNorm, train fwd+bwd; the
    fused BatchNormReLU2d (against BatchNorm2d then ReLU) train fwd+bwd and eval."""
    cases: list[Case] = []
    for shape in bn_shapes:
        four_d = len(shape) == 4
        layer = "BatchNorm2d" if four_d else "BatchNorm1d"
        layouts = ("contiguous", "channels_last") if four_d else ("contiguous",)
        cases += [Case(layer, (shape[1],), shape, layout, mode) for layout in layouts for mode in MODES]
    groups, gn_shape = gn
    cases += [
        Case("GroupNorm", (groups, gn_shape[1]), gn_shape, layout, "train_fwd_bwd")
        for layout in ("contiguous", "channels_last")
    ]
    cases += [Case("LayerNorm", (shape[-1],), shape, "contiguous", "train_fwd_bwd") for shape in ln_shapes]
    cases += [Case("BatchNormReLU2d", (shape[1],), shape, "contiguous", mode)
              for shape in fused_shapes for mode in ("train_fwd_bwd", "eval")]
    return cases


def default_cases() -> list[Case]:
    """The full suite: BatchNorm on (64,64,56,56), (256,256,14,14), (32,512,7,7), (4096,1024); GroupNorm(32)
    on (32,256,28,28); LayerNorm on (64,196,768) and (4096,1024); BatchNormReLU2d on (64,64,56,56) and
    (32,512,7,7)."""
    return _suite(
        bn_shapes=[(64, 64, 56, 56), (256, 256, 14, 14), (32, 512, 7, 7), (4096, 1024)],
        gn=(32, (32, 256, 28, 28)),
        ln_shapes=[(64, 196, 768), (4096, 1024)],
        fused_shapes=[(64, 64, 56, 56), (32, 512, 7, 7)],
    )


def quick_cases() -> list[Case]:
    """The same suite on small shapes, for tests and smoke runs (a second or two)."""
    return _suite(
        bn_shapes=[(8, 16, 12, 12), (64, 32)],
        gn=(4, (4, 16, 8, 8)),
        ln_shapes=[(8, 16, 32)],
        fused_shapes=[(8, 16, 12, 12)],
    )


def select(cases: Sequence[Case], filters: Sequence[str] | None) -> list[Case]:
    """The cases whose :attr:`Case.key` contains every filter substring (case-insensitive)."""
    wanted = [f.lower() for f in filters or ()]
    return [c for c in cases if all(f in c.key.lower() for f in wanted)]


def moved_bytes(case: Case) -> int:
    """Bytes a normalization must move: forward reads x and writes y; backward reads x and dy, writes dx."""
    return _input_bytes(case) * (5 if MODES[case.mode].backward else 2)


def _input_bytes(case: Case) -> int:
    return math.prod(case.shape) * 4  # float32
