r"""Ghost batch normalization (Hoffer et al. 2017): a batch normalized in virtual batches of ``v`` samples.

The batch (N, C, *S) is cut along N into G = ⌊N/v⌋ virtual batches of v samples and, when v does not
divide N, a last one of the N − G·v remaining samples. Each is batch-normalized with its own per-channel
statistics; γ and β are shared. This is BatchNorm applied to each chunk, computed in one pass per part
instead of a loop over chunks:

* the G equal chunks: the samples viewed as (G, v, C, S) and read as (G, C, v, S), whose statistics over
  the last two axes are those of an instance plan (:func:`~normlab.core.plan.instance_plan`): one
  statistic per (virtual batch, channel), on the backend the caller gave where it runs that plan (the
  CPU kernels read channels_last and 2D inputs this way without a copy);
* the ragged last chunk, if any: an ordinary BatchNorm plan.

The backward of each part is BatchNorm's closed form within its chunk (the engine's, per part); dγ and
dβ are summed over the parts.

Running statistics: once per call, from the exact merge of the virtual batches' statistics: each
virtual batch's (count, shift, mean about it, M2) is a partial of the statistics seam
(:mod:`normlab.core.stats`), and its merge (Chan et al.'s, :func:`normlab.core.stats.merge_moments`)
gives **the full batch's** mean and variance; the update is BatchNorm's (unbiased variance, weight
``momentum``), guarded as BatchNorm's is (:func:`normlab.core.guard.commit`). A ghost layer and a
BatchNorm layer fed the same batches hold the same running statistics, so eval (ordinary BatchNorm with them) estimates the population statistics from all N samples
of every step. (The alternative, the average of the per-chunk updates, weights each chunk's own unbiased
variance and leaves out the spread between the chunks' means; for i.i.d. chunks both estimate the same
population variance, the merge with less noise.)

On a backend whose statistics seam takes groups of samples (``group_size=``,
:func:`~normlab.core.backend.seam_takes`: the numba kernels) the whole step is the seam's
(:class:`GhostSeamNormalize`): every virtual batch's partial moments in one pass over ``x`` where it lies,
each virtual batch normalized with its own (the merge of its one partial) in one more pass, the backward
likewise per virtual batch; no transposed copy. Elsewhere the parts above are computed by the backend's
(or the torch engine's) kernels, one instance-style pass for all the equal virtual batches, and only the
merge is the seam's.
"""

from __future__ import annotations

import math

import torch

from normlab.core.backend import seam_takes
from normlab.core.conventions import CHANNELS_LAST, is_channels_last
from normlab.core.engine import (
    _like_input,
    accumulation_dtype,
    backward_torch,
    finish_param_grads,
    forward_torch,
    records_grad,
)
from normlab.core.guard import commit
from normlab.core.plan import Plan, batch_plan, instance_plan
from normlab.core.stats import PACKED_DTYPE, merge_moments, unmerged

__all__ = ["GhostNormalize", "ghost_normalize", "virtual_batches"]


def virtual_batches(n: int, virtual_batch_size: int) -> tuple[int, int]:
    """``(G, rest)``: G virtual batches of ``virtual_batch_size`` samples and a last one of ``rest`` (0: none)."""
    return divmod(n, virtual_batch_size)


def _channels_last_like(x: torch.Tensor) -> bool:
    """2D inputs and channels_last 4D/5D ones, whose channels are the fastest axis."""
    return x.dim() == 2 or is_channels_last(x)


def _grouped(t: torch.Tensor, groups: int, channels_last: bool) -> torch.Tensor:
    """The first ``groups · v`` samples of ``t`` (N, C, *S), given as exactly those, as (G, C, v, S): a view
    (written through when ``t`` is an output buffer); channels_last storage gives a channels_last view."""
    c, s = t.shape[1], math.prod(t.shape[2:])
    v = t.shape[0] // groups
    if channels_last:
        return t.movedim(1, -1).reshape(groups, v, s, c).permute(0, 3, 1, 2)
    return t.reshape(groups, v, c, s).permute(0, 2, 1, 3)


def _parts(x: torch.Tensor, virtual_batch_size: int, channels_last: bool):
    """``[(z, plan, rows)]``: each part of ``x`` as the tensor its plan normalizes and the sample range."""
    groups, rest = virtual_batches(x.shape[0], virtual_batch_size)
    main = groups * virtual_batch_size
    parts = []
    if groups:
        z = _grouped(x[:main], groups, channels_last)
        parts.append((z, instance_plan(tuple(z.shape)), slice(0, main)))
    if rest:
        xr = x[main:]
        parts.append((xr, batch_plan(tuple(xr.shape)), slice(main, x.shape[0])))
    return parts


