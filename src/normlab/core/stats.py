"""BatchNorm's training step as partial statistics → combine → apply: the seam for statistics from elsewhere.

One BatchNorm call computes per-channel statistics over its whole batch. When the batch is spread over
several places (the ranks of a process group, the virtual batches of ghost BN, the unmasked values of a
padded batch) the statistics are the *merge* of per-place partial statistics. This module splits the
training forward and backward of the engine (:mod:`normlab.core.engine`) into three steps so that a
caller can put its own combine step in the middle:

Forward, per channel::

    partial   (n, s, d, M2):  n values, a shift s (one of the values), d = mean(x − s), M2 = Σ (x − s − d)²
    combine   caller's step:  the partials of every place, stacked (P, 4, C)   [one place: the identity]
    merge     Chan et al.:    K = s of the first non-empty partial,  d_i' = (s_i − K) + d_i,
                              N = Σ n_i,  D = Σ (n_i/N) d_i',  M2 = Σ M2_i + Σ n_i (d_i' − D)²
    apply     μ = K + D,  σ² = M2 / N,  x̂ = ((x − K) − D) · rstd,  y = γ x̂ + β

The merge is exact in the sense of Chan, Golub & LeVeque (1979): it never forms E[x²] − E[x]², and every
difference it takes is between values of the data (or their means), so data with a large mean and a tiny
spread keeps its variance. It is written once, in :func:`merge_moments`.

Backward, with g = γ ∂L/∂y per value::

    partial   (Σ g, Σ g·x̂) per channel over this place's values
    combine   caller's step:  their sum over every place                    [one place: the identity]
    apply     ∂L/∂x = rstd · (g − Σg/N − x̂ · Σ(g·x̂)/N)
              ∂L/∂γ = Σ ∂L/∂y ⊙ x̂,  ∂L/∂β = Σ ∂L/∂y   (over this place's values; the caller sums them over
                                                      places, e.g. DistributedDataParallel's all-reduce)

The combine steps are callables ``combine_moments(local) -> stacked`` (``local`` of shape (k, 4, C), the
result of shape (P, 4, C), every place's partials, in the same order everywhere) and
``combine_sums(local) -> total`` (shape (2, C), summed over places). :func:`identity` is the one-process
combine for both.

The partial and apply steps run on the torch engine (this module's functions), or on a backend that
implements the seam (:func:`seam_of`: ``partial_moments``, ``apply_moments``, ``partial_grad_sums``,
``apply_grad``, see :class:`~normlab.core.backend.Backend`), whose kernels compute the partials in one
pass and apply the merged statistics in another; the merge stays :func:`merge_moments`, so the
statistics are the same whichever backend computes the partials.

Masked statistics (:mod:`normlab.core.masked`) use the same steps with
:func:`masked_partial_moments`, whose partials cover the valid positions only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from normlab.core.engine import _as_view, _like_input, _param, accumulation_dtype, centre, moments, normalize, owned
from normlab.core.guard import commit
from normlab.core.plan import Plan, batch_plan

__all__ = [
    "PACKED_DTYPE",
    "identity",
    "partial_moments",
    "masked_partial_moments",
    "merge_moments",
    "unmerged",
    "partial_grad_sums",
    "apply_backward",
    "SEAM_METHODS",
    "seam_of",
    "CombinedNormalize",
    "normalize_combined",
]

# Partial moments are packed in float64 whatever the input's dtype: the counts stay exact (to 2**53) and
# the merge adds no rounding of its own; they are (4, C) values per place, so the cost is nothing.
PACKED_DTYPE = torch.float64

Combine = Callable[[torch.Tensor], torch.Tensor]

SEAM_METHODS = ("partial_moments", "apply_moments", "partial_grad_sums", "apply_grad")
"""The methods of a backend that implements the statistics seam (:class:`~normlab.core.backend.Backend`)."""


def seam_of(backend):
    """``backend`` if it implements the statistics seam (every one of :data:`SEAM_METHODS`), else ``None``:
    the torch engine's steps of this module, which every case can take."""
    if backend is not None and all(callable(getattr(backend, name, None)) for name in SEAM_METHODS):
        return backend
    return None


def identity(t: torch.Tensor) -> torch.Tensor:
    """The combine step of a batch that lives in one place: its partials are all there is."""
    return t


