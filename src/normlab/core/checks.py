"""Input validation shared by the functional API and the layers.

Every check raises before anything is computed or any running statistic is touched, and every
message says what was wrong and what to do about it.

The exceptions are instances of the type torch raises for the same mistake: where normlab's type is more
specific than torch's (a ValueError for a tensor of the wrong shape, where torch raises RuntimeError; a
TypeError for integer data, where torch raises NotImplementedError) it is :class:`InputError` or
:class:`DTypeError`, a subclass of both, so that ``except RuntimeError`` written for torch.nn and
``except ValueError`` written for normlab both catch it.
"""

from __future__ import annotations

import math
import numbers

import torch


class InputError(ValueError, RuntimeError):
    """A tensor or argument of the wrong shape or kind: a ValueError, and the RuntimeError torch raises."""


class DTypeError(TypeError, NotImplementedError):
    """Integer or bool data where normalization needs floating point: a TypeError, and torch's
    NotImplementedError (a RuntimeError) for the same input."""


def check_floating(x: torch.Tensor, op: str, name: str = "input") -> None:
    if type(x) is torch.Tensor and x.is_floating_point():  # the common case, without the isinstance machinery
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.dtype.is_floating_point:
        raise DTypeError(
            f"{op}: {name} has dtype {x.dtype}, but normalization needs a floating-point tensor "
            f"(mean and variance are not defined for integer or bool data). Convert it first, "
            f"e.g. {name}.float(), or .to(torch.float16 / torch.bfloat16) for half precision."
        )


def check_residual(residual: torch.Tensor, x: torch.Tensor, op: str) -> None:
    """``residual`` is added to the normalized ``x``: it must broadcast to ``x``'s shape without changing
    it, on ``x``'s device. Checked before anything is computed, so a bad residual leaves the running
    statistics as they were."""
    check_floating(residual, op, "residual")
    try:
        shape = torch.broadcast_shapes(residual.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"{op}: residual has shape {tuple(residual.shape)}, which does not broadcast to the input's shape "
            f"{tuple(x.shape)}; relu(bn(x) + residual) needs a residual of the input's shape (the other branch "
            f"of the block must produce the same number of channels and the same spatial size)."
        )
    if residual.device != x.device:
        raise ValueError(
            f"{op}: residual is on {residual.device} but the input is on {x.device}; move one of them, "
            f"e.g. residual.to(x.device)."
        )


def check_eps(eps: float, op: str, added_to_scale: bool = False, positive: bool = False) -> None:
    """eps is a finite number >= 0, added to the variance under the square root (0, as torch allows it,
    leaves a constant channel at 0/0); ``positive``: > 0, as torch requires for batch normalization with
    the batch's statistics; ``added_to_scale``: added to a scale the input is divided by (ℓp batch norm)."""
    if type(eps) is float and (0.0 < eps if positive else 0.0 <= eps) and eps < math.inf:
        return  # the common case; NaN fails every comparison and is refused below
    number = not isinstance(eps, bool) and isinstance(eps, numbers.Real) and math.isfinite(eps)
    if added_to_scale:
        ok, bound, why = number and eps >= 0, ">= 0", (
            "it is added to the ℓp scale, keeping the division finite for a constant channel when > 0")
    elif positive:
        ok, bound, why = number and eps > 0, "> 0", (
            "batch_norm eps must be positive during training: it keeps 1/sqrt(var + eps) finite for a channel "
            "whose values in the batch are all equal")
    else:
        ok, bound, why = number and eps >= 0, ">= 0", (
            "it is added to the variance under the square root; with 0 a constant channel gives 0/0")
    if not ok:
        raise ValueError(f"{op}: eps must be a finite number {bound} ({why}), got {eps!r}. The usual value is 1e-5.")


def check_momentum(momentum: float | None, op: str, allow_none: bool = False) -> None:
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return
    if momentum is None and allow_none:
        return
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, numbers.Real)
        or not math.isfinite(momentum)
        or not 0.0 <= momentum <= 1.0
    ):
        allowed = "a number in [0, 1] or None (cumulative average)" if allow_none else "a number in [0, 1]"
        raise ValueError(
            f"{op}: momentum must be {allowed}, got {momentum!r}. It is the weight of the new batch in "
            f"running = (1 - momentum) * running + momentum * batch_statistic; 0.1 is the usual value."
        )


def check_ndim(x: torch.Tensor, op: str, allowed: tuple[int, ...], layout: str) -> None:
    if x.dim() not in allowed:
        want = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(
            f"{op}: expected a {want} input {layout}, got a {x.dim()}D input of shape "
            f"{tuple(x.shape)}. Reshape the input or pick the layer made for this rank."
        )


def check_min_ndim(x: torch.Tensor, op: str, min_dim: int, layout: str) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"{op}: expected an input with at least {min_dim} dimensions {layout}, got shape "
            f"{tuple(x.shape)}."
        )


def check_channels(x: torch.Tensor, expected: int, op: str, what: str = "num_features", dim: int = 1) -> None:
    """The input's channel axis (``dim``: 1, or 0 for an unbatched input) has the layer's size."""
    got = x.shape[dim]
    if got != expected:
        raise InputError(
            f"{op}: the input has {got} channels (dim {dim} of shape {tuple(x.shape)}) but the layer was "
            f"built with {what}={expected}. Build the layer with {what}={got}, or check that the "
            f"preceding layer outputs {expected} channels (channels must be dim 1, even for "
            f"channels_last tensors)."
        )


