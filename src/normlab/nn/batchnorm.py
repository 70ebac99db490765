"""Batch normalization layers, drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

They subclass the torch classes, so constructor arguments, attributes, parameters, buffers,
``state_dict`` keys and ``isinstance`` checks are exactly torch's; ``forward`` runs normlab's engine.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab import functional as F
from normlab.core import checks
from normlab.core.plan import batch_plan

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _RunningStatsMixin:
    """Shared by BatchNorm and InstanceNorm: eps and momentum are checked at construction and per call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_config()

    def _check_config(self) -> None:
        name = type(self).__name__
        checks.check_eps(self.eps, name)
        checks.check_momentum(self.momentum, name, allow_none=True)


class _BatchNorm(_RunningStatsMixin):
    _ranks: tuple[int, ...] = ()
    _layout = ""

    def _update_factor(self) -> float:
        """Weight of this batch in the running average: ``momentum``, or 1/t for momentum=None."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked.item() + 1)
        return float(self.momentum)

    def _count_batch(self, x: torch.Tensor) -> None:
        if x.numel() > 0:
            self.num_batches_tracked.add_(1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalize(input)

    def _normalize(self, input: torch.Tensor, **epilogue) -> torch.Tensor:
        """Check ``input``, normalize it with this layer's state and mode (``epilogue``: ``relu=True`` and
        an optional ``residual``, as in :func:`~normlab.functional.batch_norm_relu`), count the batch.
        Errors name the layer."""
        name = type(self).__name__
        self._check_config()
        checks.check_floating(input, name)
        checks.check_ndim(input, name, self._ranks, self._layout)
        checks.check_channels(input, self.num_features, name)
        training, tracking = self.training, self.track_running_stats
        updating = training and tracking
        factor = self._update_factor() if updating else 0.0
        running_mean = self.running_mean if not training or tracking else None
        running_var = self.running_var if running_mean is not None else None
        y = F._run(
            name, input, batch_plan(input.shape), self.weight, self.bias, self.eps, running_mean, running_var,
            training or running_mean is None, factor,
            checks.BN_SUGGESTION if tracking else checks.BN_NO_RUNNING_SUGGESTION,
            eps_positive=training or running_mean is None, **epilogue,
        )
        if updating:
            self._count_batch(input)
        return y


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    r"""Batch normalization over a 2D input (N, C) or 3D input (N, C, L).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training, E[x] and Var[x] are the per-channel mean and *biased* variance of the batch, over N
    (and L). The running estimates are updated as
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the *unbiased* variance; with
    ``momentum=None`` they are the cumulative average over ``num_batches_tracked`` batches. In eval mode
    the running estimates are used (unless ``track_running_stats=False``, in which case batch statistics
    are always used). γ (``weight``) starts at 1 and β (``bias``) at 0. An empty batch (N = 0) gives an
    empty output and leaves the running estimates and ``num_batches_tracked`` unchanged (torch.nn counts
    it as a batch, which skews the cumulative average of ``momentum=None``).

    Under ``torch.func.vmap`` the running estimates behave as for torch.nn's BatchNorm (torch.func docs,
    "Patching Batch Norm"): in training they cannot take per-example statistics, so the call raises
    torch's RuntimeError and leaves them unchanged; use eval mode, ``track_running_stats=False`` or
    ``torch.func.replace_all_batch_norm_modules_(model)``. Forward-mode AD, batched gradients and the
    other ``torch.func`` transforms work as for torch.nn.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for stability (>= 0; > 0 to normalize with the batch's statistics, as
            torch.nn requires). Default 1e-5.
        momentum: weight of the new batch in the running estimates, in [0, 1], or None. Default 0.1.
        affine: learn γ and β. Default True.
        track_running_stats: keep running estimates for eval mode. Default True.

    Shape: input (N, C) or (N, C, L); output the same shape.

    Example::

        >>> import normlab.nn as nn
        >>> bn = nn.BatchNorm1d(100)
        >>> y = bn(torch.randn(20, 100))
    """

    _ranks = (2, 3)
    _layout = "of shape (N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    r"""Batch normalization over a 4D input (N, C, H, W): per-channel statistics over (N, H, W).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Arguments, running statistics and train/eval behaviour are those of :class:`BatchNorm1d`.
    channels_last inputs give channels_last outputs.

    Shape: input (N, C, H, W); output the same shape.

    Example::

        >>> import normlab.nn as nn
        >>> bn = nn.BatchNorm2d(16)
        >>> y = bn(torch.randn(8, 16, 32, 32))
    """

    _ranks = (4,)
    _layout = "of shape (N, C, H, W)"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    r"""Batch normalization over a 5D input (N, C, D, H, W): per-channel statistics over (N, D, H, W).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Arguments, running statistics and train/eval behaviour are those of :class:`BatchNorm1d`.

    Shape: input (N, C, D, H, W); output the same shape.

    Example::

        >>> import normlab.nn as nn
        >>> bn = nn.BatchNorm3d(4)
        >>> y = bn(torch.randn(2, 4, 3, 8, 8))
    """

    _ranks = (5,)
    _layout = "of shape (N, C, D, H, W)"
