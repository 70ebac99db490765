"""Batch normalization followed by ReLU, optionally after adding a residual (the tail of a ResNet block),
in one pass where the backend can fuse it.

``relu(normalize(x) + residual)`` written as three operations moves the data three times forward and
again backward (ReLU's mask, then the add, then the normalization's backward). A backend that fuses it
(the CPU and GPU kernels do for BatchNorm) applies the add and the ReLU to each value as it is
normalized, and its backward masks ``dy`` by ``y > 0`` inside the closed-form passes, also writing the
residual's gradient. Everywhere else — the torch engine, plans a backend does not fuse, a residual that would
broadcast or change the dtype, forward-mode AD and ``torch.func`` transforms — :func:`normalize_relu`
composes :class:`~normlab.core.engine.Normalize` with :func:`torch.relu`, which is the definition.
"""

from __future__ import annotations

import torch

from normlab.core.engine import (
    backward_torch, batched_tensor, compute_forward, finish_param_grads, forward_ad_active, owned, records_grad, run,
)
from normlab.core.plan import Plan

__all__ = ["NormalizeReLU", "normalize_relu"]


class NormalizeReLU(torch.autograd.Function):
    """``y = NormalizeReLU.apply(x, residual, γ, β, fixed_mean, fixed_var, plan, eps, running, backend)``
    with ``y = relu(normalize(x) + residual)`` (``residual`` may be ``None``), computed by ``backend``;
    ``running`` as for :class:`~normlab.core.engine.Normalize`.

    The backward masks ``dy`` by ``y > 0``; the residual's gradient is that masked ``dy``. With a graph
    requested (``create_graph=True``) it runs :func:`~normlab.core.engine.backward_torch` on the masked
    ``dy`` (the mask is constant almost everywhere), so double backward works as for
    :class:`~normlab.core.engine.Normalize`.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float, running, backend):
        y, (shift, mean_shifted, rstd) = compute_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, running,
                                                         backend, residual=residual, relu=True)
        y = owned(y)
        ctx.save_for_backward(x, weight, shift, mean_shifted, rstd, y)
        ctx.plan, ctx.eps, ctx.batch_stats, ctx.backend = plan, eps, fixed_mean is None, backend
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, shift, mean_shifted, rstd, y = ctx.saved_tensors
        plan: Plan = ctx.plan
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        if torch.is_grad_enabled() or batched_tensor(dy):
            dres = dy * (y > 0)
            dx, dw, db = backward_torch(dres, x, weight, shift, mean_shifted, rstd, plan, ctx.batch_stats, need,
                                        ctx.eps)
            dx = None if dx is None else dx.reshape(x.shape).to(x.dtype)
        else:
            # The kernels write the residual's gradient in the same pass as dx, so dx is computed whenever
            # either is wanted and dropped afterwards if x itself needs none.
            need_res = ctx.has_residual and ctx.needs_input_grad[1]
            dx, dw, db, dres = ctx.backend.backward(dy, x, weight, shift, mean_shifted, rstd, plan, ctx.batch_stats,
                                                    (need[0] or need_res, need[1], need[2]), y=y,
                                                    residual=ctx.has_residual)
            dx = dx if need[0] else None
            if dres is not None:
                dres = dres.to(x.dtype)
        dw, db = finish_param_grads(dw, db, weight, plan, ctx.bias_dtype)
        dres = dres if ctx.has_residual and ctx.needs_input_grad[1] else None
        return dx, dres, dw, db, None, None, None, None, None, None


def _fusable(backend, x: torch.Tensor, residual: torch.Tensor | None, plan: Plan) -> bool:
    if backend is None or not backend.fuses(plan):
        return False
    return residual is None or (
        residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device
    )


def normalize_relu(backend, x, residual, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float,
                   running=None):
    """``relu(y + residual)`` where :func:`~normlab.core.engine.run` would give ``y``; fused when
    ``backend`` (``None``: the torch engine) can (see the module docstring). ``running`` as for ``run``."""
    if not _fusable(backend, x, residual, plan) or forward_ad_active():  # the fused node has no jvp
        y = run(backend, x, weight, bias, fixed_mean, fixed_var, plan, eps, running)
        return torch.relu(y if residual is None else y + residual)
    if records_grad(x, residual, weight, bias):
        return NormalizeReLU.apply(x, residual, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend)
    return compute_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, running, backend, residual=residual,
                           relu=True)[0]
