r"""Ghost batch normalization layers (Hoffer et al. 2017), drop-in where ``torch.nn.BatchNorm1d/2d/3d`` stand.

With batch statistics (training), the batch is cut along N into virtual batches of
``virtual_batch_size`` samples — the last one holds the rest when it does not divide N — and each is
normalized with its own per-channel statistics,

.. math::
    y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \cdot \gamma + \beta
    \quad\text{for } x \text{ in virtual batch } g,

exactly as BatchNorm applied to each chunk (outputs and gradients), in one pass per part rather than a
loop over chunks (:mod:`normlab.core.ghost`). The running statistics are updated once per step with
the full batch's mean and unbiased variance (the exact merge of the virtual batches' statistics), as
BatchNorm on the whole batch would update them; eval mode is ordinary BatchNorm with them. A batch of
at most ``virtual_batch_size`` samples is one virtual batch: plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab import functional as F
from normlab.core import checks
from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.conventions import DEFAULT, given
from normlab.nn.layouts import LAYOUTS, variant_doc
from normlab.nn.once import may_update

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = DEFAULT,
                 momentum: float | None = DEFAULT, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, convention: str = "torch", guard_stats: bool | None = None) -> None:
        self.virtual_batch_size = virtual_batch_size
        super().__init__(num_features, affine=affine, track_running_stats=track_running_stats, device=device,
                         dtype=dtype, convention=convention, guard_stats=guard_stats,
                         **given(eps=eps, momentum=momentum))

    def _check_config(self) -> None:
        super()._check_config()
        checks.check_virtual_batch_size(self.virtual_batch_size, type(self).__name__)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        training, tracking = self.training, self.track_running_stats
        if not (training or not tracking) or input.shape[0] <= self.virtual_batch_size:
            return self._normalize(input)  # running statistics, or a single virtual batch: BatchNorm
        name = type(self).__name__
        self._check_config()
        checks.check_floating(input, name)
        checks.check_ndim(input, name, self._ranks, self._layout)
        checks.check_channels(input, self.num_features, name)
        # Not on a checkpointed segment's recomputation, nor after the first call inside update_once.
        updating = training and tracking and may_update(self)
        running_mean = self.running_mean if updating else None
        running_var = self.running_var if updating else None
        momentum = self._update_factor() if updating else 0.0
        skipped = getattr(self, "num_batches_skipped", 0)
        y = F._ghost_batch_norm(name, input, self.virtual_batch_size, running_mean, running_var, self.weight,
                                self.bias, True, momentum, self.eps, **self._guarded_update())
        if updating and self.num_batches_skipped == skipped:
            self._count_batch(input)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


_WHAT, _FAMILY, _MODULE = "Ghost batch normalization", "GhostBatchNorm", "normlab.nn.ghost"


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    __doc__ = variant_doc(_WHAT, _FAMILY, _MODULE, "1d", """
num_features: C.
virtual_batch_size: samples per virtual batch (a positive integer).
eps, momentum, affine, track_running_stats, guard_stats, convention: as in :class:`~normlab.nn.BatchNorm1d`.""", """
>>> bn = nn.GhostBatchNorm1d(100, virtual_batch_size=32)
>>> y = bn(torch.randn(200, 100))      # virtual batches of 32, 32, 32, 32, 32, 32 and 8""")
    _ranks, _layout, _ = LAYOUTS["1d"]


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    __doc__ = variant_doc(_WHAT, _FAMILY, _MODULE, "2d", example="""
>>> bn = nn.GhostBatchNorm2d(16, virtual_batch_size=8)
>>> y = bn(torch.randn(64, 16, 8, 8))""")
    _ranks, _layout, _ = LAYOUTS["2d"]


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    __doc__ = variant_doc(_WHAT, _FAMILY, _MODULE, "3d")
    _ranks, _layout, _ = LAYOUTS["3d"]