def _assemble(pieces, like: torch.Tensor, virtual_batch_size: int, channels_last: bool, backend) -> torch.Tensor:
    """One tensor of ``like``'s shape and layout from the parts' results (in their parts' shapes): a view of
    the single result where its storage already is in that order (channels_last and 2D inputs that the
    virtual batches divide), else a copy into memory from ``backend.empty_like`` where the backend has it
    (recycled pages: fresh ones cost more to write than the copy)."""
    groups = like.shape[0] // virtual_batch_size
    first = pieces[0]
    if len(pieces) == 1 and channels_last and groups and first.permute(0, 2, 3, 1).is_contiguous():
        c, spatial = like.shape[1], tuple(like.shape[2:])
        return first.permute(0, 2, 3, 1).reshape((like.shape[0],) + spatial + (c,)).movedim(-1, 1)
    fmt = torch.contiguous_format
    if channels_last and like.dim() > 2:
        fmt = CHANNELS_LAST[like.dim()]
    out = torch.empty(like.shape, dtype=first.dtype, device=like.device).contiguous(memory_format=fmt)
    empty_like = getattr(backend, "empty_like", None)
    if empty_like is not None:
        out = empty_like(out)
    for piece, rows in zip(pieces, _rows(like.shape[0], virtual_batch_size)):
        target = out[rows]
        if rows.start == 0 and groups:
            target = _grouped(target, groups, channels_last)
        target.copy_(piece)
    return out


def _rows(n: int, virtual_batch_size: int) -> list[slice]:
    groups, rest = virtual_batches(n, virtual_batch_size)
    main = groups * virtual_batch_size
    return ([slice(0, main)] if groups else []) + ([slice(main, n)] if rest else [])


def _dense(z: torch.Tensor, backend) -> torch.Tensor:
    """``z`` as the kernels read it: the transposed (G, C, v, S) view of contiguous input copied into the
    backend's recycled memory (a fresh copy would cost more in page faults than the copy itself)."""
    empty_like = getattr(backend, "empty_like", None)
    if empty_like is None or z.is_contiguous() or z.is_contiguous(memory_format=torch.channels_last):
        return z
    return empty_like(torch.empty(z.shape, dtype=z.dtype, device=z.device)).copy_(z)


def _forward_part(backend, z, weight, bias, plan: Plan, eps: float):
    """``(y, shift, mean_shifted, var, rstd, backend)`` of one part, on ``backend`` where it runs the part's
    plan, else on the torch engine (``None``)."""
    if backend is not None and backend.unsupported(z, plan) is not None:
        backend = None
    z = _dense(z, backend)
    if backend is None:
        y, shift, mean_shifted, var, rstd = forward_torch(z, weight, bias, None, None, plan, eps)
        y = _like_input(y, z)
    else:
        y, shift, mean_shifted, var, rstd = backend.forward(z, weight, bias, None, None, plan, eps)
    return y, shift, mean_shifted, var, rstd, backend


def _partials(shift, mean_shifted, var, count: int, c: int) -> torch.Tensor:
    """The virtual batches' statistics of one part as the statistics seam's partial moments
    (:func:`normlab.core.stats.partial_moments`): ``(G, 4, C)`` of (n, shift, mean about it, M2)."""
    shift, mean_shifted, var = (t.reshape(-1, c).to(PACKED_DTYPE) for t in (shift, mean_shifted, var))
    return torch.stack([torch.full_like(shift, count), shift, mean_shifted, var * count], dim=1)


