"""BatchNorm2d fused with the ReLU (and residual add) that follows it in a ResNet block.

Both layers subclass :class:`normlab.nn.BatchNorm2d`, so arguments, parameters, running statistics,
``state_dict`` keys and train/eval behaviour are exactly BatchNorm2d's: a checkpoint of
``Sequential(BatchNorm2d(c), ReLU())`` loads into ``BatchNormReLU2d(c)`` under the BatchNorm's keys.
The result and gradients are those of the composition with :func:`torch.relu`; where the backend fuses
it (:func:`normlab.functional.batch_norm_relu`) the whole tail is one pass over memory forward and one
closed-form pass backward.
"""

from __future__ import annotations

import torch

from normlab.nn.batchnorm import BatchNorm2d

__all__ = ["BatchNormReLU2d", "BatchNormAddReLU2d"]


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))`` in one layer.

    Example::

        >>> import normlab.nn as nn
        >>> layer = nn.BatchNormReLU2d(16)
        >>> y = layer(torch.randn(8, 16, 32, 32))
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalize(input, relu=True)


class BatchNormAddReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x) + residual)`` in one layer: the end of a ResNet basic block.

    ``residual`` broadcasts against the normalized ``x`` as in ``y + residual``.

    Example::

        >>> import normlab.nn as nn
        >>> layer = nn.BatchNormAddReLU2d(16)
        >>> x = torch.randn(8, 16, 32, 32)
        >>> y = layer(x, residual=x)
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._normalize(input, relu=True, residual=residual)
