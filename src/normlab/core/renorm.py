r"""Batch renormalization (Ioffe 2017): batch statistics corrected towards the running ones.

BatchNorm normalizes with the batch's μ_B and σ_B = sqrt(σ²_B + eps), which for small or non-i.i.d.
batches differ from the population's, so that training and inference see different functions. Batch
renormalization keeps the batch statistics in the forward but corrects the result by how far they are
from the running μ and σ = sqrt(running_var + eps)::

    r = clip(σ_B / σ, 1/r_max, r_max)        d = clip((μ_B − μ) / σ, −d_max, d_max)
    x̂ = (x − μ_B) / σ_B · r + d              y = γ x̂ + β

r and d are treated as constants by the backward (they carry no gradient). Without the clipping x̂ would
be (x − μ)/σ, the inference function; with r_max = 1, d_max = 0 it is BatchNorm exactly.

Backward. Write x̂_B = (x − μ_B)/σ_B (BatchNorm's normalized value) so that x̂ = r·x̂_B + d. With r and d
constant, ∂L/∂x̂_B = r·∂L/∂x̂ = r·γ·∂L/∂y, and x̂_B depends on x exactly as in BatchNorm, so BatchNorm's
closed form applies with g_i = r·γ·∂L/∂y_i::

    ∂L/∂x_i = (1/σ_B) · ( g_i − mean(g) − x̂_B,i · mean(g ⊙ x̂_B) )
    ∂L/∂γ   = Σ ∂L/∂y ⊙ x̂ = r · Σ ∂L/∂y ⊙ x̂_B + d · Σ ∂L/∂y,       ∂L/∂β = Σ ∂L/∂y

So the engine's BatchNorm passes do all the work: the forward computes x̂_B (BatchNorm without γ, β,
updating the running statistics with the batch's as BatchNorm does, after r and d were taken from the
old ones) and one elementwise pass applies ``x̂_B · (γ r) + (γ d + β)``; the backward is BatchNorm's
backward with the weight γ·r, whose dγ (Σ ∂L/∂y ⊙ x̂_B) and dβ give ∂L/∂γ above.
"""

from __future__ import annotations

import torch

from normlab.core.engine import (
    _like_input,
    accumulation_dtype,
    backward_torch,
    compute_forward,
    finish_param_grads,
    records_grad,
)
from normlab.core.plan import Plan

__all__ = ["Renormalize", "renorm_factors", "renormalize"]


@torch.no_grad()
def renorm_factors(batch_mean, batch_rstd, running_mean, running_var, eps: float, r_max: float, d_max: float):
    """``(r, d)`` per channel, detached, in the dtype of ``batch_mean``: r = clip(σ_B/σ, 1/r_max, r_max),
    d = clip((μ_B − μ)/σ, −d_max, d_max) with σ_B = 1/batch_rstd and σ = sqrt(running_var + eps)."""
    acc = batch_mean.dtype
    sigma = torch.sqrt(running_var.to(acc) + eps)
    r = (1.0 / (batch_rstd * sigma)).clamp_(1.0 / r_max, r_max)
    d = ((batch_mean - running_mean.to(acc)) / sigma).clamp_(-d_max, d_max)
    return r, d


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    return t.reshape(channels)


class Renormalize(torch.autograd.Function):
    """``y = Renormalize.apply(x, γ, β, running_mean, running_var, plan, eps, momentum, r_max, d_max, backend)``
    for a BatchNorm ``plan``; the running statistics are updated in place (weight ``momentum``) with the
    batch's, after r and d were computed from their old values. See the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, plan: Plan, eps, momentum, r_max, d_max, backend):
        y, saved = _forward(x, weight, bias, running_mean, running_var, plan, eps, momentum, r_max, d_max, backend)
        ctx.save_for_backward(x, weight, *saved)
        ctx.plan, ctx.eps, ctx.backend = plan, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, shift, mean_shifted, rstd, r, d = ctx.saved_tensors
        plan: Plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 8
        if not (need_x or need_w or need_b):
            return (None, None, None) + nones
        scale = r if weight is None else weight.to(r.dtype) * r  # γ·r: BatchNorm's backward with this weight
        need = (need_x, need_w, need_w or need_b)  # ∂L/∂γ needs Σ ∂L/∂y too
        if ctx.backend is not None and not torch.is_grad_enabled():
            dx, dw, db = ctx.backend.backward(dy, x, scale, shift, mean_shifted, rstd, plan, True, need)
        else:
            dx, dw, db = backward_torch(dy, x, scale, shift, mean_shifted, rstd, plan, True, need, ctx.eps)
            if dx is not None:
                dx = _like_input(dx, x)
        c = plan.channels
        if need_w:
            dw = r * _per_channel(dw, c) + d * _per_channel(db, c)
        dw, db = finish_param_grads(dw, db if need_b else None, weight if need_w else None, plan, ctx.bias_dtype)
        return (dx, dw, db) + nones


def _forward(x, weight, bias, running_mean, running_var, plan: Plan, eps, momentum, r_max, d_max, backend):
    """``(y, (shift, mean_shifted, rstd, r, d))``: BatchNorm's x̂_B from the backend (which also updates the
    running statistics), then one pass for ``x̂_B · γr + (γd + β)``."""
    acc = accumulation_dtype(x.dtype)
    c = plan.channels
    old_mean, old_var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    xin = x if x.dtype == acc else x.to(acc)  # x̂_B is not rounded to half precision before the affine step
    running = (running_mean, running_var, float(momentum))
    xhat, (shift, mean_shifted, rstd) = compute_forward(xin, None, None, None, None, plan, eps, running, backend)
    mean = _per_channel(shift, c) + (0.0 if mean_shifted is None else _per_channel(mean_shifted, c))
    r, d = renorm_factors(mean, _per_channel(rstd, c), old_mean, old_var, eps, r_max, d_max)
    scale = r if weight is None else weight.detach().to(acc) * r
    offset = d if weight is None else weight.detach().to(acc) * d
    if bias is not None:
        offset = offset + bias.detach().to(acc)
    # x̂_B is the engine's fresh output, in the accumulation dtype (the backends' recycled memory): in place
    y = torch.addcmul(offset.reshape(plan.param_view), xhat, scale.reshape(plan.param_view), out=xhat)
    return _like_input(y, x), (shift, mean_shifted, rstd, r, d)


def renormalize(backend, x, weight, bias, running_mean, running_var, plan: Plan, eps: float, momentum: float,
                r_max: float, d_max: float) -> torch.Tensor:
    """Batch renormalization of ``x`` (training) on ``backend`` (``None``: the torch engine); the running
    statistics are updated in place. Without an autograd node where nothing would be recorded."""
    if records_grad(x, weight, bias):
        return Renormalize.apply(x, weight, bias, running_mean, running_var, plan, eps, momentum, r_max, d_max,
                                 backend)
    return _forward(x, weight, bias, running_mean, running_var, plan, eps, momentum, r_max, d_max, backend)[0]
