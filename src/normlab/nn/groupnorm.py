"""Layer and group normalization, drop-in for ``torch.nn.LayerNorm`` and ``torch.nn.GroupNorm``."""

from __future__ import annotations

import torch
from torch import nn

from normlab import functional as F
from normlab.core import checks

__all__ = ["LayerNorm", "GroupNorm"]


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization over the trailing dimensions given by ``normalized_shape``.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and biased variance are taken per sample over the last ``len(normalized_shape)``
    dimensions; γ and β have shape ``normalized_shape`` (elementwise). The statistics do not depend on
    the batch, so train and eval mode compute the same thing and there are no running estimates.

    Args:
        normalized_shape: int or shape of the trailing dimensions to normalize over.
        eps: >= 0, default 1e-5.
        elementwise_affine: learn γ (and β). Default True.
        bias: learn β too (when ``elementwise_affine``). Default True.

    Shape: input (*, *normalized_shape); output the same shape.

    Example::

        >>> import normlab.nn as nn
        >>> ln = nn.LayerNorm(512)
        >>> y = ln(torch.randn(8, 20, 512))
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        checks.check_eps(self.eps, type(self).__name__)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    r"""Group normalization of (N, C, *) over groups of channels.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The C channels are split into ``num_groups`` groups of C / num_groups consecutive channels; mean
    and biased variance are taken per sample and group over the group's channels and all spatial
    positions. γ and β are per channel. ``num_groups=1`` is LayerNorm over (C, *) with per-channel
    affine; ``num_groups=C`` is InstanceNorm. Independent of the batch size, so the same in train and eval.

    Args:
        num_groups: number of groups; must divide ``num_channels``.
        num_channels: C.
        eps: >= 0, default 1e-5.
        affine: learn per-channel γ and β. Default True.

    Shape: input (N, C, *); output the same shape.

    Example::

        >>> import normlab.nn as nn
        >>> gn = nn.GroupNorm(4, 32)
        >>> y = gn(torch.randn(2, 32, 16, 16))
    """

    def __init__(self, num_groups: int, num_channels: int, *args, **kwargs):
        name = type(self).__name__
        checks.check_groups(num_groups, num_channels, name)
        super().__init__(num_groups, num_channels, *args, **kwargs)
        checks.check_eps(self.eps, name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        checks.check_floating(input, name)
        checks.check_min_ndim(input, name, 2, "of shape (N, C, *)")
        checks.check_channels(input, self.num_channels, name, "num_channels")
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
