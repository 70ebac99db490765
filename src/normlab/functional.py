"""Functional normalization with the signatures and semantics of ``torch.nn.functional``.

Each function validates its arguments, builds a :class:`~normlab.core.plan.Plan` (which axes are reduced,
which carry γ and β), asks :mod:`normlab.kernels.dispatch` which backend computes it, and runs the shared
engine :class:`~normlab.core.engine.Normalize` (through :func:`~normlab.core.engine.run`), whose backward
is the closed-form gradient. Running statistics, where given, are updated in place only after the
computation has succeeded.

>>> import torch, normlab.functional as F
>>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
>>> F.batch_norm(x, None, None, training=True).flatten()
tensor([-1.4142, -0.7071,  0.0000,  0.7071,  1.4142])
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence

import torch

from normlab.core import checks, masked
from normlab.core.guard import RunningUpdate, guard_stats_enabled
from normlab.core.engine import run as normalize
from normlab.core.fused import normalize_relu
from normlab.core.plan import Plan, batch_plan, group_plan, instance_plan, layer_plan
from normlab.core.ghost import ghost_normalize
from normlab.core.renorm import renormalize
from normlab.kernels.dispatch import backend_for, select as select_backend

__all__ = ["batch_norm", "batch_norm_relu", "batch_renorm", "ghost_batch_norm", "instance_norm", "group_norm",
           "layer_norm", "normalize_with_plan"]


def normalize_with_plan(
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
    guard: bool | None = None,
    on_skip: Callable[[str], None] | None = None,
    unbiased: bool = True,
    eps_positive: bool = False,
    checked: bool = False,
) -> torch.Tensor:
    """The entry every function here and every layer of :mod:`normlab.nn` normalizes through: check the
    arguments (:func:`_check`), then normalize through the engine, which updates the running statistics (if
    any) once the batch's are computed (:func:`_execute`).

    ``plan`` says which axes are reduced and which carry γ and β (:mod:`normlab.core.plan`). ``suggestion``
    is the advice given when a statistic would be computed from a single value; ``None`` allows that case
    (LayerNorm and GroupNorm, like torch.nn, then return β). ``relu`` returns ``relu(y + residual)``
    (``residual`` may be ``None``) instead of ``y``. ``guard`` (``None``: the global setting) skips the
    running update of a batch whose statistics are not finite (:mod:`normlab.core.guard`); ``on_skip(op)``
    is then called (default: a warning). ``unbiased=False`` stores the biased batch variance in
    ``running_var`` (Keras' and Flax's convention). ``eps_positive``: refuse eps = 0 (batch normalization
    with the batch's statistics, as torch does). ``checked``: the caller has seen a call with the same
    shapes, dtypes and configuration pass the checks (a layer's cached validation), so they are skipped.
    """
    if not checked:
        _check(op, x, plan, weight, bias, eps, running_mean, running_var, use_batch_stats, momentum, suggestion,
               residual, eps_positive)
    return _execute(op, x, plan, weight, bias, eps, running_mean, running_var, use_batch_stats, momentum, relu,
                    residual, guard, on_skip, unbiased)


_run = normalize_with_plan
"""The former name of :func:`normalize_with_plan`."""


def _check(op, x, plan, weight, bias, eps, running_mean, running_var, use_batch_stats, momentum, suggestion, residual,
           eps_positive) -> None:
    """:func:`normalize_with_plan`'s validation: raise the error torch would (or normlab's more specific one)
    for arguments the engine cannot take. Depends only on shapes, dtypes and the configuration, so a layer
    that has seen a call with the same of those pass it may skip it
    (:meth:`normlab.nn.batchnorm._BatchNorm._normalize`)."""
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
    elif running_mean is None:
        raise checks.InputError(
            f"{op}: running_mean and running_var are needed to normalize without batch statistics "
            f"(evaluation mode). Pass them, or normalize with batch statistics (training=True)."
        )


def _execute(op, x, plan, weight, bias, eps, running_mean, running_var, use_batch_stats, momentum, relu=False,
             residual=None, guard=None, on_skip=None, unbiased=True) -> torch.Tensor:
    """:func:`normalize_with_plan` after :func:`_check`: the engine call on the backend
    :mod:`normlab.kernels.dispatch` picks, the running statistics updated by the engine."""
    fixed_mean, fixed_var = (None, None) if use_batch_stats else (running_mean, running_var)
    running = None
    if use_batch_stats and running_mean is not None and x.numel() > 0:
        running = RunningUpdate(running_mean, running_var, float(momentum), guard_stats_enabled(guard), unbiased)
    backend = backend_for(x, plan, fixed_mean is None)
    if relu:
        y = normalize_relu(backend, x, residual, weight, bias, fixed_mean, fixed_var, plan, float(eps), running)
    else:
        y = normalize(backend, x, weight, bias, fixed_mean, fixed_var, plan, float(eps), running)
    if running is not None and running.skipped:
        (on_skip or _warn_skipped)(op)
    return y


def _report_skip(running: RunningUpdate | None, op: str, on_skip: Callable[[str], None] | None) -> None:
    """Tell ``on_skip`` (default: a warning) when the guarded update ``running`` skipped its batch."""
    if running is not None and running.skipped:
        (on_skip or _warn_skipped)(op)


def _warn_skipped(op: str) -> None:
    """What a guarded functional call says when it leaves the running statistics as they were."""
    warnings.warn(
        f"{op}: the batch's mean or variance is not finite (NaN or inf in the input, or values that overflowed "
        f"in float16), so the running statistics were left as they were; the output is what the math gives. "
        f"normlab.set_guard_stats(False) restores torch.nn's behaviour (the running statistics become NaN).",
        RuntimeWarning, stacklevel=5,
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch normalization of ``input`` of shape (N, C, *S) with per-channel statistics over N and *S.

    In training (or when no running statistics are given) the batch mean and biased variance are used
    and ``running_mean``/``running_var``, if given, are updated in place with ``momentum`` (the unbiased
    variance is stored). Otherwise the running statistics are used. Same semantics as
    :func:`torch.nn.functional.batch_norm`.

    ``mask`` (bool, shape (N, *S): (N,) for (N, C), (N, L) for (N, C, L); True = a valid position): the
    statistics and the running update use the valid positions only, and padded positions give 0, with a
    zero gradient (see :mod:`normlab.core.masked`). All-False: every output 0, running statistics untouched.
    """
    if mask is not None:
        return _masked_batch_norm("batch_norm", input, mask, 1, running_mean, running_var, weight, bias, training,
                                 momentum, eps)
    return _batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training, momentum, eps)


