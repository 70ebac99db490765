"""Instance normalization layers, drop-in for ``torch.nn.InstanceNorm1d/2d/3d``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from normlab import functional as F
from normlab.core import checks
from normlab.core.plan import instance_plan
from normlab.nn.base import _NormBase
from normlab.nn.once import may_update

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(_NormBase):
    _spatial = 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        self._check_config()
        checks.check_floating(input, name)
        batched = self._spatial + 2
        shape = "(N, C, " + ", ".join("DHW"[3 - self._spatial:]) + ")" if self._spatial > 1 else "(N, C, L)"
        checks.check_ndim(input, name, (batched - 1, batched), f"of shape {shape} or the same without N")
        unbatched = input.dim() == batched - 1
        channel_dim = 0 if unbatched else 1
        if input.shape[channel_dim] != self.num_features:
            if self.affine or self.track_running_stats:
                checks.check_channels(input, self.num_features, name, dim=channel_dim)
            warnings.warn(
                f"{name}: input's size at dim={channel_dim} does not match num_features ({input.shape[channel_dim]} "
                f"channels, num_features={self.num_features}). You can silence this warning by not passing in "
                f"num_features, which is not used because affine=False and track_running_stats=False.",
                stacklevel=2,
            )
        x = input.unsqueeze(0) if unbatched else input
        # As in torch.nn: momentum=None leaves InstanceNorm's running statistics unchanged. Not updated on a
        # checkpointed segment's recomputation, nor after the first call inside update_once.
        batch_stats = self.training or not self.track_running_stats
        running = not batch_stats or not self.track_running_stats or may_update(self)
        # The input is checked above (floating, its rank): the one entry checks the rest, once.
        y = F.normalize_with_plan(
            "instance_norm", x, instance_plan(x.shape), self.weight, self.bias, self.eps,
            self.running_mean if running else None, self.running_var if running else None, batch_stats,
            0.0 if self.momentum is None else self.momentum, checks.IN_SUGGESTION,
            guard=getattr(self, "guard_stats", None), on_skip=self._skipped_batch,
        )
        return y.squeeze(0) if unbatched else y


_DOC = r"""Instance normalization over a {rank}D input {shape}: statistics per sample and channel over the
    spatial axes.

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \cdot \gamma + \beta

    Args:
        num_features: C. eps: >= 0, default 1e-5. momentum: default 0.1 (None leaves the running estimates unchanged, as in torch.nn).
        affine: learn per-channel γ, β (default False, as in torch.nn).
        track_running_stats: keep running estimates (the batch average of the per-instance statistics)
            and use them in eval mode (default False).

    Shape: {shape}, or the same without N; output the same shape.

    Example::

        >>> import normlab.nn as nn
        >>> norm = nn.{name}(3, affine=True)
        >>> y = norm(torch.randn({example}))
"""


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _DOC.format(rank=3, shape="(N, C, L)", name="InstanceNorm1d", example="4, 3, 10")
    _spatial = 1


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _DOC.format(rank=4, shape="(N, C, H, W)", name="InstanceNorm2d", example="4, 3, 8, 8")
    _spatial = 2


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _DOC.format(rank=5, shape="(N, C, D, H, W)", name="InstanceNorm3d", example="2, 3, 4, 8, 8")
    _spatial = 3