def check_param(p: torch.Tensor | None, shape: tuple[int, ...], op: str, name: str) -> None:
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(p).__name__}.")
    if p.shape != shape:
        raise InputError(
            f"{op}: {name} has shape {tuple(p.shape)}, but this input needs shape {tuple(shape)} "
            f"(one value per normalized feature)."
        )
    if not p.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} has dtype {p.dtype}; it must be floating point.")


def check_running(mean: torch.Tensor | None, var: torch.Tensor | None, channels: int, op: str) -> None:
    if (mean is None) != (var is None):
        raise ValueError(
            f"{op}: running_mean and running_var must be given together (both tensors or both None)."
        )
    if mean is None:
        return
    check_param(mean, (channels,), op, "running_mean")
    check_param(var, (channels,), op, "running_var")
    for name, t in (("running_mean", mean), ("running_var", var)):
        if t.requires_grad and torch.is_grad_enabled():
            raise InputError(
                f"{op}: {name} requires grad, but normalization does not differentiate with respect to the "
                f"running statistics (they are constants in eval mode and updated in place in training), so its "
                f"gradient would silently stay None. Pass {name}.detach(), or normalize with batch statistics "
                f"if the gradient should flow through the statistics."
            )
        if 0 in t.stride() and t.numel() > 1:
            raise InputError(
                f"{op}: {name} is an expanded view (a stride of 0), so its entries share memory and cannot "
                f"be updated in place. Pass a tensor of its own, e.g. {name}.clone()."
            )


def check_enough_values(count: int, op: str, shape: tuple[int, ...], suggestion: str, running: bool = True,
                        source: str = "the batch's") -> None:
    """Statistics over a single value are meaningless: the mean is the value, the variance is 0.
    ``running``: whether running statistics would be updated with them; ``source``: whose statistics."""
    if count == 1:
        consequence = (
            ", and the running variance (unbiased, divides by m - 1 = 0) would become inf" if running else ""
        )
        raise ValueError(
            f"{op}: normalizing with {source} statistics needs more than 1 value per statistic (Expected "
            f"more than 1 value per channel when training), got input of shape {shape}, which gives exactly "
            f"one value per statistic. With a single value the mean equals the value, the variance is 0 and "
            f"every output would be beta{consequence}. "
            f"{suggestion}"
        )


BN_SUGGESTION = (
    "Use eval mode (model.eval()) to normalize with the running statistics, train with a larger "
    "batch, or use GroupNorm/LayerNorm, whose statistics do not depend on the batch."
)

BN_NO_RUNNING_SUGGESTION = (
    "This layer keeps no running statistics (track_running_stats=False), so it normalizes with the "
    "batch's even in eval mode: build it with track_running_stats=True and train it, pass a larger "
    "batch, or use GroupNorm/LayerNorm, whose statistics do not depend on the batch."
)


IN_SUGGESTION = (
    "InstanceNorm needs more than one spatial position per channel; for 1x1 maps use BatchNorm or GroupNorm "
    "instead."
)


GN_SUGGESTION = (
    "A single sample whose groups hold one channel and no spatial positions, which torch.nn refuses too: "
    "use fewer groups, or a batch of more than one sample."
)


def check_groups(num_groups: int, channels: int, op: str) -> None:
    """``num_groups`` divides ``channels``; an :class:`InputError` (torch's F.group_norm raises RuntimeError,
    its GroupNorm constructor ValueError)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups <= 0:
        raise InputError(f"{op}: num_groups must be a positive integer, got {num_groups!r}.")
    if channels % num_groups != 0:
        divisors = [g for g in range(1, channels + 1) if channels % g == 0]
        raise InputError(
            f"{op}: num_groups={num_groups} does not divide the {channels} channels; every group must "
            f"hold the same number of channels. Valid choices for {channels} channels: {divisors}."
        )


def check_renorm_limits(r_max: float, d_max: float, op: str) -> None:
    """r_max ≥ 1 and d_max ≥ 0, finite: r is clipped to [1/r_max, r_max], d to [−d_max, d_max]."""
    ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in (r_max, d_max))
    if not ok or r_max < 1.0 or d_max < 0.0:
        raise ValueError(
            f"{op}: r_max must be a finite number >= 1 and d_max a finite number >= 0 (r is clipped to "
            f"[1/r_max, r_max], d to [-d_max, d_max]), got r_max={r_max!r}, d_max={d_max!r}. "
            f"r_max=1, d_max=0 is plain batch normalization; Ioffe 2017 relaxes them to 3 and 5."
        )


def check_virtual_batch_size(size: int, op: str) -> None:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(
            f"{op}: virtual_batch_size must be a positive integer (samples per virtual batch), got {size!r}."
        )


def ghost_suggestion(size: int, n: int) -> str:
    """The advice when a virtual batch (of ``size`` samples out of a batch of ``n``) has one value per channel."""
    return (
        f"Each virtual batch (of virtual_batch_size={size} samples; the last one holds the rest of the batch of "
        f"{n}) is normalized with its own statistics: choose a virtual_batch_size, or a batch size, for which "
        f"every virtual batch holds at least 2 values per channel (e.g. a batch size that is a multiple of it)."
    )