def _masked_batch_norm(op, input, mask, channel_dim, running_mean, running_var, weight, bias, training, momentum,
                      eps, **guard) -> torch.Tensor:
    """:func:`batch_norm` over the positions where ``mask`` is True, channels on ``channel_dim`` (1, or −1 for
    sequence-major (N, L, C) input); ``mask=None``: every position. Errors name ``op``; ``guard``
    (``guard=``, ``on_skip=``, ``unbiased=``) configures the guarded running update as in
    :func:`normalize_with_plan`."""
    checks.check_floating(input, op)
    checks.check_min_ndim(input, op, 2, "of shape (N, C) or (N, C, *spatial)" if channel_dim == 1 else
                          "of shape (N, C) or (N, L, C)")
    if mask is not None:
        masked.check_mask(mask, input, op, channel_dim)
    use_batch_stats = training or (running_mean is None and running_var is None)
    if not use_batch_stats:  # fixed statistics: every position normalized, the padded ones then set to 0
        y = _batch_norm(op, input.movedim(channel_dim, 1), running_mean, running_var, weight, bias, False, momentum,
                        eps).movedim(1, channel_dim)
        return y if mask is None else torch.where(masked.mask_like(mask, input, channel_dim), y, 0.0)
    if mask is None:  # every position valid: BatchNorm of the rows, a view where the layout allows
        rows = masked.rows_of(input, channel_dim)
        y = _batch_norm(op, rows, running_mean, running_var, weight, bias, True, momentum, eps, **guard)
        return y.reshape(input.movedim(channel_dim, -1).shape).movedim(-1, channel_dim)
    index = masked.positions(mask)
    count, c = index[0].numel(), input.shape[channel_dim]
    if count == 1:
        raise ValueError(
            f"{op}: the mask leaves a single valid position, so every channel's batch statistics would come from one "
            f"value (variance 0, output beta). {checks.BN_SUGGESTION}"
        )
    checks.check_eps(eps, op, positive=True)
    checks.check_param(weight, (c,), op, "weight")
    checks.check_param(bias, (c,), op, "bias")
    checks.check_running(running_mean, running_var, c, op)
    running = None
    if running_mean is not None:
        checks.check_momentum(momentum, op)
        if count > 0:
            running = RunningUpdate(running_mean, running_var, float(momentum),
                                    guard_stats_enabled(guard.get("guard")), guard.get("unbiased", True))
    backend = select_backend(input, batch_plan((max(count, 2), c)), True)
    # the output and the input's gradient are written into the backend's recycled memory where it has it
    empty_like = getattr(backend, "empty_like", torch.empty_like)
    if backend is None or masked.seam_takes_masks(backend, input, c):  # the statistics seam over the valid positions
        y = masked.normalize_masked(input, index, channel_dim, weight, bias, float(eps), running, empty_like, backend)
        _report_skip(running, op, guard.get("on_skip"))
        return y
    # a kernel backend without masks in its seam: its fused BatchNorm on the valid positions gathered as rows
    rows = masked.gather_valid(input, index, channel_dim, empty_like)
    y = _batch_norm(op, rows, running_mean, running_var, weight, bias, True, momentum, eps, **guard)
    return masked.scatter_valid(y, index, input, channel_dim, empty_like)


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


