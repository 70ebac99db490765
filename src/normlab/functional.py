"""Functional normalization with the signatures and semantics of ``torch.nn.functional``.

Each function validates its arguments, builds a :class:`~normlab.core.plan.Plan` (which axes are reduced,
which carry γ and β) and runs the shared engine :class:`~normlab.core.engine.Normalize` (through
:func:`~normlab.core.engine.run`), whose backward is the closed-form gradient. Running statistics, where
given, are updated in place only after the computation has succeeded.

>>> import torch, normlab.functional as F
>>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
>>> F.batch_norm(x, None, None, training=True).flatten()
tensor([-1.4142, -0.7071,  0.0000,  0.7071,  1.4142])
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from normlab.core import checks
from normlab.core.engine import run as normalize
from normlab.core.fused import normalize_relu
from normlab.core.plan import Plan, batch_plan, group_plan, instance_plan, layer_plan

__all__ = ["batch_norm", "batch_norm_relu", "instance_norm", "group_norm", "layer_norm"]


def _run(
    op: str,
    x: torch.Tensor,
    plan: Plan,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    use_batch_stats: bool = True,
    momentum: float = 0.1,
    suggestion: str | None = None,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    eps_positive: bool = False,
) -> torch.Tensor:
    """Check, then normalize through the engine, which updates the running statistics (if any) once the
    batch's are computed.

    ``suggestion`` is the advice given when a statistic would be computed from a single value; ``None``
    allows that case (LayerNorm and GroupNorm, like torch.nn, then return β). ``relu`` returns
    ``relu(y + residual)`` (``residual`` may be ``None``) instead of ``y``. ``eps_positive``: refuse eps = 0
    (batch normalization with the batch's statistics, as torch does).
    """
    checks.check_eps(eps, op, positive=eps_positive)
    if residual is not None:
        checks.check_residual(residual, x, op)
    checks.check_param(weight, plan.param_shape, op, "weight")
    checks.check_param(bias, plan.param_shape, op, "bias")
    if plan.channels is not None:
        checks.check_running(running_mean, running_var, plan.channels, op)
    if use_batch_stats:
        if running_mean is not None:
            checks.check_momentum(momentum, op)
        if suggestion is not None and x.numel() > 0:
            checks.check_enough_values(plan.count, op, tuple(x.shape), suggestion, running_mean is not None)
        fixed_mean = fixed_var = None
    else:
        if running_mean is None:
            raise checks.InputError(
                f"{op}: running_mean and running_var are needed to normalize without batch statistics "
                f"(evaluation mode). Pass them, or normalize with batch statistics (training=True)."
            )
        fixed_mean, fixed_var = running_mean, running_var
    running = None
    if use_batch_stats and running_mean is not None and x.numel() > 0:
        running = (running_mean, running_var, float(momentum))
    if relu:
        return normalize_relu(x, residual, weight, bias, fixed_mean, fixed_var, plan, float(eps), running)
    return normalize(x, weight, bias, fixed_mean, fixed_var, plan, float(eps), running)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization of ``input`` of shape (N, C, *S) with per-channel statistics over N and *S.

    In training (or when no running statistics are given) the batch mean and biased variance are used
    and ``running_mean``/``running_var``, if given, are updated in place with ``momentum`` (the unbiased
    variance is stored). Otherwise the running statistics are used. Same semantics as
    :func:`torch.nn.functional.batch_norm`.
    """
    return _batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_relu(
    input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu(batch_norm(input, ...) + residual)`` (``residual`` optional), the tail of a ResNet block.

    Arguments and running statistics as in :func:`batch_norm`. Where the backend fuses it (the numba
    CPU kernels, for a residual of the input's shape and dtype) the add and the ReLU are applied as the
    values are normalized, and the backward is one closed-form pass with the ReLU's mask; elsewhere the
    three operations are composed. Either way the result and gradients are those of the composition.
    """
    return _batch_norm("batch_norm_relu", input, running_mean, running_var, weight, bias, training, momentum,
                       eps, relu=True, residual=residual)


def _batch_norm(op, input, running_mean, running_var, weight, bias, training, momentum, eps, **epilogue):
    """:func:`batch_norm` (or, with ``relu=True``, :func:`batch_norm_relu`) whose errors name ``op``.
    A 1-D empty input gives an empty output, as in torch."""
    checks.check_floating(input, op)
    if input.dim() == 1 and input.numel() == 0:
        return _batch_norm(op, input.reshape(0, 0), running_mean, running_var, weight, bias, training, momentum,
                           eps, **epilogue).reshape(input.shape)
    checks.check_min_ndim(input, op, 2, "of shape (N, C) or (N, C, *spatial)")
    use_batch_stats = training or (running_mean is None and running_var is None)
    return _run(
        op, input, batch_plan(input.shape), weight, bias, eps, running_mean, running_var,
        use_batch_stats, momentum, checks.BN_SUGGESTION, eps_positive=bool(training), **epilogue,
    )


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Instance normalization of (N, C, *S): statistics per sample and channel over *S.

    With ``use_input_stats`` the running statistics, if given, are updated with the batch average of the
    per-instance statistics; otherwise they are used. Same semantics as
    :func:`torch.nn.functional.instance_norm`.
    """
    op = "instance_norm"
    checks.check_floating(input, op)
    checks.check_min_ndim(input, op, 3, "of shape (N, C, *spatial) with at least one spatial axis")
    return _run(
        op, input, instance_plan(input.shape), weight, bias, eps, running_mean, running_var,
        use_input_stats, momentum,
        "InstanceNorm needs more than one spatial position per channel; for 1x1 maps use BatchNorm "
        "or GroupNorm instead.",
    )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalization of (N, C, *S): the C channels split into ``num_groups`` groups, statistics
    per sample and group over the group's channels and *S. γ and β are per channel. Same semantics as
    :func:`torch.nn.functional.group_norm`."""
    op = "group_norm"
    checks.check_floating(input, op)
    checks.check_min_ndim(input, op, 2, "of shape (N, C, *spatial)")
    checks.check_groups(num_groups, input.shape[1], op)
    plan = group_plan(input.shape, num_groups)
    # torch refuses (a ValueError) one sample with a channel per group and no spatial extent, and only that:
    # other groups of a single value (e.g. (2, 1) in one group) are normalized to β.
    if input.numel() > 0 and input.numel() // num_groups == 1:
        checks.check_enough_values(1, op, tuple(input.shape), checks.GN_SUGGESTION, running=False,
                                   source="the input's")
    return _run(op, input, plan, weight, bias, eps)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` axes of ``input``, with elementwise
    γ and β of that shape. Same semantics as :func:`torch.nn.functional.layer_norm`."""
    op = "layer_norm"
    checks.check_floating(input, op)
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if len(shape) == 0 or input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape:
        example = (f"e.g. LayerNorm({list(input.shape[-1:])}) for the last one" if input.dim() > 0 else
                   "e.g. input.reshape(1) with LayerNorm([1]); a 0-d input has no dimension to normalize over")
        if len(shape) == 0:
            raise checks.InputError(
                f"layer_norm: normalized_shape must have at least one dimension (Expected normalized_shape to be "
                f"at least 1-dimensional), got {list(shape)}; give the trailing dimension(s) of the input of shape "
                f"{tuple(input.shape)} to normalize over, {example}."
            )
        raise checks.InputError(
            f"layer_norm: normalized_shape={list(shape)} must match the trailing dimensions of the "
            f"input, got input of shape {tuple(input.shape)}. Build LayerNorm with the last "
            f"dimension(s) of your input, {example}."
        )
    return _run(op, input, layer_plan(input.shape, shape), weight, bias, eps)
