"""The reference: every formula of batch normalization, written plainly in float64.

This module is the specification normlab's engine is tested against. It favours the textbook form
over speed: the backward is the five-step derivation of the source notes, step by step. Inputs are
NumPy arrays (converted to float64); the forward functions also accept float64 torch tensors, so that
autograd through the reference can check the hand-derived backward.

The axes come from the same :class:`~normlab.core.plan.Plan` the engine uses, so BatchNorm, LayerNorm,
InstanceNorm and GroupNorm are configurations of one reference, not four.

>>> import numpy as np
>>> from normlab import reference as ref
>>> y, _ = ref.forward(np.array([[1.0], [2.0], [3.0], [4.0], [5.0]]), ref.batch_plan((5, 1)))
>>> np.round(y.ravel(), 3)
array([-1.414, -0.707,  0.   ,  0.707,  1.414])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from normlab.core.plan import Plan, batch_plan, group_plan, instance_plan, layer_plan

__all__ = [
    "Plan",
    "batch_plan",
    "group_plan",
    "instance_plan",
    "layer_plan",
    "Cache",
    "moments",
    "forward",
    "backward",
    "update_running",
    "population_statistics",
    "inference_affine",
]


def _f64(a: Any) -> Any:
    """NumPy input becomes a float64 ndarray; a torch tensor is left alone (for autograd checks)."""
    if hasattr(a, "detach"):
        return a
    return np.asarray(a, dtype=np.float64)


def moments(x: Any, plan: Plan) -> tuple[Any, Any]:
    """μ_B = (1/m) Σ x_i and the *biased* σ²_B = (1/m) Σ (x_i − μ_B)², over ``plan.reduce``."""
    xv = _f64(x).reshape(plan.view_shape)
    mean = xv.mean(axis=plan.reduce, keepdims=True)
    var = ((xv - mean) ** 2).mean(axis=plan.reduce, keepdims=True)
    return mean, var


@dataclass
class Cache:
    """What the backward pass needs from the forward pass."""

    x: Any
    mean: Any
    var: Any
    gamma: Any
    eps: float
    plan: Plan
    batch_stats: bool


def forward(
    x: Any,
    plan: Plan,
    gamma: Any = None,
    beta: Any = None,
    eps: float = 1e-5,
    mean: Any = None,
    var: Any = None,
) -> tuple[Any, Cache]:
    """y = γ · (x − μ) / sqrt(σ² + ε) + β.

    With ``mean``/``var`` omitted the statistics are the batch's (training); given (shape ``(C,)``,
    e.g. running or population statistics) they are used as constants (inference).
    """
    xv = _f64(x).reshape(plan.view_shape)
    batch_stats = mean is None
    if batch_stats:
        mean, var = moments(xv, plan)
    else:
        mean = _f64(mean).reshape(plan.param_view)
        var = _f64(var).reshape(plan.param_view)
    xhat = (xv - mean) / (var + eps) ** 0.5
    g = None if gamma is None else _f64(gamma).reshape(plan.param_view)
    y = xhat if g is None else g * xhat
    if beta is not None:
        y = y + _f64(beta).reshape(plan.param_view)
    return y.reshape(plan.input_shape), Cache(xv, mean, var, g, eps, plan, batch_stats)


def backward(dy: Any, cache: Cache) -> tuple[Any, Any, Any]:
    """∂L/∂x, ∂L/∂γ, ∂L/∂β from ∂L/∂y, by the five steps of the derivation (m values per statistic):

    1. ∂L/∂γ = Σ_i ∂L/∂y_i · x̂_i,   ∂L/∂β = Σ_i ∂L/∂y_i
    2. ∂L/∂x̂_i = ∂L/∂y_i · γ
    3. ∂L/∂σ² = Σ_i ∂L/∂x̂_i · (x_i − μ) · (−1/2) (σ² + ε)^(−3/2)
    4. ∂L/∂μ = Σ_i ∂L/∂x̂_i · (−1/sqrt(σ² + ε)) + ∂L/∂σ² · (−2/m) Σ_i (x_i − μ)
    5. ∂L/∂x_i = ∂L/∂x̂_i / sqrt(σ² + ε) + ∂L/∂σ² · 2(x_i − μ)/m + ∂L/∂μ / m

    For a convolution (N, C, H, W) the sums run over N·H·W per channel. With fixed statistics
    (inference) μ and σ² do not depend on x and only the first term of step 5 remains.
    """
    plan, x, mean, var, eps = cache.plan, cache.x, cache.mean, cache.var, cache.eps
    dy = _f64(dy).reshape(plan.view_shape)
    m = plan.count
    red = plan.reduce
    xc = x - mean
    inv_std = 1.0 / (var + eps) ** 0.5
    xhat = xc * inv_std
    # Step 1
    dgamma = (dy * xhat).sum(axis=plan.param_sum_axes).reshape(plan.param_shape)
    dbeta = dy.sum(axis=plan.param_sum_axes).reshape(plan.param_shape)
    # Step 2
    dxhat = dy if cache.gamma is None else dy * cache.gamma
    if not cache.batch_stats:
        return (dxhat * inv_std).reshape(plan.input_shape), dgamma, dbeta
    # Step 3
    dvar = (dxhat * xc).sum(axis=red, keepdims=True) * -0.5 * (var + eps) ** -1.5
    # Step 4
    dmean = (dxhat * -inv_std).sum(axis=red, keepdims=True) + dvar * (-2.0 / m) * xc.sum(
        axis=red, keepdims=True
    )
    # Step 5
    dx = dxhat * inv_std + dvar * 2.0 * xc / m + dmean / m
    return dx.reshape(plan.input_shape), dgamma, dbeta


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    x: Any,
    plan: Plan,
    momentum: float | None,
    num_batches_tracked: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One step of the running statistics (PyTorch convention); returns new (mean, var, count).

    r ← (1 − a) · r + a · s with s the batch mean, or the *unbiased* batch variance m/(m − 1) · σ²_B;
    a = momentum, or a = 1/t (the cumulative average of the t batches seen) for momentum=None.
    Per-sample statistics (InstanceNorm) enter as their average over the batch.
    """
    t = num_batches_tracked + 1
    a = 1.0 / t if momentum is None else momentum
    mean, var = moments(x, plan)
    c = plan.channels
    m = plan.count
    batch_mean = np.asarray(mean).reshape(-1, c).mean(axis=0)
    batch_var = np.asarray(var).reshape(-1, c).mean(axis=0) * m / (m - 1)
    new_mean = (1 - a) * _f64(running_mean) + a * batch_mean
    new_var = (1 - a) * _f64(running_var) + a * batch_var
    return new_mean, new_var, t


def population_statistics(batch_means: Any, batch_vars: Any, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Inference statistics from the mini-batch statistics of a trained network (Ioffe & Szegedy, Alg. 2):

    E[x] = E_B[μ_B],    Var[x] = m/(m − 1) · E_B[σ²_B]

    ``batch_means``/``batch_vars`` have shape (number of batches, C) and hold the biased batch variances
    of batches of ``m`` values each.
    """
    if m < 2:
        raise ValueError(f"population_statistics: batches need m >= 2 values per channel, got m={m}.")
    means = _f64(batch_means)
    variances = _f64(batch_vars)
    return means.mean(axis=0), m / (m - 1) * variances.mean(axis=0)


def inference_affine(
    mean: Any, var: Any, gamma: Any = None, beta: Any = None, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """BN at inference as one affine map y = a·x + b, the form that folds into the preceding layer:

    a = γ / sqrt(Var + ε),    b = β − γ·E[x] / sqrt(Var + ε)
    """
    mean, var = _f64(mean), _f64(var)
    gamma = np.ones_like(mean) if gamma is None else _f64(gamma)
    beta = np.zeros_like(mean) if beta is None else _f64(beta)
    a = gamma / np.sqrt(var + eps)
    return a, beta - a * mean
