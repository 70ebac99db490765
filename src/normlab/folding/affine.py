"""The algebra of folding: BN at inference as an affine map, and that map moved into a neighbouring layer.

In eval mode a BN layer computes, per channel c::

    y = (x − μ_c) · a_c + β_c,      a_c = γ_c / sqrt(σ²_c + ε)     (μ, σ²: running statistics)

i.e. y = a_c · x + b_c with b_c = β_c − a_c μ_c. Every function here computes in float64 and stores the
result in the layer's own dtype.

BN after a layer (``bn(layer(x))``), with ``W[o]`` the weights that make output channel ``o``::

    W'[o] = a_o · W[o],     bias'[o] = a_o · bias[o] + b_o

which holds for any stride, padding, dilation, groups and padding_mode, for Conv1d/2d/3d, Linear and
ConvTranspose1d/2d/3d (whose weight is laid out (in, out/groups, *k): output channel o = g·out/groups + j
is the slice ``[g·in/groups : (g+1)·in/groups, j]``).

BN before a layer (``layer(bn(x))``), with ``W[o, i]`` the weights reading input channel ``i``::

    W'[o, i] = W[o, i] · a_i,     bias'[o] = bias[o] + Σ_{i, k} W[o, i, k] · b_i

This is exact only where every weight of every output meets a normalized value: for Linear, and for a
Conv whose padding is zero or copies values (padding_mode ``reflect``, ``replicate``, ``circular``: the
padding of a·x + b is a·pad(x) + b). Zero padding of a > 0 width puts zeros where the original saw BN's
output, so a border output would gain Σ W·b for taps that read padding: not folded. Nor into a
ConvTranspose, whose border outputs receive fewer input terms than the others.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from normlab.freeze import is_plain_batchnorm
from normlab.nn.frozen import FrozenBatchNorm

__all__ = ["EvalAffine", "bn_like", "bn_affine", "not_affine_reason", "fold_after", "fold_before",
           "after_reason", "before_reason"]

FOLDABLE = (_ConvNd, nn.Linear)


class EvalAffine(nn.Module):
    """The eval-mode map of a BN layer that could not be folded: ``y = (x − mean) · scale + bias`` per
    channel (axis 1). Kept about the mean, as BN computes, so that data with a large mean keeps its digits."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) * self.scale.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}"


def bn_like(m: nn.Module) -> bool:
    """A BN layer of any kind: torch.nn's ``_BatchNorm`` (normlab's, SyncBatchNorm, ...) or frozen."""
    return isinstance(m, (_BatchNorm, FrozenBatchNorm))


def not_affine_reason(bn: nn.Module) -> str | None:
    """Why ``bn`` in eval mode is not an affine map, or ``None`` when it is."""
    if isinstance(bn, _BatchNorm) and not is_plain_batchnorm(bn):
        return f"{type(bn).__name__} computes more than batch normalization (its class overrides forward)"
    if getattr(bn, "running_mean", None) is None:
        return "it keeps no running statistics (track_running_stats=False), so it normalizes with batch statistics"
    return None


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, a, beta)`` in float64: the eval-mode map is y = (x − mean) · a + beta."""
    mean = bn.running_mean.detach().double()
    a = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    beta = torch.zeros_like(mean)
    if bn.weight is not None:
        a = a * bn.weight.detach().double()
    if bn.bias is not None:
        beta = bn.bias.detach().double()
    return mean, a, beta


def eval_affine(bn: nn.Module) -> EvalAffine:
    mean, a, beta = bn_affine(bn)
    dtype = bn.running_mean.dtype
    return EvalAffine(mean.to(dtype), a.to(dtype), beta.to(dtype))


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def after_reason(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn(layer(x))`` cannot fold into ``layer``, or ``None``."""
    if not isinstance(layer, FOLDABLE):
        return f"its input comes from {type(layer).__name__}, not a convolution or linear layer"
    if _out_channels(layer) != bn.num_features:
        return f"{type(layer).__name__} has {_out_channels(layer)} outputs, BN {bn.num_features} channels"
    return None


def before_reason(bn: nn.Module, layer: nn.Module) -> str | None:
    """Why ``layer(bn(x))`` cannot fold into ``layer`` exactly, or ``None`` (see the module docstring)."""
    if not isinstance(layer, FOLDABLE):
        return f"its output goes to {type(layer).__name__}, not a convolution or linear layer"
    if isinstance(layer, _ConvTransposeNd):
        return "its output goes to a transposed convolution, whose border outputs receive fewer input terms"
    if _in_channels(layer) != bn.num_features:
        return f"{type(layer).__name__} reads {_in_channels(layer)} channels, BN has {bn.num_features}"
    if isinstance(layer, _ConvNd) and layer.padding_mode == "zeros" and any(
            p != 0 for p in layer._reversed_padding_repeated_twice):
        return ("the next convolution pads with zeros, where it would see BN's shift after folding "
                "(exact only without padding or with padding_mode reflect/replicate/circular)")
    return None


def _bcast(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * dims)


@torch.no_grad()
def _store(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write float64 ``weight``/``bias`` into ``layer`` in its dtype (a bias is added where it had none)."""
    w = layer.weight
    w.copy_(weight.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _bias64(layer: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(n) if layer.bias is None else layer.bias.detach().double()


def fold_after(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into the layer before it, in place: ``layer`` then computes ``bn(layer(x))``."""
    mean, a, beta = bn_affine(bn)
    b = beta - a * mean
    w = layer.weight.detach().double()
    if isinstance(layer, _ConvTransposeNd):
        g = layer.groups
        k = w.dim() - 2
        wg = w.reshape((g, w.shape[0] // g) + tuple(w.shape[1:]))
        w = (wg * _bcast(a.reshape(g, 1, -1), k)).reshape(w.shape)
    else:
        w = w * _bcast(a, w.dim() - 1)
    _store(layer, w, a * _bias64(layer, a.numel(), w) + b)


def fold_before(bn: nn.Module, layer: nn.Module) -> None:
    """Fold ``bn`` into the layer after it, in place: ``layer`` then computes ``layer(bn(x))``."""
    mean, a, beta = bn_affine(bn)
    b = beta - a * mean
    w = layer.weight.detach().double()
    out = w.shape[0]
    groups = getattr(layer, "groups", 1)
    per_group = w.shape[1]
    # the input channel that weight [o, i] reads: (o // (out/groups)) · (in/groups) + i
    a_full = a.reshape(groups, per_group).repeat_interleave(out // groups, dim=0)
    b_full = b.reshape(groups, per_group).repeat_interleave(out // groups, dim=0)
    spatial = w.dim() - 2
    taps = w.sum(dim=tuple(range(2, w.dim()))) if spatial else w
    bias = _bias64(layer, out, w) + (taps * b_full).sum(dim=1)
    _store(layer, w * _bcast(a_full, spatial), bias)
