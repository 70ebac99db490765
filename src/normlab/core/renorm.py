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
from normlab.core.guard import commit
from normlab.core.plan import Plan
from normlab.core.stats import unmerged

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
    """``y = Renormalize.apply(x, γ, β, running_mean, running_var, plan, eps, running, r_max, d_max, backend)``
    for a BatchNorm ``plan``. r and d come from ``running_mean`` and ``running_var``; ``running`` (a
    :class:`~normlab.core.guard.RunningUpdate` on those two, or ``None`` to leave them as they are) then
    updates them in place with the batch's statistics, guarded (:func:`normlab.core.guard.commit`). See the
    module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, plan: Plan, eps, running, r_max, d_max, backend):
        y, saved = _forward(x, weight, bias, running_mean, running_var, plan, eps, running, r_max, d_max, backend)
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


def _forward(x, weight, bias, running_mean, running_var, plan: Plan, eps, running, r_max, d_max, backend):
    """``(y, (shift, mean_shifted, rstd, r, d))``: on a backend with the statistics seam
    (:func:`_forward_seam`), BatchNorm's two passes with r and d folded into the affine map; else BatchNorm's
    x̂_B from the backend (which also makes the ``running`` update, if any), then one pass for
    ``x̂_B · γr + (γd + β)``."""
    if seam_ready(backend, x, plan):
        return _forward_seam(x, weight, bias, running_mean, running_var, plan, eps, running, r_max, d_max, backend)
    acc = accumulation_dtype(x.dtype)
    c = plan.channels
    old_mean, old_var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    xin = x if x.dtype == acc else x.to(acc)  # x̂_B is not rounded to half precision before the affine step
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


def seam_ready(backend, x: torch.Tensor, plan: Plan) -> bool:
    """Whether ``backend`` runs ``plan`` on ``x`` through the statistics seam (``partial_moments`` and
    ``apply_moments``: the optional capability of :class:`~normlab.core.backend.Backend`)."""
    return (backend is not None and getattr(backend, "apply_moments", None) is not None
            and backend.unsupported(x, plan) is None and x.numel() > 0)


def _forward_seam(x, weight, bias, running_mean, running_var, plan: Plan, eps, running, r_max, d_max, backend):
    """:func:`_forward` through the seam: the batch's moments (one pass), r and d from them and the old
    running statistics, then one pass that normalizes with γ' = γr and β' = γd + β (the affine map
    y = γ (x̂_B r + d) + β with r and d folded in), updating ``running`` as BatchNorm does."""
    acc = accumulation_dtype(x.dtype)
    c = plan.channels
    merged = tuple(t.reshape(c) for t in unmerged(backend.partial_moments(x, plan)))  # one place
    _, common, about, var = merged
    rstd_b = torch.rsqrt(var + eps).to(acc)
    r, d = renorm_factors((common + about).to(acc), rstd_b, running_mean, running_var, eps, r_max, d_max)
    w = None if weight is None else weight.detach().to(acc).reshape(c)
    scale = r if w is None else w * r
    offset = d if w is None else w * d
    if bias is not None:
        offset = offset + bias.detach().to(acc).reshape(c)
    folded = running is not None and getattr(backend, "updates_running", None) is not None and (
        backend.updates_running(x, plan, running[0], running[1]))
    y, shift, mean_shifted, var_b, rstd = backend.apply_moments(x, scale, offset, merged, plan, eps,
                                                                 running=running if folded else None)
    if running is not None and not folded:
        commit(running, shift + mean_shifted, var_b, plan.count)
    return y, (shift, mean_shifted, rstd, r, d)


def renormalize(backend, x, weight, bias, running_mean, running_var, plan: Plan, eps: float, running,
                r_max: float, d_max: float) -> torch.Tensor:
    """Batch renormalization of ``x`` (training) on ``backend`` (``None``: the torch engine); the running
    statistics are updated in place by ``running`` (``None``: not at all, e.g. on a checkpointed segment's
    recomputation). Without an autograd node where nothing would be recorded."""
    if records_grad(x, weight, bias):
        return Renormalize.apply(x, weight, bias, running_mean, running_var, plan, eps, running, r_max, d_max,
                                 backend)
    return _forward(x, weight, bias, running_mean, running_var, plan, eps, running, r_max, d_max, backend)[0]
