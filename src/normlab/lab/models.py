"""The networks of the lab: the sigmoid MLP (Ioffe & Szegedy), a VGG-style CNN and the deep linear
network (Santurkar et al.) and a residual net (Bjorck et al.).

Every model is a stack of :class:`Block` s: ``block.layer`` is the block's convolution or linear
map (its weight is "layer i" for the gradient probes) and ``block.post`` the normalization,
nonlinearity and pooling that follow. ``norm=`` picks the normalization:

* ``"none"``, ``"bn"`` (``normlab.nn`` batch norm), ``"bn+noise"`` (batch norm followed by
  :class:`~normlab.nn.extra.CovariateShiftNoise`), ``"noise"`` (the noise alone),
  ``"lp1"``, ``"lp2"``, ``"lpinf"`` (:class:`~normlab.nn.extra.LpBatchNorm2d` and friends with the ℓp norm
  taken before the mean is subtracted, as Santurkar et al. §3.3 put it) and ``"lp1-centred"`` etc. (the norm
  of x − μ: with p = 2 that is batch norm, a control);
* for small batches (:mod:`normlab.lab.norms`): ``"gn"``, ``"ln"``, ``"in"``, ``"ghost:v=G"``,
  ``"renorm:v=G,warmup=W,rsteps=R,dsteps=D"``.

``position="before"`` puts the normalization between the layer and the nonlinearity,
``"after"`` behind the nonlinearity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import normlab.nn as nnl
from normlab.lab.norms import SMALL_BATCH_NORMS, parse, small_batch_norm
from normlab.nn.extra import CovariateShiftNoise, LpBatchNorm1d, LpBatchNorm2d

_LP = {"lp1": 1.0, "lp2": 2.0, "lpinf": float("inf")}
_LP_CENTRED = {f"{k}-centred": p for k, p in _LP.items()}
NORMS = ("none", "bn", "bn+noise", "noise", *_LP, *_LP_CENTRED)


def make_norm(kind: str, channels: int, spatial: bool, affine: bool = True,
              noise_seed: int | None = None) -> nn.Module:
    """The normalization module for ``channels`` features (``spatial``: images ``(N, C, H, W)``)."""
    if parse(kind)[0] in SMALL_BATCH_NORMS:
        return small_batch_norm(kind, channels, spatial, affine)
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
    parts: list[nn.Module] = []
    if kind in ("bn", "bn+noise"):
        parts.append((nnl.BatchNorm2d if spatial else nnl.BatchNorm1d)(channels, affine=affine))
    elif kind in _LP or kind in _LP_CENTRED:
        centred = kind in _LP_CENTRED
        p = _LP_CENTRED[kind] if centred else _LP[kind]
        parts.append((LpBatchNorm2d if spatial else LpBatchNorm1d)(channels, p=p, affine=affine, centered=centred))
    if kind in ("bn+noise", "noise"):
        gen = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        parts.append(CovariateShiftNoise(generator=gen))
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


class Block(nn.Module):
    """``post(layer(x))``: one weight layer and what follows it."""

    def __init__(self, layer: nn.Module, *post: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.post = nn.Sequential(*post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.layer(x))


def _norm_act(norm: nn.Module, act: nn.Module, position: str) -> list[nn.Module]:
    if position not in ("before", "after"):
        raise ValueError(f"position must be 'before' or 'after', got {position!r}")
    return [norm, act] if position == "before" else [act, norm]


class Stack(nn.Module):
    """A plain chain of blocks, flattened inputs for fully connected stacks."""

    def __init__(self, blocks: list[nn.Module], flatten: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return x


def mlp(in_features: int, hidden: list[int], classes: int, norm: str, init_std: float,
        seed: int, position: str = "before", affine: bool = True) -> Stack:
    """Fully connected sigmoid network, weights ``N(0, init_std^2)``, biases zero."""
    blocks: list[nn.Module] = []
    width = in_features
    for i, h in enumerate(hidden):
        blocks.append(Block(nn.Linear(width, h),
                            *_norm_act(make_norm(norm, h, False, affine, seed + i), nn.Sigmoid(), position)))
        width = h
    blocks.append(Block(nn.Linear(width, classes)))
    model = Stack(blocks, flatten=True)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
    return model


def vgg(in_channels: int, widths: list[int], pool_after: list[int], classes: int, norm: str, seed: int,
        position: str = "before", affine: bool = True) -> Stack:
    """VGG-style CNN: 3x3 convolutions (Glorot-uniform init), ReLU, 2x2 max-pooling after the
    convolutions listed in ``pool_after`` (0-based), global average pooling, one linear classifier."""
    blocks: list[nn.Module] = []
    channels = in_channels
    for i, w in enumerate(widths):
        post = _norm_act(make_norm(norm, w, True, affine, seed + i), nn.ReLU(), position)
        if i in pool_after:
            post.append(nn.MaxPool2d(2))
        blocks.append(Block(nn.Conv2d(channels, w, 3, padding=1), *post))
        channels = w
    blocks.append(Block(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))))
    model = Stack(blocks, flatten=False)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def deep_linear(dim: int, depth: int, norm: str, seed: int) -> Stack:
    """``depth`` square bias-free linear layers (Glorot-normal init); the normalization follows
    every layer but the last."""
    blocks: list[nn.Module] = []
    for i in range(depth):
        post = [make_norm(norm, dim, False, True, seed + i)] if i < depth - 1 else []
        blocks.append(Block(nn.Linear(dim, dim, bias=False), *post))
    model = Stack(blocks, flatten=False)
    for block in model.blocks:
        nn.init.xavier_normal_(block.layer.weight)
    return model


class ResidualBlock(nn.Module):
    """``relu(x + norm(conv(relu(norm(conv(x))))))`` at constant width."""

    def __init__(self, width: int, norm: str, seed: int) -> None:
        super().__init__()
        self.layer = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, width, True, True, seed)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, width, True, True, seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.layer(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """A stem convolution, ``n_blocks`` residual blocks of constant width, global average pooling
    and a linear classifier: ``2 * n_blocks + 2`` weight layers. Kaiming-normal init (fan-in, ReLU)."""

    def __init__(self, in_channels: int, width: int, n_blocks: int, classes: int, norm: str, seed: int) -> None:
        super().__init__()
        stem = Block(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                     make_norm(norm, width, True, True, seed), nn.ReLU())
        res = [ResidualBlock(width, norm, seed + 2 * (i + 1)) for i in range(n_blocks)]
        head = Block(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)))
        self.blocks = nn.ModuleList([stem, *res, head])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_model(cfg: dict[str, Any], in_shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    """Build the model a run config describes; ``in_shape`` is one input's shape without the batch."""
    torch.manual_seed(seed)
    arch = cfg["arch"]
    norm = cfg.get("norm", "none")
    if arch == "mlp":
        in_features = 1
        for s in in_shape:
            in_features *= s
        return mlp(in_features, cfg["hidden"], classes, norm, cfg["init_std"], seed,
                   cfg.get("position", "before"), cfg.get("affine", True))
    if arch == "vgg":
        return vgg(in_shape[0], cfg["widths"], cfg["pool_after"], classes, norm, seed,
                   cfg.get("position", "before"), cfg.get("affine", True))
    if arch == "dln":
        return deep_linear(in_shape[0], cfg["depth"], norm, seed)
    if arch == "resnet":
        return ResNet(in_shape[0], cfg["width"], cfg["blocks"], classes, norm, seed)
    if arch == "seq-transformer":
        from normlab.lab.transformer import SequenceClassifier

        return SequenceClassifier(in_shape[-1], in_shape[-2], classes, cfg["width"], cfg["depth"], cfg["heads"],
                                  norm, cfg["min_len"])
    raise ValueError(f"unknown architecture {arch!r}")
