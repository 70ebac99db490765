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

Forward mode (``torch.autograd.forward_ad``). The Jacobian of x̂ with respect to x, over one statistic,
is rstd · (I − 11ᵀ/m − x̂x̂ᵀ/m): symmetric, so the tangent of x̂ is the closed form above applied to
the tangent ẋ, and with the tangents γ̇, β̇ of the parameters::

    ẏ = γ · rstd · ( ẋ − mean(ẋ) − x̂ · mean(ẋ ⊙ x̂) ) + γ̇ · x̂ + β̇      (batch statistics)
    ẏ = γ · rstd · ẋ + γ̇ · x̂ + β̇                                      (fixed statistics)

Fixed statistics are constants: a tangent on them is refused, as torch refuses it.

Running statistics, in training, are updated by the engine itself (:func:`update_running_stats`, or,
where the backend can, inside the kernel that computes the batch's statistics), once those are computed:
a call that raises before that leaves them untouched, and a guarded call
(:class:`~normlab.core.guard.RunningUpdate`) whose batch statistics are not finite leaves them as they were.

Backends: :func:`run` computes a call on the backend its caller chose (a
:class:`~normlab.core.backend.Backend`, or ``None`` for this module's torch operations, which are the
reference and the fallback). The backends compute the same quantities, with the same precision
guarantees, in fewer passes over memory; which one runs a call is decided above the core.

Precision: float16/bfloat16 inputs are computed in float32 and returned in their own dtype; float64
stays float64 (:mod:`normlab.core.conventions`). Statistics are taken on the centred data (``x − μ``),
never as E[x²] − E[x]², so data with a large mean and a tiny spread keeps its variance (see
:func:`moments`).
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as _forward_ad

from normlab.core.conventions import EMPTY_STATISTICS, accumulation_dtype, channels_last_format
from normlab.core.guard import commit, finite_statistics
from normlab.core.plan import Plan

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
    "composes",
    "forward_ad_active",
    "batched_tensor",
    "run",
    "Normalize",
    "NormalizeForwardAD",
]

def _as_view(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype)).reshape(plan.view_shape)