def partial_moments(xv: torch.Tensor, plan: Plan, mask: torch.Tensor | None = None,
                    group_size: int | None = None) -> torch.Tensor:
    """This place's per-channel ``(n, s, d, M2)`` packed as a ``(1, 4, C)`` float64 tensor (see the module
    docstring); an empty batch gives ``n = 0`` and zeros, which the merge ignores.

    ``plan`` is a BatchNorm plan (one statistic per channel, axis 1); the shift and the centred moments
    are :func:`~normlab.core.engine.moments`'. The reference of the backends' seam, with its two optional
    keywords (:class:`~normlab.core.backend.Backend`): ``mask`` (bool, one entry per position of a channel)
    takes the positions it marks True only (:func:`masked_partial_moments`); ``group_size`` gives a
    ``(G, 4, C)`` tensor, one row per group of that many consecutive samples (the last one possibly smaller).
    """
    if group_size is not None:
        chunks = xv.split(int(group_size))
        masks = [None] * len(chunks) if mask is None else mask.split(int(group_size))
        return torch.cat([partial_moments(chunk, batch_plan(tuple(chunk.shape)), m) for chunk, m in zip(chunks, masks)])
    c = plan.view_shape[1]
    if mask is not None:
        flat = mask.reshape(-1)
        rows = xv.movedim(1, -1).reshape(-1, c).to(accumulation_dtype(xv.dtype))
        return masked_partial_moments(rows, flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))[0]
    packed = torch.zeros(1, 4, c, dtype=PACKED_DTYPE, device=xv.device)
    if xv.numel() == 0:
        return packed
    shift, mean_shifted, var, _ = moments(xv, plan)
    packed[0, 0] = plan.count
    packed[0, 1] = shift.reshape(c)
    packed[0, 2] = mean_shifted.reshape(c)
    packed[0, 3] = var.reshape(c).to(PACKED_DTYPE) * plan.count
    return packed


def masked_partial_moments(rows: torch.Tensor, valid: torch.Tensor, padded: torch.Tensor,
                           out: torch.Tensor | None = None):
    """This place's ``(n, s, d, M2)`` over the *valid* rows of ``rows`` (R, C), packed as a ``(1, 4, C)``
    float64 tensor as :func:`partial_moments` packs them, and the shifted rows ``x − s`` (their padded rows
    set to d), written into ``out`` if given (``out=None``: differentiable operations, which a double
    backward recomputes).

    ``valid`` and ``padded`` are the indices of the rows that count and of those that do not; a padded row
    takes no part whatever it holds (NaN and inf included): it is set to 0 before the sum that gives d and
    to d before the one that gives M2 = Σ (x − s − d)², so it adds exactly 0 to both; it is never
    multiplied by a 0 weight. The shift ``s`` is the first valid row, as :func:`~normlab.core.engine.moments`
    shifts by one of the values.
    """
    c, n = rows.shape[1], valid.numel()
    if n == 0:
        xs = torch.zeros_like(rows) if out is None else out.zero_()
        return torch.zeros(1, 4, c, dtype=PACKED_DTYPE, device=rows.device), xs
    shift = rows[valid[0]]
    xs = torch.sub(rows, shift, out=out).index_fill_(0, padded, 0.0)
    d = xs.sum(dim=0) / n
    xs = xs.index_copy_(0, padded, d.expand(padded.numel(), c))
    m2 = sum_of_products(xs, xs, (0,), d)
    packed = torch.stack([torch.full_like(d, n, dtype=PACKED_DTYPE), shift.to(PACKED_DTYPE), d.to(PACKED_DTYPE),
                          m2.to(PACKED_DTYPE)])
    return packed.unsqueeze(0), xs


# Elements per piece of :func:`sum_of_products`: a product of this size stays in the cache.
_PIECE = 1 << 16