def batch_renorm(
    input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, r_max: float = 3.0, d_max: float = 5.0,
) -> torch.Tensor:
    """Batch renormalization (Ioffe 2017) of ``input`` (N, C, *S); see :mod:`normlab.core.renorm`.

    In training, ``x̂ = (x − μ_B)/σ_B · r + d`` with r = clip(σ_B/σ, 1/r_max, r_max) and
    d = clip((μ_B − μ)/σ, −d_max, d_max) from the running statistics (μ, σ² = running_var), constants in
    the backward; the running statistics are then updated with the batch's as in :func:`batch_norm`.
    r_max = 1, d_max = 0 is :func:`batch_norm`. Outside training it is :func:`batch_norm` with the running
    statistics.
    """
    return _batch_renorm("batch_renorm", input, running_mean, running_var, weight, bias, training, momentum, eps,
                         r_max, d_max)


def _batch_renorm(op, input, running_mean, running_var, weight, bias, training, momentum, eps, r_max, d_max,
                  update: bool = True, guard: bool | None = None, on_skip: Callable[[str], None] | None = None,
                  unbiased: bool = True) -> torch.Tensor:
    """:func:`batch_renorm` whose errors name ``op``; ``update=False`` normalizes in training without
    updating the running statistics (a checkpointed recomputation); ``guard``, ``on_skip``, ``unbiased``
    as in :func:`normalize_with_plan`."""
    checks.check_floating(input, op)
    checks.check_min_ndim(input, op, 2, "of shape (N, C) or (N, C, *spatial)")
    checks.check_renorm_limits(r_max, d_max, op)
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{op}: running_mean and running_var are needed: r and d measure the batch's statistics against "
            f"them. Pass the running statistics (e.g. torch.zeros(C) and torch.ones(C) to start), or use batch_norm."
        )
    if not training or input.numel() == 0 or (r_max == 1.0 and d_max == 0.0):
        rm, rv = (running_mean, running_var) if update or not training else (None, None)
        return _batch_norm(op, input, rm, rv, weight, bias, training, momentum, eps, guard=guard, on_skip=on_skip,
                           unbiased=unbiased)
    plan = batch_plan(input.shape)
    checks.check_eps(eps, op)
    checks.check_param(weight, plan.param_shape, op, "weight")
    checks.check_param(bias, plan.param_shape, op, "bias")
    checks.check_running(running_mean, running_var, plan.channels, op)
    checks.check_momentum(momentum, op)
    checks.check_enough_values(plan.count, op, tuple(input.shape), checks.BN_SUGGESTION)
    running = RunningUpdate(running_mean, running_var, float(momentum), guard_stats_enabled(guard),
                            unbiased) if update else None
    y = renormalize(select_backend(input, plan, True), input, weight, bias, running_mean, running_var, plan,
                    float(eps), running, float(r_max), float(d_max))
    _report_skip(running, op, on_skip)
    return y


