"""The lab's normalizations for small and unusual batches, named by a run config's ``norm`` string.

``"gn"``, ``"ln"``, ``"in"``: Group Norm with groups of 4 channels, Layer Norm (one group: every channel and
position of a sample), Instance Norm (one channel per group, with a per-channel affine), as Wu & He 2018
compare them; all three are :class:`normlab.nn.GroupNorm` on images and :class:`normlab.nn.LayerNorm` on
features.

``"ghost:v=G"``: BatchNorm whose statistics come from virtual batches of G samples
(:class:`normlab.nn.GhostBatchNorm2d`) — Wu & He's "BN with a per-GPU batch of G", inside a fixed batch.

``"renorm:v=G,warmup=W,rsteps=R,dsteps=D"``: batch renormalization (r_max 3 and d_max 5 reached at R and
D steps after a plain-BatchNorm warm-up of W steps) over virtual batches of G samples (:class:`VirtualRenorm`),
as Ioffe 2017 normalizes "over 4 examples".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import normlab.nn as nnl

__all__ = ["SMALL_BATCH_NORMS", "VirtualRenorm", "parse", "small_batch_norm"]

SMALL_BATCH_NORMS = ("gn", "ln", "in", "ghost", "renorm")
GN_CHANNELS = 4
"""Channels per group of the lab's Group Norm."""


def parse(kind: str) -> tuple[str, dict[str, int]]:
    """``"renorm:v=4,warmup=10"`` → ``("renorm", {"v": 4, "warmup": 10})``."""
    name, _, rest = kind.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = int(value)
    return name, options


class VirtualRenorm(nn.Module):
    """Batch renormalization over virtual batches of ``virtual_batch_size`` samples, as Ioffe 2017's workers
    apply it to their own few examples with moving averages they share: every virtual batch g is normalized
    with its own statistics and corrected by its own r_g, d_g, all from the running statistics as the step
    found them; the running statistics are then updated once, with the whole batch's.

    Computed as :class:`normlab.nn.GhostBatchNorm2d` without affine (x̂ per virtual batch, its backward,
    the one running update), times r_g plus d_g (constants: taken without gradient from the virtual
    batches' statistics before the update), then γ and β. r_max and d_max follow the schedule of
    :class:`normlab.nn.BatchRenorm2d` on the step count. The batch must be whole virtual batches."""

    def __init__(self, channels: int, virtual_batch_size: int, spatial: bool, momentum: float = 0.1,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000, r_max_steps: int = 40000,
                 d_max_steps: int = 25000) -> None:
        super().__init__()
        ghost = nnl.GhostBatchNorm2d if spatial else nnl.GhostBatchNorm1d
        self.bn = ghost(channels, virtual_batch_size, momentum=momentum, affine=False)
        self.schedule = nnl.BatchRenorm1d(1, r_max=r_max, d_max=d_max, warmup_steps=warmup_steps,
                                          r_max_steps=r_max_steps, d_max_steps=d_max_steps)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, view = x.shape[1], (1, -1) + (1,) * (x.dim() - 2)
        v = self.bn.virtual_batch_size
        if self.training:
            if x.shape[0] % v:
                raise ValueError(f"VirtualRenorm: a batch of {x.shape[0]} is not whole virtual batches of {v}")
            r_max, d_max = self.schedule.limits(int(self.bn.num_batches_tracked))
            with torch.no_grad():
                groups = x.reshape(x.shape[0] // v, v, c, -1)
                var, mean = torch.var_mean(groups, dim=(1, 3), correction=0)  # (G, C)
                sigma = torch.sqrt(self.bn.running_var + self.bn.eps)
                r = (torch.sqrt(var + self.bn.eps) / sigma).clamp(1 / r_max, r_max)
                d = ((mean - self.bn.running_mean) / sigma).clamp(-d_max, d_max)
            xhat = self.bn(x).reshape(groups.shape) * r[:, None, :, None] + d[:, None, :, None]
            xhat = xhat.reshape(x.shape)
        else:
            xhat = self.bn(x)
        return xhat * self.weight.reshape(view) + self.bias.reshape(view)


def small_batch_norm(kind: str, channels: int, spatial: bool, affine: bool = True) -> nn.Module:
    """The module a ``norm`` string of this module's docstring names."""
    name, o = parse(kind)
    if name == "gn":
        groups = max(1, channels // GN_CHANNELS)
        return nnl.GroupNorm(groups, channels, affine=affine) if spatial else nnl.LayerNorm(channels)
    if name == "ln":
        return nnl.GroupNorm(1, channels, affine=affine) if spatial else nnl.LayerNorm(channels)
    if name == "in":
        if not spatial:
            raise ValueError("Instance Norm needs spatial input (images)")
        return nnl.GroupNorm(channels, channels, affine=affine)
    if name == "ghost":
        return (nnl.GhostBatchNorm2d if spatial else nnl.GhostBatchNorm1d)(channels, o["v"], affine=affine)
    if name == "renorm":
        schedule = {"warmup_steps": o.get("warmup", 0), "r_max_steps": o.get("rsteps", 0),
                    "d_max_steps": o.get("dsteps", 0)}
        return VirtualRenorm(channels, o["v"], spatial, **schedule)
    raise ValueError(f"unknown small-batch norm {kind!r}; choose one of {', '.join(SMALL_BATCH_NORMS)}")