def sum_of_products(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...], centre=None) -> torch.Tensor:
    """``(a · b).sum(dims)`` (``dims`` holding 0; with ``centre``, ``((a − centre) · (b − centre)).sum(dims)``)
    without a temporary of ``a``'s size: formed and summed in pieces along axis 0 that stay in the cache,
    then the pieces' sums are added."""
    step = max(1, _PIECE // max(1, a[:1].numel()))
    total = None
    for i in range(0, a.shape[0], step):
        pa, pb = a[i:i + step], b[i:i + step]
        if centre is not None:
            pa = pa - centre
            pb = pa if b is a else pb - centre
        part = (pa * pb).sum(dim=dims)
        total = part if total is None else total + part
    return (a * b).sum(dim=dims) if total is None else total


def merge_moments(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of stacked partial moments ``(P, 4, C)`` into ``(N, K, D, σ²)`` per channel:
    the total count, a common shift, the mean about it (μ = K + D) and the biased variance, in float64.

    Every place computes the same result from the same stack, bit for bit (the order is the stack's). A
    channel with no values anywhere gets N = 0, K = D = 0 and σ² = 1 (statistics of nothing, as in
    :func:`~normlab.core.engine.moments`)."""
    n, s, d, m2 = stacked.unbind(dim=1)
    total = n.sum(dim=0)
    first = (n > 0).to(torch.int8).argmax(dim=0, keepdim=True)  # the first non-empty partial per channel
    common = s.gather(0, first)
    about_common = (s - common) + d
    weights = n / total.clamp(min=1)
    mean = (weights * about_common).sum(dim=0)
    spread = n * (about_common - mean) ** 2
    var = (m2.sum(dim=0) + spread.sum(dim=0)) / total.clamp(min=1)
    var = torch.where(total > 0, var, torch.ones_like(var))
    return total, common.squeeze(0), mean, var


def unmerged(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each partial of ``stacked`` ``(P, 4, C)`` as the statistics of its own batch, ``(N, K, D, σ²)`` of shape
    ``(P, C)`` as :func:`merge_moments` gives them for one partial (N = n, K = s, D = d, σ² = M2 / n; an
    empty partial σ² = 1), in four operations rather than the merge's: the step of a caller whose places
    are normalized separately (ghost batch norm's virtual batches) or that has one place."""
    n, s, d, m2 = stacked.unbind(dim=1)
    var = torch.where(n > 0, m2 / n.clamp(min=1), 1.0)
    return n, s, d, var


def partial_grad_sums(dy: torch.Tensor, xhat: torch.Tensor, weight: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """This place's per-channel ``(Σ g, Σ g·x̂)`` as a ``(2, C)`` tensor, g = γ ∂L/∂y (view shapes); with
    ``weight=None`` they are ``(Σ ∂L/∂y, Σ ∂L/∂y·x̂)``, i.e. ∂L/∂β and ∂L/∂γ."""
    c = plan.view_shape[1]
    sums = torch.stack([dy.sum(dim=plan.reduce).reshape(c), sum_of_products(dy, xhat, plan.reduce).reshape(c)])
    return sums if weight is None else sums * weight.reshape(c)


def apply_backward(dy, xhat, rstd, weight, total_sums: torch.Tensor, count: float, plan: Plan, out=None):
    """∂L/∂x = rstd · (g − Σg/N − x̂ · Σ(g·x̂)/N), sums and count over the whole batch (view shapes),
    computed as ``∂L/∂y · (rstd γ) − x̂ · (rstd Σ(g·x̂)/N) − rstd Σg/N`` in two passes (into ``out`` if
    given, which may be ``xhat`` itself)."""
    shape = plan.stat_shape
    scale = rstd if weight is None else rstd * weight
    g_mean = (total_sums[0] / count).reshape(shape)
    gx_mean = (total_sums[1] / count).reshape(shape)
    dx = torch.addcmul(-(rstd * g_mean), xhat, -(rstd * gx_mean), out=out)
    return dx.addcmul_(dy, scale)


def _statistics(xv, plan: Plan, eps: float, combine_moments: Combine):
    """Partial moments → combine → merge on the torch engine: the merged ``(N, K, D, σ²)`` (float64) and
    ``(shift, mean_shifted, var, rstd)`` in the accumulation dtype and ``plan.stat_shape``."""
    merged = merge_moments(combine_moments(partial_moments(xv, plan)))
    acc = xv.dtype
    shift, mean_shifted, var = (t.to(acc).reshape(plan.stat_shape) for t in merged[1:])
    return merged, (shift, mean_shifted, var, torch.rsqrt(var + eps))


class CombinedNormalize(torch.autograd.Function):
    """``y = CombinedNormalize.apply(x, γ, β, plan, eps, running, combine_moments, combine_sums, on_count,
    backend)``: BatchNorm's training step with the statistics of the whole batch of which ``x`` is one part.

    ``running`` (or ``None``) is a :class:`~normlab.core.guard.RunningUpdate` (or a plain
    ``(running_mean, running_var, momentum)``), updated in place with the merged statistics (μ = K + D and
    σ², float64) through :func:`~normlab.core.guard.commit` (guarded, unbiased with the total count unless
    it says otherwise) when that count is above 0. ``on_count(N)`` (or ``None``) is called with the total
    count once it is known and before anything is written, so a caller can refuse (e.g. a single value per
    channel over the whole batch). ``backend`` (or ``None``: the torch engine) computes the partial and
    apply steps, forward and backward; it must implement the seam (:func:`seam_of`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: Plan, eps: float, running, combine_moments, combine_sums, on_count,
                backend=None):
        if backend is None:
            xv = _as_view(x, plan)
            merged, (shift, mean_shifted, var, rstd) = _statistics(xv, plan, eps, combine_moments)
        else:
            merged = merge_moments(combine_moments(backend.partial_moments(x, plan)))
        total = float(merged[0].max().item())
        if on_count is not None:
            on_count(total)
        if backend is None:
            acc = xv.dtype
            y = _like_input(normalize(centre(xv, shift, mean_shifted), rstd, _param(weight, plan, acc),
                                      _param(bias, plan, acc)), x)
        else:
            y, shift, mean_shifted, _, rstd = backend.apply_moments(x, weight, bias, merged, plan, eps)
        if running is not None and total > 0:
            commit(running, merged[1] + merged[2], merged[3], int(total))
        ctx.save_for_backward(x, weight, shift, mean_shifted, rstd)
        ctx.plan, ctx.total, ctx.combine_sums, ctx.backend = plan, total, combine_sums, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return owned(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, shift, mean_shifted, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # Every place takes part in the combine whenever its backward runs, whatever it needs: a collective
        # step must be entered by all places, and whether x needs a gradient may differ between them.
        if ctx.backend is None:
            dx, dw, db = CombinedNormalize._backward_torch(ctx, dy, x, weight, shift, mean_shifted, rstd, need_x,
                                                           need_w, need_b)
        else:
            dx, dw, db = CombinedNormalize._backward_seam(ctx, dy, x, weight, shift, mean_shifted, rstd, need_x,
                                                          need_w, need_b)
        return dx, dw, db, None, None, None, None, None, None, None

    @staticmethod
    def _backward_torch(ctx, dy, x, weight, shift, mean_shifted, rstd, need_x, need_w, need_b):
        """The backward's partial sums and ∂L/∂x in torch operations."""
        plan: Plan = ctx.plan
        acc = accumulation_dtype(x.dtype)
        dyv = _as_view(dy, plan)
        xhat = centre(_as_view(x, plan), shift, mean_shifted) * rstd
        w = _param(weight, plan, acc)
        dx = dw = db = None
        total_sums = ctx.combine_sums(partial_grad_sums(dyv, xhat, w, plan))
        if need_x:
            dx = _like_input(apply_backward(dyv, xhat, rstd, w, total_sums, max(ctx.total, 1.0), plan), x)
        if need_w:
            dw = (dyv * xhat).sum(dim=plan.param_sum_axes).reshape(weight.shape).to(weight.dtype)
        if need_b:
            db = dyv.sum(dim=plan.param_sum_axes).reshape(plan.param_shape).to(ctx.bias_dtype)
        return dx, dw, db

    @staticmethod
    def _backward_seam(ctx, dy, x, weight, shift, mean_shifted, rstd, need_x, need_w, need_b):
        """The backward on the backend: its partial sums (Σ ∂L/∂y, Σ ∂L/∂y·x̂) are this place's ∂L/∂β and
        ∂L/∂γ as well; their combination (γ is the same everywhere, so the backend applies it) gives ∂L/∂x."""
        plan: Plan = ctx.plan
        sums = ctx.backend.partial_grad_sums(dy, x, shift, mean_shifted, rstd, plan)
        total_sums = ctx.combine_sums(sums.clone())  # a combine may reduce in place; the local sums are kept
        dx = dw = db = None
        if need_x:
            dx = ctx.backend.apply_grad(dy, x, weight, shift, mean_shifted, rstd, total_sums, max(ctx.total, 1.0),
                                        plan)
        if need_w:
            dw = sums[1].reshape(weight.shape).to(weight.dtype)
        if need_b:
            db = sums[0].reshape(plan.param_shape).to(ctx.bias_dtype)
        return dx, dw, db


def normalize_combined(x, weight, bias, plan: Plan, eps: float, running=None, combine_moments: Combine = identity,
                       combine_sums: Combine = identity, on_count=None, backend=None) -> torch.Tensor:
    """BatchNorm training forward of ``x`` with statistics merged by ``combine_moments`` (and, in the
    backward, gradient sums combined by ``combine_sums``), the partial and apply steps on ``backend`` where
    it implements the seam (:func:`seam_of`), else on the torch engine; see :class:`CombinedNormalize`.
    With the default identity steps it is BatchNorm on ``x`` alone."""
    return CombinedNormalize.apply(x, weight, bias, plan, float(eps), running, combine_moments, combine_sums,
                                   on_count, seam_of(backend))