def ghost_batch_norm(
    input: torch.Tensor, virtual_batch_size: int, running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
) -> torch.Tensor:
    """Ghost batch normalization (Hoffer et al. 2017) of ``input`` (N, C, *S): with batch statistics, the
    batch is cut along N into virtual batches of ``virtual_batch_size`` samples (the last one smaller when
    it does not divide N), each normalized with its own statistics; see :mod:`normlab.core.ghost`.

    The running statistics, if given, are updated once, with the full batch's statistics (the exact merge
    of the virtual batches'), as :func:`batch_norm` would. Outside training (with running statistics) it
    is :func:`batch_norm`.
    """
    return _ghost_batch_norm("ghost_batch_norm", input, virtual_batch_size, running_mean, running_var, weight, bias,
                             training, momentum, eps)


def _ghost_batch_norm(op, input, virtual_batch_size, running_mean, running_var, weight, bias, training, momentum,
                      eps, guard: bool | None = None, on_skip: Callable[[str], None] | None = None,
                      unbiased: bool = True) -> torch.Tensor:
    """:func:`ghost_batch_norm` whose errors name ``op``; ``guard``, ``on_skip``, ``unbiased`` as in
    :func:`normalize_with_plan`."""
    checks.check_floating(input, op)
    checks.check_min_ndim(input, op, 2, "of shape (N, C) or (N, C, *spatial)")
    checks.check_virtual_batch_size(virtual_batch_size, op)
    use_batch_stats = training or (running_mean is None and running_var is None)
    n = input.shape[0]
    if not use_batch_stats or n <= virtual_batch_size or input.numel() == 0:
        return _batch_norm(op, input, running_mean, running_var, weight, bias, training, momentum, eps, guard=guard,
                           on_skip=on_skip, unbiased=unbiased)
    plan = batch_plan(input.shape)
    checks.check_eps(eps, op)
    checks.check_param(weight, plan.param_shape, op, "weight")
    checks.check_param(bias, plan.param_shape, op, "bias")
    checks.check_running(running_mean, running_var, plan.channels, op)
    if running_mean is not None:
        checks.check_momentum(momentum, op)
    per_sample = plan.count // n
    rest = n % virtual_batch_size
    for size in (virtual_batch_size, rest) if rest else (virtual_batch_size,):
        checks.check_enough_values(size * per_sample, op, (size,) + tuple(input.shape[1:]), checks.ghost_suggestion(
            virtual_batch_size, n), running_mean is not None)
    running = None if running_mean is None else RunningUpdate(running_mean, running_var, float(momentum),
                                                              guard_stats_enabled(guard), unbiased)
    y = ghost_normalize(select_backend(input, plan, True), input, weight, bias, int(virtual_batch_size),
                        float(eps), running)
    _report_skip(running, op, on_skip)
    return y


def _batch_norm(op, input, running_mean, running_var, weight, bias, training, momentum, eps, **epilogue):
    """:func:`batch_norm` (or, with ``relu=True``, :func:`batch_norm_relu`) whose errors name ``op``.
    A 1-D empty input gives an empty output, as in torch."""
    checks.check_floating(input, op)
    if input.dim() == 1 and input.numel() == 0:
        return _batch_norm(op, input.reshape(0, 0), running_mean, running_var, weight, bias, training, momentum,
                           eps, **epilogue).reshape(input.shape)
    checks.check_min_ndim(input, op, 2, "of shape (N, C) or (N, C, *spatial)")
    use_batch_stats = training or (running_mean is None and running_var is None)
    return normalize_with_plan(
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
    return _instance_norm("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                          eps)


def _instance_norm(op, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, **guard):
    """:func:`instance_norm` whose errors name ``op``; ``guard``: ``guard=`` and ``on_skip=`` of
    :func:`normalize_with_plan`."""
    checks.check_floating(input, op)
    checks.check_min_ndim(input, op, 3, "of shape (N, C, *spatial) with at least one spatial axis")
    return normalize_with_plan(
        op, input, instance_plan(input.shape), weight, bias, eps, running_mean, running_var,
        use_input_stats, momentum, checks.IN_SUGGESTION, **guard,
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
    return normalize_with_plan(op, input, plan, weight, bias, eps)


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
    return normalize_with_plan(op, input, layer_plan(input.shape, shape), weight, bias, eps)
