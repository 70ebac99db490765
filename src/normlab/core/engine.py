"""The normalization engine: statistics, normalization, the closed-form backward, running statistics.

Every layer of normlab runs through :class:`Normalize`, a ``torch.autograd.Function`` driven by a
:class:`~normlab.core.plan.Plan` (called as :func:`run`, which skips building the autograd node where
nothing would be recorded). The formulas live here and nowhere else in the torch code:

Forward, over the ``m`` values of one statistic (``plan.reduce``)::

    μ = (1/m) Σ x_i                    σ² = (1/m) Σ (x_i − μ)²      (biased)
    x̂_i = (x_i − μ) · rstd,            rstd = 1 / sqrt(σ² + eps)
    y_i = γ x̂_i + β

Backward. With g_i = ∂L/∂x̂_i = γ ∂L/∂y_i, the five steps of the derivation (dγ, dβ, ∂L/∂x̂, ∂L/∂σ²,
∂L/∂μ, then ∂L/∂x) collapse, after substituting ∂L/∂σ² and ∂L/∂μ into step 5 and using Σ(x_i − μ) = 0,
into the closed form::

    ∂L/∂x_i = rstd · ( g_i − mean(g) − x̂_i · mean(g ⊙ x̂) )
    ∂L/∂γ   = Σ ∂L/∂y ⊙ x̂,       ∂L/∂β = Σ ∂L/∂y          (summed over every axis γ does not vary along)

When the statistics are fixed (inference with running statistics) they are constants and
∂L/∂x_i = rstd · g_i.

Running statistics, in training, are updated by the engine itself (:func:`update_running_stats`, or,
where the backend can, inside the kernel that computes the batch's statistics), once those are computed:
a call that raises before that leaves them untouched, and a guarded call
(:class:`~normlab.core.guard.RunningUpdate`) whose batch statistics are not finite leaves them as they were.

Backends: :func:`run` asks :func:`normlab.kernels.select` which backend computes a call. The
torch operations of this module are the reference and the fallback; the CPU kernels (numba) and GPU
kernels (Triton) of :mod:`normlab.kernels` compute the same quantities, with the same precision
guarantees, in fewer passes over memory.

Precision: float16/bfloat16 inputs are computed in float32 and returned in their own dtype; float64
stays float64. Statistics are taken on the centred data (``x − μ``), never as E[x²] − E[x]², so data with a
large mean and a tiny spread keeps its variance (see :func:`moments`).
"""

from __future__ import annotations

import torch

from normlab.core.guard import finite_statistics
from normlab.core.plan import Plan
from normlab.kernels.dispatch import select as select_backend

__all__ = [
    "accumulation_dtype",
    "moments",
    "centre",
    "normalize",
    "normalize_backward",
    "update_running_stats",
    "forward_torch",
    "backward_torch",
    "compute_forward",
    "records_grad",
    "run",
    "run_on",
    "Normalize",
]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_view(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype)).reshape(plan.view_shape)


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape an engine result back to ``x``'s shape, dtype and memory format."""
    t = t.reshape(x.shape).to(x.dtype)
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    return t


