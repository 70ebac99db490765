"""Batch normalization with fixed statistics: FrozenBatchNorm1d/2d/3d, for fine-tuning.

Fine-tuning with small batches on a new task usually keeps a pre-trained model's BN statistics as they
are. With torch.nn's layers that means calling ``.eval()`` on every BN layer, which the next
``model.train()`` silently undoes. A frozen layer always computes the eval-mode map::

    y = (x − running_mean) / sqrt(running_var + eps) · γ + β

whatever its mode, through the same engine as :class:`normlab.nn.BatchNorm2d` in eval mode. Its
statistics never change; γ and β are trainable only if asked for. Its parameters, buffers and
``state_dict`` keys (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``)
are those of torch.nn's BatchNorm, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab import functional as F
from normlab.core import checks

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    """Frozen batch normalization of (N, C, *S), any number of spatial axes (what a frozen SyncBatchNorm
    becomes); the base of FrozenBatchNorm1d/2d/3d, which check the rank of their input too."""

    _ranks: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 trainable_affine: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        checks.check_eps(eps, type(self).__name__)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory), requires_grad=trainable_affine)
            self.bias = nn.Parameter(torch.zeros(num_features, **factory), requires_grad=trainable_affine)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, trainable_affine: bool = False) -> "FrozenBatchNorm":
        """A frozen layer sharing ``bn``'s very parameters and buffers (not copies). ``bn`` must keep
        running statistics. With ``trainable_affine=False`` γ and β stop requiring gradients."""
        name = type(bn).__name__
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"{cls.__name__}: {name} keeps no running statistics (track_running_stats=False), "
                             f"so there are no statistics to freeze.")
        frozen = cls(bn.num_features, eps=bn.eps, affine=False, device="meta")
        frozen.affine = bn.affine
        frozen._parameters = {"weight": bn.weight, "bias": bn.bias}
        frozen._buffers = {k: bn._buffers[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
        if not trainable_affine:
            for p in (bn.weight, bn.bias):
                if p is not None:
                    p.requires_grad_(False)
        frozen.train(bn.training)
        return frozen

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        checks.check_floating(input, name)
        if self._ranks:
            checks.check_ndim(input, name, self._ranks, self._layout)
        else:
            checks.check_min_ndim(input, name, 2, "of shape (N, C, *spatial)")
        checks.check_channels(input, self.num_features, name)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)

    def extra_repr(self) -> str:
        trainable = self.weight is not None and self.weight.requires_grad
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, trainable_affine={trainable}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen batch normalization of (N, C) or (N, C, L): the eval-mode map of :class:`BatchNorm1d`
    in every mode.

    Args:
        num_features: C.
        eps: added to the variance (> 0). Default 1e-5.
        affine: has γ (``weight``) and β (``bias``). Default True.
        trainable_affine: γ and β require gradients (the statistics stay fixed). Default False.

    >>> import torch, normlab.nn as nl
    >>> bn = nl.FrozenBatchNorm1d(4).train()
    >>> torch.allclose(bn(torch.ones(2, 4)), torch.ones(2, 4) / (1 + 1e-5) ** 0.5)
    True
    """

    _ranks = (2, 3)
    _layout = "of shape (N, C) or (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen batch normalization of (N, C, H, W); see :class:`FrozenBatchNorm1d`."""

    _ranks = (4,)
    _layout = "of shape (N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen batch normalization of (N, C, D, H, W); see :class:`FrozenBatchNorm1d`."""

    _ranks = (5,)
    _layout = "of shape (N, C, D, H, W)"