def owned(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor that is not a view: the same memory, sizes and strides. A backend may hand out its
    output as a view of recycled memory; an autograd Function's output that is a view cannot be modified
    in place (``out += identity``, ``ReLU(inplace=True)`` after a BatchNorm), so the Functions return this."""
    if torch.compiler.is_compiling() or not y._is_view():  # compiled: the torch engine's output, no view
        return y
    return torch.empty(0, dtype=y.dtype, device=y.device).set_(y.untyped_storage(), y.storage_offset(), y.size(),
                                                              y.stride())


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape an engine result back to ``x``'s shape, dtype and memory format."""
    t = t.reshape(x.shape).to(x.dtype)
    fmt = channels_last_format(x)
    if fmt is not None:
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
        shift, mean_shifted, var = (xv.new_full(plan.stat_shape, value) for value in EMPTY_STATISTICS)
        return shift, mean_shifted, var, xv
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
        dw = _sum_over(dy * xhat, plan.param_sum_axes)
    if need_b:
        db = _sum_over(dy, plan.param_sum_axes)
    if need_x:
        g = dy if weight is None else dy * weight
        if batch_stats:
            g_mean = g.mean(dim=plan.reduce, keepdim=True)
            gx_mean = (g * xhat).mean(dim=plan.reduce, keepdim=True)
            dx = (g - g_mean - xhat * gx_mean) * rstd
        else:
            dx = g * rstd
    return dx, dw, db


def _sum_over(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``t`` summed over ``axes``; no axes (LayerNorm over the whole input): ``t`` itself, where
    ``t.sum(dim=())`` would sum over everything."""
    return t.sum(dim=axes) if axes else t


VMAP_RUNNING_MESSAGE = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched. If you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False. If you are using a prebuilt module and do not need eval mode, please "
    "see the functorch website for resources on how to patch your module to work with vmap "
    "(torch.func.replace_all_batch_norm_modules_, or the module in eval mode)."
)
"""torch's own refusal (a RuntimeError) when running statistics would be updated in place under
``torch.func.vmap`` with per-example statistics; the running statistics are left as they were."""


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

    Both new values are computed before either buffer is written, so an update refused part-way leaves
    both as they were: under ``torch.func.vmap`` a batched statistic cannot be written into unbatched
    buffers, and the call raises torch's RuntimeError for BatchNorm under vmap
    (:data:`VMAP_RUNNING_MESSAGE`), as torch.nn does; under ``torch.func.grad``/``jvp`` writing into a
    buffer captured from outside raises functorch's own RuntimeError, as it does for torch.nn.
    """
    c = running_mean.shape[0]
    batch_mean, batch_var = mean.reshape(-1, c), var.reshape(-1, c)
    if batch_mean.shape[0] > 1:
        batch_mean, batch_var = batch_mean.mean(dim=0), batch_var.mean(dim=0)
    batch_var = batch_var.reshape(c) * (count / (count - 1)) if unbiased else batch_var.reshape(c)
    batch_mean, batch_var = batch_mean.reshape(c).to(running_mean.dtype), batch_var.to(running_var.dtype)
    if guarded and not finite_statistics(batch_mean, batch_var):
        return False
    # both new values are computed before either buffer is written (a refused write under vmap changes nothing)
    new_mean = torch.add(running_mean * (1.0 - momentum), batch_mean, alpha=momentum)
    new_var = torch.add(running_var * (1.0 - momentum), batch_var, alpha=momentum)
    try:
        running_mean.copy_(new_mean)
    except RuntimeError as e:
        if "vmap" in str(e):
            raise RuntimeError(VMAP_RUNNING_MESSAGE) from e
        raise
    running_var.copy_(new_var)
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
        commit(running, shift + mean_shifted, var, plan.count)
    return y, (shift, mean_shifted, rstd)


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on ``tensors`` (grad mode on, one of them requiring grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_transforms_active = torch._C._are_functorch_transforms_active


def composes() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) is active: then the
    engine runs its torch operations (:func:`forward_torch`) without the :class:`Normalize` node, and
    torch's own batching and differentiation rules of those operations apply. One C call when no transform
    is active."""
    return _transforms_active()


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (some input may carry a tangent)."""
    return _forward_ad._current_level >= 0


def run(backend, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running=None):
    """Normalize ``x`` with ``plan`` on ``backend`` (``None``: the torch engine):
    ``y = Normalize.apply(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)``; where
    autograd records nothing (inference, ``torch.no_grad()``) the same forward without an autograd node,
    which would cost more than the normalization of a small tensor. Under a ``torch.func`` transform
    (:func:`composes`) the torch operations of :func:`forward_torch`, recorded by the transform itself.

    ``running``: ``(running_mean, running_var, momentum)`` to update in place with the batch's statistics
    (pass it only when the statistics come from a non-empty batch), or ``None``.
    """
    if _transforms_active():  # composes() and forward_ad_active(), inline: they run at every call
        return compute_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, None)[0]
    if _forward_ad._current_level >= 0:
        dual = _has_tangent(x) or _has_tangent(weight) or _has_tangent(bias)
        if fixed_mean is not None:
            if dual and (_has_tangent(fixed_mean) or _has_tangent(fixed_var)):
                raise RuntimeError(FIXED_STATS_TANGENT_MESSAGE)
            fixed_mean, fixed_var = _primal(fixed_mean), _primal(fixed_var)  # constants: no tangent to carry
        if dual:
            return NormalizeForwardAD.apply(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)
    if records_grad(x, weight, bias):
        if torch.compiler.is_compiling():  # torch.compile traces Function.apply itself
            return Normalize.apply(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)
        return _apply_normalize(_unwrap(x), _unwrap(weight), _unwrap(bias), _unwrap(fixed_mean), _unwrap(fixed_var),
                                plan, eps, running, backend)
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

    The work is done by ``backend`` (a :class:`~normlab.core.backend.Backend`; ``None``: the torch
    operations of :func:`forward_torch` and :func:`backward_torch`); every backend saves the same
    statistics, so the backward may run on a different one than the forward.

    The backward is the closed form above. When a graph is requested for it (``create_graph=True``,
    e.g. for gradient penalties) it always runs :func:`backward_torch`, which recomputes the statistics
    from ``x`` with differentiable operations, so double backward sees their dependence on ``x``; so does
    a backward given a batch of gradients at once (``torch.autograd.grad(..., is_grads_batched=True)``,
    gradcheck's batched-gradient check), whose ``dy`` only torch operations can take. The forward-mode
    derivative is :class:`NormalizeForwardAD`'s.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running, backend):
        y, saved = Normalize._compute(ctx, x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)
        ctx.save_for_backward(*saved)
        return owned(y)

    @staticmethod
    def _compute(ctx, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running, backend):
        """``y`` and the tensors the derivatives need, ``(x, γ, shift, mean_shifted, rstd)``; the rest on ``ctx``."""
        y, (shift, mean_shifted, rstd) = compute_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, running,
                                                         backend)
        ctx.plan, ctx.eps, ctx.batch_stats, ctx.backend = plan, eps, fixed_mean is None, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y, (x, weight, shift, mean_shifted, rstd)

    @staticmethod
    def backward(ctx, dy):
        x, weight, shift, mean_shifted, rstd = ctx.saved_tensors
        plan: Plan = ctx.plan
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return None, None, None, None, None, None, None, None, None
        if ctx.backend is not None and not torch.is_grad_enabled() and not batched_tensor(dy):
            dx, dw, db = ctx.backend.backward(dy, x, weight, shift, mean_shifted, rstd, plan, ctx.batch_stats, need)
        else:
            dx, dw, db = backward_torch(dy, x, weight, shift, mean_shifted, rstd, plan, ctx.batch_stats, need, ctx.eps)
            if dx is not None:
                dx = _like_input(dx, x)
        dw, db = finish_param_grads(dw, db, weight, plan, ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None, None


_apply_normalize = super(torch.autograd.Function, Normalize).apply
"""``Normalize.apply`` without the Python wrapper of :meth:`torch.autograd.Function.apply` (about a third of the
node's cost on a small tensor), for :func:`run` where no ``torch.func`` transform is active: that wrapper then
only unwraps the arguments left over from a finished transform, which :func:`_unwrap` does."""

_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _unwrap(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as :meth:`torch.autograd.Function.apply` passes it on: a tensor left wrapped by a finished
    ``torch.func`` transform unwrapped."""
    return t if t is None else _unwrap_if_dead(t)


class NormalizeForwardAD(Normalize):
    """:class:`Normalize` with the forward-mode derivative (:meth:`jvp`, the formula of the module docstring,
    computed with torch operations from the statistics the backend saved), used while a
    ``torch.autograd.forward_ad.dual_level`` is open: torch.compile cannot trace a Function with a
    ``jvp``, so :class:`Normalize` itself has none."""

    @staticmethod
    def forward(ctx, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running, backend):
        y, saved = Normalize._compute(ctx, x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        return owned(y)

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        """The tangent of ``y`` from those of ``x``, γ and β (see the module docstring); the fixed
        statistics carry none (:func:`run` refused or removed theirs)."""
        x, weight, shift, mean_shifted, rstd = ctx.saved_tensors
        return tangent(x, weight, shift, mean_shifted, rstd, dx, dw, db, ctx.plan, ctx.batch_stats)


FIXED_STATS_TANGENT_MESSAGE = (
    "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined "
    "(normalization uses the running statistics as constants; pass them without a tangent, e.g. "
    "torch.autograd.forward_ad.unpack_dual(running_mean).primal)"
)
"""torch's refusal (a RuntimeError) of a forward-mode tangent on the running statistics."""


def _has_tangent(t: torch.Tensor | None) -> bool:
    return t is not None and _forward_ad.unpack_dual(t).tangent is not None


def _primal(t: torch.Tensor) -> torch.Tensor:
    return _forward_ad.unpack_dual(t).primal


def batched_tensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a batch of tensors under vmap (``is_grads_batched`` runs the backward that way)."""
    return torch._C._functorch.is_legacy_batchedtensor(t) or torch._C._functorch.is_batchedtensor(t)


def tangent(x, weight, shift, mean_shifted, rstd, dx, dw, db, plan: Plan, batch_stats: bool):
    """ẏ from the tangents ``dx``, ``dw``, ``db`` (each may be ``None``) and the statistics saved by the
    forward, in ``x``'s shape, dtype and memory format; ``None`` where no input has a tangent."""
    if dx is None and dw is None and db is None:
        return None
    acc = accumulation_dtype(x.dtype)
    shift, mean_shifted, rstd = (_stat_view(t, plan) for t in (shift, mean_shifted, rstd))
    xc = centre(_as_view(x, plan), shift, mean_shifted)
    dy = None
    if dx is not None:
        # P ẋ, P the (symmetric) Jacobian of x̂; γ varies along the reduced axes for LayerNorm, so it is
        # applied after the projection here, where the backward applies it before.
        dy = normalize_backward(_as_view(dx, plan), xc, rstd, None, plan, batch_stats, (True, False, False))[0]
        if weight is not None:
            dy = dy * _param(weight, plan, acc)
    if dw is not None:
        term = xc * rstd * _param(dw, plan, acc)
        dy = term if dy is None else dy + term
    if db is not None:
        term = _param(db, plan, acc).expand(xc.shape)
        dy = term if dy is None else dy + term
    return _like_input(dy, x)