def moments(xv: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics over ``plan.reduce`` as ``(shift, mean_shifted, var, xc)``: the first three of shape
    ``plan.stat_shape``, and the centred data ``xc = x − μ`` they give, which the callers go on to use.

    The mean is μ = shift + mean_shifted, where ``shift`` is a sample of the data itself (the median of
    three values of each statistic, see :func:`_origin`) and ``mean_shifted = mean(x − shift)``; ``var``
    is the *biased* variance. Subtracting a nearby sample first is exact for data whose values are within
    a factor of two of each other, so a large mean with a tiny spread (1e4 + N(0, 1e-2) in float32, where
    μ itself is only representable to ±5e-4) keeps every digit of x − μ and of the variance.
    """
    if xv.numel() == 0:  # an empty batch: statistics of nothing, never written to running averages
        zeros = xv.new_zeros(plan.stat_shape)
        return zeros, zeros, zeros + 1, xv
    shift = _origin(xv, plan.reduce)
    shifted = xv - shift
    var, mean_shifted = torch.var_mean(shifted, dim=plan.reduce, correction=0, keepdim=True)
    return shift, mean_shifted, var, shifted - mean_shifted


def _origin(xv: torch.Tensor, reduce: tuple[int, ...]) -> torch.Tensor:
    """Per statistic, the median of its first value, its last, and the one at the middle index of every
    reduced axis (detached, in ``plan.stat_shape``).

    Not simply the first value: were that an outlier (a first sample of 1e5 among 1e-2 · N(0, 1)), every
    other x − shift would be of its size and lose the digits that tell the values apart (BatchNorm1d on
    (8192, 4): 7e-6 off the float64 answer, against 2e-9 about the median). One outlier among the three
    cannot be the median."""
    def sample(position):
        index = [slice(None)] * xv.dim()
        for d in reduce:
            i = position(xv.shape[d])
            index[d] = slice(i, i + 1)
        return xv[tuple(index)]

    a, b, c = sample(lambda n: 0), sample(lambda n: n // 2), sample(lambda n: n - 1)
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c)).detach()


def centre(xv: torch.Tensor, shift: torch.Tensor, mean_shifted: torch.Tensor | None) -> torch.Tensor:
    """x − μ, computed as (x − shift) − mean_shifted so that no digit is lost (see :func:`moments`)."""
    xc = xv - shift
    return xc if mean_shifted is None else xc - mean_shifted


def _param(p: torch.Tensor | None, plan: Plan, dtype: torch.dtype) -> torch.Tensor | None:
    return None if p is None else p.to(dtype).reshape(plan.param_view)


def normalize(
    xc: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = γ · (x − μ) · rstd + β from the centred ``xc = x − μ``; γ, β shaped as ``plan.param_view``."""
    scale = rstd if weight is None else rstd * weight
    y = xc * scale
    if bias is not None:
        y = y + bias
    return y


def normalize_backward(
    dy: torch.Tensor,
    xc: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    plan: Plan,
    batch_stats: bool,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form gradients (dx, dγ, dβ) in the view's shape from the centred ``xc = x − μ``; see the
    module docstring."""
    need_x, need_w, need_b = need
    xhat = xc * rstd
    dx = dw = db = None
    if need_w:
        dw = (dy * xhat).sum(dim=plan.param_sum_axes)
    if need_b:
        db = dy.sum(dim=plan.param_sum_axes)
    if need_x:
        g = dy if weight is None else dy * weight
        if batch_stats:
            g_mean = g.mean(dim=plan.reduce, keepdim=True)
            gx_mean = (g * xhat).mean(dim=plan.reduce, keepdim=True)
            dx = (g - g_mean - xhat * gx_mean) * rstd
        else:
            dx = g * rstd
    return dx, dw, db


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
    guarded: bool = False,
    unbiased: bool = True,
) -> bool:
    """running ← (1 − momentum) · running + momentum · batch statistic, in place; returns whether it
    updated (``guarded``: not when a batch statistic is not finite, see :mod:`normlab.core.guard`).

    The variance stored is the *unbiased* one, ``m/(m − 1) · σ²``, so that the running variance estimates
    the population variance (``unbiased=False``: σ² itself, Keras' and Flax's convention). Where each sample has its own statistics (InstanceNorm) the batch statistic
    is their average over the batch.
    """
    c = running_mean.shape[0]
    batch_mean, batch_var = mean.reshape(-1, c), var.reshape(-1, c)
    if batch_mean.shape[0] > 1:
        batch_mean, batch_var = batch_mean.mean(dim=0), batch_var.mean(dim=0)
    batch_var = batch_var.reshape(c) * (count / (count - 1)) if unbiased else batch_var.reshape(c)
    batch_mean, batch_var = batch_mean.reshape(c).to(running_mean.dtype), batch_var.to(running_var.dtype)
    if guarded and not finite_statistics(batch_mean, batch_var):
        return False
    running_mean.mul_(1.0 - momentum).add_(batch_mean, alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(batch_var, alpha=momentum)
    return True


def forward_torch(x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float):
    """The forward in torch operations: ``(y, shift, mean_shifted, var, rstd)``.

    ``y`` is in the accumulation dtype and the view's shape; the statistics are in ``plan.stat_shape``
    (``plan.param_view`` for fixed statistics, where ``shift`` is the fixed mean and ``mean_shifted``
    is ``None``). Every backend's ``forward`` returns the same five values (``y`` in the input's shape,
    dtype and memory format; the statistics may be flat, one value per statistic).
    """
    acc = accumulation_dtype(x.dtype)
    xv = _as_view(x, plan)
    if fixed_mean is None:
        shift, mean_shifted, var, xc = moments(xv, plan)
    else:
        shift = fixed_mean.to(acc, copy=True).reshape(plan.param_view)  # saved for backward: not a view of a buffer
        mean_shifted = None
        var = fixed_var.to(acc).reshape(plan.param_view)
        xc = centre(xv, shift, None)
    rstd = torch.rsqrt(var + eps)
    y = normalize(xc, rstd, _param(weight, plan, acc), _param(bias, plan, acc))
    return y, shift, mean_shifted, var, rstd


def _stat_view(t: torch.Tensor | None, plan: Plan) -> torch.Tensor | None:
    """A statistic saved flat by a backend (one value per statistic) in ``plan.stat_shape``; statistics
    already shaped to broadcast are returned as they are."""
    if t is None or t.dim() != 1 or len(plan.stat_shape) == 1:
        return t
    return t.reshape(plan.stat_shape)


def backward_torch(dy, x, weight, shift, mean_shifted, rstd, plan: Plan, batch_stats: bool, need, eps: float):
    """The closed-form backward in torch operations: ``(dx, dγ, dβ)`` in the view's shape.

    When autograd records (``create_graph=True``) and the statistics came from the batch, they are
    recomputed from ``x`` with differentiable operations, so that double backward sees their dependence
    on ``x``; otherwise the saved ``shift``, ``mean_shifted`` and ``rstd`` are used, whichever backend
    computed them.
    """
    acc = accumulation_dtype(x.dtype)
    xv = _as_view(x, plan)
    if batch_stats and torch.is_grad_enabled():
        _, _, var, xc = moments(xv, plan)
        rstd = torch.rsqrt(var + eps)
    else:
        shift, mean_shifted, rstd = (_stat_view(t, plan) for t in (shift, mean_shifted, rstd))
        xc = centre(xv, shift, mean_shifted)
    return normalize_backward(
        _as_view(dy, plan), xc, rstd, _param(weight, plan, acc), plan, batch_stats, need,
    )


def compute_forward(x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running, backend, **epilogue):
    """``(y, (shift, mean_shifted, rstd))`` computed by ``backend`` (``None``: :func:`forward_torch`), and
    ``running = (running_mean, running_var, momentum)``, if given, updated with the batch's statistics:
    by the backend in the same pass where it can (``backend.updates_running``), else afterwards by
    :func:`update_running_stats`. ``epilogue`` (``relu=True``, ``residual=``) goes to a fusing backend."""
    if backend is None:
        y, shift, mean_shifted, var, rstd = forward_torch(x, weight, bias, fixed_mean, fixed_var, plan, eps)
        y = _like_input(y, x)
    else:
        folded = running is not None and getattr(backend, "updates_running", None) is not None and (
            backend.updates_running(x, plan, running[0], running[1])
        )
        if folded:
            epilogue["running"] = running
            running = None
        y, shift, mean_shifted, var, rstd = backend.forward(x, weight, bias, fixed_mean, fixed_var, plan, eps,
                                                            **epilogue)
    if running is not None:
        guarded, unbiased = getattr(running, "guarded", False), getattr(running, "unbiased", True)
        if not update_running_stats(running[0], running[1], shift + mean_shifted, var, plan.count, running[2],
                                    guarded, unbiased):
            running.skipped = True
    return y, (shift, mean_shifted, rstd)


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on ``tensors`` (grad mode on, one of them requiring grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def run(x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running=None):
    """Normalize ``x`` with ``plan`` on the backend :func:`normlab.kernels.select` picks; see :func:`run_on`."""
    return run_on(select_backend(x, plan, fixed_mean is None), x, weight, bias, fixed_mean, fixed_var, plan, eps,
                  running)


def run_on(backend, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running=None):
    """``y = Normalize.apply(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)``; where
    autograd records nothing (inference, ``torch.no_grad()``) the same forward without an autograd node,
    which would cost more than the normalization of a small tensor.

    ``running``: ``(running_mean, running_var, momentum)`` to update in place with the batch's statistics
    (pass it only when the statistics come from a non-empty batch), or ``None``.
    """
    if records_grad(x, weight, bias):
        return Normalize.apply(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)
    return compute_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)[0]


def finish_param_grads(dw, db, weight, plan: Plan, bias_dtype):
    """dγ and dβ from a backend's flat accumulation-dtype sums to the parameters' shapes and dtypes."""
    if dw is not None and (dw.shape != weight.shape or dw.dtype != weight.dtype):
        dw = dw.reshape(weight.shape).to(weight.dtype)
    if db is not None and (db.shape != plan.param_shape or db.dtype != bias_dtype):
        db = db.reshape(plan.param_shape).to(bias_dtype)
    return dw, db


class Normalize(torch.autograd.Function):
    """``y = Normalize.apply(x, γ, β, fixed_mean, fixed_var, plan, eps, running, backend)``.

    With ``fixed_mean``/``fixed_var`` set to ``None`` the statistics come from ``x`` (training); otherwise
    those tensors (shape ``(C,)``, e.g. running statistics) are used as constants. ``running`` (or
    ``None``) is ``(running_mean, running_var, momentum)``, updated in place with the batch's statistics.

    The work is done by ``backend`` (from :func:`normlab.kernels.select`; ``None``: the torch
    operations of :func:`forward_torch` and :func:`backward_torch`); every backend saves the same
    statistics, so the backward may run on a different one than the forward.

    The backward is the closed form above. When a graph is requested for it (``create_graph=True``,
    e.g. for gradient penalties) it always runs :func:`backward_torch`, which recomputes the statistics
    from ``x`` with differentiable operations, so double backward sees their dependence on ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running, backend):
        y, (shift, mean_shifted, rstd) = compute_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, running,
                                                         backend)
        ctx.save_for_backward(x, weight, shift, mean_shifted, rstd)
        ctx.plan, ctx.eps, ctx.batch_stats, ctx.backend = plan, eps, fixed_mean is None, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, shift, mean_shifted, rstd = ctx.saved_tensors
        plan: Plan = ctx.plan
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return None, None, None, None, None, None, None, None, None
        if ctx.backend is not None and not torch.is_grad_enabled():
            dx, dw, db = ctx.backend.backward(dy, x, weight, shift, mean_shifted, rstd, plan, ctx.batch_stats, need)
        else:
            dx, dw, db = backward_torch(dy, x, weight, shift, mean_shifted, rstd, plan, ctx.batch_stats, need, ctx.eps)
            if dx is not None:
                dx = _like_input(dx, x)
        dw, db = finish_param_grads(dw, db, weight, plan, ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None