def _forward(backend, x, weight, bias, virtual_batch_size: int, eps: float, running):
    c = x.shape[1]
    cl = _channels_last_like(x)
    ys, saved, partials = [], [], []
    for z, plan, _ in _parts(x, virtual_batch_size, cl):
        y, shift, mean_shifted, var, rstd, used = _forward_part(backend, z, weight, bias, plan, eps)
        ys.append(y)
        saved.append((shift, mean_shifted, rstd, used))
        partials.append(_partials(shift, mean_shifted, var, plan.count, c))
    if running is not None:
        _, common, mean, var = merge_moments(torch.cat(partials))
        commit(running, common + mean, var, x.numel() // c)
    return _assemble(ys, x, virtual_batch_size, cl, saved[0][3]).to(x.dtype), saved


class GhostNormalize(torch.autograd.Function):
    """``y = GhostNormalize.apply(x, γ, β, virtual_batch_size, eps, running, backend)``; ``running``: a
    :class:`~normlab.core.guard.RunningUpdate` (or ``(running_mean, running_var, momentum)``) updated in place
    with the merged statistics, or ``None``; ``backend``: the one to run the parts on (``None``: the torch
    engine). See the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, virtual_batch_size: int, eps: float, running, backend):
        y, saved = _forward(backend, x, weight, bias, virtual_batch_size, eps, running)
        stats = [t for shift, mean_shifted, rstd, _ in saved for t in (shift, mean_shifted, rstd)]
        ctx.save_for_backward(x, weight, *stats)
        ctx.backends = [backend for *_, backend in saved]
        ctx.virtual_batch_size, ctx.eps = virtual_batch_size, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, *stats = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return (None,) * 7
        v, cl = ctx.virtual_batch_size, _channels_last_like(x)
        dxs, dw, db = [], None, None
        dy_parts = [z for z, _, _ in _parts(dy, v, cl)]
        for i, (z, plan, _) in enumerate(_parts(x, v, cl)):
            shift, mean_shifted, rstd = stats[3 * i: 3 * i + 3]
            backend = ctx.backends[i]
            if backend is not None and not torch.is_grad_enabled():
                dz, dwp, dbp = backend.backward(_dense(dy_parts[i], backend), _dense(z, backend), weight, shift,
                                                mean_shifted, rstd, plan, True, need)
            else:
                dz, dwp, dbp = backward_torch(dy_parts[i], z, weight, shift, mean_shifted, rstd, plan, True, need,
                                              ctx.eps)
            dxs.append(None if dz is None else dz.reshape(z.shape))
            dw, db = _add(dw, dwp), _add(db, dbp)
        dx = _assemble(dxs, x, v, cl, ctx.backends[0]).to(x.dtype) if need[0] else None
        dw, db = finish_param_grads(dw, db, weight, batch_plan(tuple(x.shape)), ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def _add(total: torch.Tensor | None, part: torch.Tensor | None) -> torch.Tensor | None:
    """Per-channel sums of the parts' dγ (or dβ), flat."""
    if part is None:
        return total
    part = part.reshape(-1)
    return part if total is None else total + part


def _forward_seam(backend, x, weight, bias, virtual_batch_size: int, eps: float, running):
    """``(y, (shift, mean_shifted, rstd, counts))`` through ``backend``'s statistics seam per group of
    samples: every virtual batch's partial moments in one pass, each virtual batch's statistics its own
    (:func:`~normlab.core.stats.unmerged`), one applying pass; the running update from the merge of them all."""
    plan = batch_plan(tuple(x.shape))
    packed = backend.partial_moments(x, plan, group_size=virtual_batch_size)  # (G, 4, C)
    c = packed.shape[2]
    y, shift, mean_shifted, _, rstd = backend.apply_moments(x, weight, bias, unmerged(packed), plan, eps,
                                                            group_size=virtual_batch_size)
    if running is not None:
        _, common, mean, var = merge_moments(packed)
        commit(running, common + mean, var, x.numel() // c)
    return y, (shift, mean_shifted, rstd, packed[:, 0, 0].contiguous())


class GhostSeamNormalize(torch.autograd.Function):
    """:class:`GhostNormalize` on a backend whose statistics seam takes ``group_size``
    (:func:`~normlab.core.backend.seam_takes`): ``y = GhostSeamNormalize.apply(x, γ, β, virtual_batch_size,
    eps, running, backend)``. The backward is the seam's too: each virtual batch's gradient sums in one
    pass (their sum over the virtual batches is dγ, dβ), then ∂L/∂x per virtual batch from its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, virtual_batch_size: int, eps: float, running, backend):
        y, saved = _forward_seam(backend, x, weight, bias, virtual_batch_size, eps, running)
        ctx.save_for_backward(x, weight, bias, *saved)
        ctx.virtual_batch_size, ctx.eps, ctx.backend = virtual_batch_size, eps, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, shift, mean_shifted, rstd, counts = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not any(need):
            return (None,) * 7
        v = ctx.virtual_batch_size
        if torch.is_grad_enabled():  # a graph of the gradients: differentiate the torch engine's steps
            inputs = [t for t, n in zip((x, weight, bias), need) if n]
            y = _forward(None, x, weight, bias, v, ctx.eps, None)[0]
            grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
            return tuple(next(grads) if n else None for n in need) + (None,) * 4
        plan, backend = batch_plan(tuple(x.shape)), ctx.backend
        sums = backend.partial_grad_sums(dy, x, shift, mean_shifted, rstd, plan, group_size=v)  # (G, 2, C)
        dx = None
        if need[0]:
            dx = backend.apply_grad(dy, x, weight, shift, mean_shifted, rstd, sums, counts, plan, group_size=v)
        total = sums.sum(dim=0)
        acc = accumulation_dtype(x.dtype)
        dw, db = (total[1].to(acc) if need[1] else None), (total[0].to(acc) if need[2] else None)
        dw, db = finish_param_grads(dw, db, weight, plan, ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def ghost_normalize(backend, x, weight, bias, virtual_batch_size: int, eps: float, running=None) -> torch.Tensor:
    """Ghost batch normalization of ``x`` (N, C, *S) with batch statistics per virtual batch, on ``backend``
    (``None``: the torch engine); without an autograd node where nothing would be recorded. ``running`` as
    for :class:`GhostNormalize`. A backend whose statistics seam takes groups of samples runs it there
    (:class:`GhostSeamNormalize`)."""
    if seam_takes(backend, "group_size") and backend.unsupported(x, batch_plan(tuple(x.shape))) is None:
        if records_grad(x, weight, bias):
            return GhostSeamNormalize.apply(x, weight, bias, virtual_batch_size, eps, running, backend)
        return _forward_seam(backend, x, weight, bias, virtual_batch_size, eps, running)[0]
    if records_grad(x, weight, bias):
        return GhostNormalize.apply(x, weight, bias, virtual_batch_size, eps, running, backend)
    return _forward(backend, x, weight, bias, virtual_batch_size, eps, running)[0]
