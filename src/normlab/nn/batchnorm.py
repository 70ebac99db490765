"""Batch normalization layers, drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

They subclass the torch classes, so constructor arguments, attributes, parameters, buffers,
``state_dict`` keys and ``isinstance`` checks are exactly torch's; ``forward`` runs normlab's engine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad as _forward_ad

from normlab import functional as F
from normlab.core import checks
from normlab.core.plan import batch_plan
from normlab.nn.base import _GuardedStats, _NormBase  # noqa: F401  (_GuardedStats: its former home)
from normlab.nn.conventions import CONVENTIONS, convention_args
from normlab.nn.once import may_update

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "MaskedBatchNorm1d"]


_RunningStatsMixin = _NormBase
"""The former name of :class:`normlab.nn.base._NormBase`."""


class _BatchNorm(_NormBase):
    _ranks: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, *args, convention: str = "torch", **kwargs):
        args, kwargs = convention_args(convention, type(self).__name__, args, kwargs)
        super().__init__(*args, **kwargs)
        self.convention = convention

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if getattr(self, "convention", "torch") == "torch" else f"{text}, convention={self.convention!r}"

    def _guarded_update(self) -> dict:
        """How this layer's running update is made, as :mod:`normlab.functional`'s private calls take it:
        guarded per ``guard_stats`` (a skip counted and warned once, :meth:`_skipped_batch`), the running
        variance biased or not per ``convention``."""
        return dict(guard=getattr(self, "guard_stats", None), on_skip=self._skipped_batch,
                    unbiased=not CONVENTIONS[getattr(self, "convention", "torch")].biased_running_var)

    def _update_factor(self) -> float:
        """Weight of this batch in the running average: ``momentum``, or 1/t for momentum=None."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked.item() + 1)
        return float(self.momentum)

    def _count_batch(self, x: torch.Tensor) -> None:
        if x.numel() > 0:
            self.num_batches_tracked.add_(1)

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self._normalize(input)
        return self._normalize_masked(input, mask, 1)

    def _normalize_masked(self, input: torch.Tensor, mask: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
        """:meth:`_normalize` with statistics over the positions where ``mask`` is True (``None``: all), the
        channels on ``channel_dim``; see :func:`normlab.functional.batch_norm`. A batch without a valid
        position is not counted."""
        name = type(self).__name__
        self._check_config()
        checks.check_floating(input, name)
        checks.check_ndim(input, name, self._ranks, self._layout)
        if input.shape[channel_dim] != self.num_features:
            checks.check_channels(input.movedim(channel_dim, 1), self.num_features, name)
        training, tracking = self.training, self.track_running_stats
        # Not on a checkpointed segment's recomputation, nor after the first call inside update_once.
        updating = training and tracking and may_update(self)
        running_mean = self.running_mean if not training or updating else None
        running_var = self.running_var if running_mean is not None else None
        skipped = getattr(self, "num_batches_skipped", 0)
        y = F._masked_batch_norm(name, input, mask, channel_dim, running_mean, running_var, self.weight, self.bias,
                                training or running_mean is None, self._update_factor() if updating else 0.0,
                                self.eps, **self._guarded_update())
        if updating and self.num_batches_skipped == skipped and input.numel() > 0 and (mask is None or
                                                                                       bool(mask.any())):
            self.num_batches_tracked.add_(1)
        return y

    def _normalize(self, input: torch.Tensor, **epilogue) -> torch.Tensor:
        """Check ``input``, normalize it with this layer's state and mode (``epilogue``: ``relu=True`` and
        an optional ``residual``, as in :func:`~normlab.functional.batch_norm_relu`), count the batch.
        Errors name the layer.

        The checks depend only on the call's signature (the input's and residual's shapes, strides and dtypes,
        the mode and configuration, which parameter and buffer tensors the layer holds); a call with the
        signature of the last call that passed them skips them. In eval mode a
        small dense input (:data:`EVAL_ATEN_MAX_BYTES`) whose call records no gradient goes to ATen's
        ``torch.batch_norm``, whose per-call cost is below normlab's there: the same function, rounded as
        torch.nn rounds it (``x·α + β`` with ``α = γ/√(var+ε)``, ``β = b − mean·α``), where that rounding
        is as good as normlab's (:func:`_aten_eval_fits`)."""
        state = self.__dict__
        weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
        mean_buf, var_buf = self._buffers.get("running_mean"), self._buffers.get("running_var")
        residual = epilogue.get("residual")
        key = (input.shape, input.stride(), input.dtype, input.device, state["training"],
               state.get("track_running_stats"), state.get("eps"), state.get("momentum"),
               None if residual is None else (residual.shape, residual.stride(), residual.dtype))
        held = state.get("_validated_tensors")  # compared by identity: the layer holds the very same tensors
        validated = (key == state.get("_validated") and held[0] is weight and held[1] is bias
                     and held[2] is mean_buf and held[3] is var_buf)
        # ATen's eval where it was found to fit, for statistics and γ as they were then (in-place changes,
        # such as load_state_dict's, bump a tensor's _version)
        aten = state.get("_aten_eval")
        if (validated and aten is not None and aten == _versions(weight, mean_buf, var_buf)
                and _aten_eval_now(input, weight, bias)):
            y = torch.batch_norm(input, weight, bias, mean_buf, var_buf, False, 0.0, state["eps"], False)
            if residual is not None:
                y.add_(residual)
            return y.relu_() if epilogue.get("relu") else y
        name = type(self).__name__
        if not validated:
            self._check_config()
            checks.check_floating(input, name)
            checks.check_ndim(input, name, self._ranks, self._layout)
            checks.check_channels(input, self.num_features, name)
        training, tracking = state["training"], state["track_running_stats"]
        # Not on a checkpointed segment's recomputation, nor after the first call inside update_once.
        updating = training and tracking and may_update(self)
        factor = self._update_factor() if updating else 0.0
        running_mean = mean_buf if not training or updating else None
        running_var = var_buf if running_mean is not None else None
        skipped = state.get("num_batches_skipped", 0)  # a layer pickled before these attributes has none
        plan = batch_plan(input.shape)
        use_batch_stats = training or running_mean is None
        y = F.normalize_with_plan(
            name, input, plan, weight, bias, state["eps"], running_mean, running_var, use_batch_stats, factor,
            checks.BN_SUGGESTION if tracking else checks.BN_NO_RUNNING_SUGGESTION, epilogue.get("relu", False),
            residual, state.get("guard_stats"), self._skipped_batch,
            not CONVENTIONS[state.get("convention", "torch")].biased_running_var, use_batch_stats, validated)
        if not validated:
            state["_validated"], state["_validated_tensors"] = key, (weight, bias, mean_buf, var_buf)
        if not training and (not validated or aten != _versions(weight, mean_buf, var_buf)):
            state["_aten_eval"] = _aten_eval_fits(self, input, residual)
        if updating and state.get("num_batches_skipped", 0) == skipped:
            self._count_batch(input)
        return y


EVAL_ATEN_MAX_BYTES = 8 << 20
"""Eval-mode inputs up to this size go to ATen's ``torch.batch_norm`` (see ``benchmarks/README.md``,
"Eval on small tensors")."""

_transforms_active = torch._C._are_functorch_transforms_active


EVAL_ATEN_MAX_OFFSET = 64.0
"""ATen's eval rounds ``mean·α`` (``α = γ/√(var+ε)``) before subtracting it: it is used only where
``|mean|·|α| ≤`` this in every channel, so that its error stays within 2⁻¹⁸ of the output's unit (data with a
large mean and a small spread, 1e4 + N(0, 1e-2), stays on normlab's kernels, exact to float32 rounding)."""


def _versions(*tensors: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(-1 if t is None else t._version for t in tensors)


def _aten_eval_fits(layer: _BatchNorm, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[int, ...] | None:
    """Whether eval calls of this signature may go to ATen: running statistics with no large offset
    (:data:`EVAL_ATEN_MAX_OFFSET`), a dense float32 CPU input no larger than :data:`EVAL_ATEN_MAX_BYTES`,
    parameters and statistics of its dtype, a residual of its shape. Returns the versions of γ and the
    statistics it was decided for (``None``: not ATen)."""
    mean, var, weight = layer.running_mean, layer.running_var, layer.weight
    fits = (not torch.compiler.is_compiling() and mean is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and 0 < x.numel() * 4 <= EVAL_ATEN_MAX_BYTES
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and mean.dtype == var.dtype == torch.float32
            and (weight is None or weight.dtype == torch.float32)
            and (layer.bias is None or layer.bias.dtype == torch.float32)
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)))
    if not fits:
        return None
    with torch.no_grad():
        alpha = (var + layer.eps).rsqrt() * (1.0 if weight is None else weight.abs())
        if not bool((mean.abs() * alpha).max() <= EVAL_ATEN_MAX_OFFSET):  # NaN or inf: not ATen either
            return None
    return _versions(weight, mean, var)


def _aten_eval_now(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """The per-call part: no gradient recorded, no ``torch.func`` transform, forward-mode AD or compilation."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not _transforms_active() and _forward_ad._current_level < 0 and not torch.compiler.is_compiling()


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
    it as a batch, which skews the cumulative average of ``momentum=None``). So does, with the guard on
    (``guard_stats``, :mod:`normlab.core.guard`), a batch whose statistics are not finite: it is counted
    in ``num_batches_skipped`` instead. A checkpointed segment's recomputation does not update them either
    (:mod:`normlab.nn.once`).

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
        guard_stats: skip the running update of a batch whose statistics are not finite: True, False, or
            None (default: follow :class:`normlab.set_guard_stats`, on unless turned off).
        convention: ``"torch"`` (default), ``"keras"`` or ``"flax"``: how ``eps`` and ``momentum`` (and
            their defaults) are read and whether the running variance is stored biased; see
            :mod:`normlab.nn.conventions`. ``momentum`` is stored in torch's meaning.

    Shape: input (N, C) or (N, C, L); output the same shape.

    ``forward(input, mask=None)``: with a bool ``mask`` ((N,) or (N, L), True = a valid position) the
    statistics and the running update use the valid positions only and padded positions give 0 (see
    :func:`normlab.functional.batch_norm`; :class:`MaskedBatchNorm1d` takes (N, L, C) input). The 2D and 3D
    layers take a mask of shape (N, H, W) and (N, D, H, W) alike.

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


class MaskedBatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    r"""Batch normalization of sequence-major input (N, L, C), as a Transformer carries it, over the valid
    positions of a padded batch.

    ``forward(input, mask=None)``: ``mask`` (N, L), True at valid positions (for (N, C) input, (N,)); the
    per-channel statistics, in training, and the running update use the valid positions only; padded
    positions give 0 and receive a zero gradient. Without a mask every position is valid. It is
    :class:`BatchNorm1d` applied to ``input[mask]`` (M rows of C channels), scattered back
    (:mod:`normlab.core.masked`). Eval mode normalizes with the running statistics; the padded positions
    give 0 there too. A batch without a valid position gives zeros and leaves the running statistics and
    ``num_batches_tracked`` untouched.

    Arguments, parameters, buffers and ``state_dict`` keys are :class:`BatchNorm1d`'s.

    Shape: input (N, L, C) or (N, C), mask (N, L) or (N,); output the input's shape.

    Example::

        >>> import normlab.nn as nn
        >>> bn = nn.MaskedBatchNorm1d(64)
        >>> x = torch.randn(8, 20, 64)                          # 8 sequences of up to 20 tokens
        >>> lengths = torch.randint(1, 21, (8,))
        >>> y = bn(x, mask=torch.arange(20) < lengths[:, None])
    """

    _ranks = (2, 3)
    _layout = "of shape (N, C) or (N, L, C) (channels last)"

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalize_masked(input, mask, -1)
