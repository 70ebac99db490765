"""The ``numba`` backend: the engine's forward and closed-form backward on CPU tensors, run by the
kernels of :mod:`normlab.kernels.cpu` on zero-copy NumPy views of the tensors' memory.

float32 and float64 are computed in their own dtype (statistics always accumulate in float64);
float16 and bfloat16 are converted to float32 on the way in and back on the way out, as the torch
engine does. Results follow the engine's conventions: ``y`` and ``dx`` in the input's shape and memory
format, statistics in ``plan.stat_shape``, ``(shift, mean_shifted)`` with μ = shift + mean_shifted.

:mod:`normlab.kernels.cpu` (and with it numba) is imported on the first call, not before.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from normlab.core.plan import Plan
from normlab.kernels import buffers
from normlab.kernels.layout import ChannelShape, RowShape, classify

__all__ = ["NumbaBackend", "epilogue_code"]

_FAST_DTYPES = (torch.float32, torch.float64)
_CONVERTED_DTYPES = (torch.float16, torch.bfloat16)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def epilogue_code(relu: bool, residual: torch.Tensor | None) -> int:
    """The kernels' ``epilogue`` argument: 0 none, 1 ReLU, 2 residual add then ReLU."""
    return 0 if not relu else 1 if residual is None else 2


@functools.cache
def _cpu():
    from normlab.kernels import cpu

    return cpu


SERIAL_BELOW = 1 << 15
"""Inputs with fewer values than this run on one thread: waking the others would cost more than they
save (and, on a busy machine, waits for their time slice)."""

_threads_set = [0]


def _sync_threads(numel: int) -> int:
    """Run numba's parallel loops on as many threads as torch uses (``torch.set_num_threads``), or on
    one for a small input; returns that number."""
    import numba

    torch_threads = torch.get_num_threads()
    want = 1 if numel < SERIAL_BELOW else max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if _threads_set[0] != want:
        numba.set_num_threads(want)
        if not _threads_set[0]:
            # Starting numba's OpenMP pool resets the thread count of the OpenMP runtime torch shares.
            torch.set_num_threads(torch_threads)
        _threads_set[0] = want
    return want


@functools.lru_cache(maxsize=256)
def _filled(value: float, n: int, dtype: torch.dtype) -> np.ndarray:
    """``n`` copies of ``value`` (never written to): the γ = 1 or β = 0 of a layer without them."""
    return torch.full((n,), value, dtype=dtype).numpy()


def _param(p: torch.Tensor | None, n: int, dtype: torch.dtype, default: float) -> np.ndarray:
    if p is None:
        return _filled(default, n, dtype)
    p = p.detach()
    return (p if p.dtype == dtype else p.to(dtype)).contiguous().numpy().reshape(n)


def _flat(stat: torch.Tensor) -> np.ndarray:
    """A saved statistic as the flat array the kernels index (a copy only if it is not contiguous)."""
    return stat.detach().contiguous().numpy().reshape(-1)


def _is_channels_last(x: torch.Tensor) -> bool:
    fmt = _CHANNELS_LAST.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Views:
    """The kernel-side arrays of one call: which kernel family runs, on which flat views."""

    __slots__ = ("family", "channels_last", "shape")

    def __init__(self, x: torch.Tensor, plan: Plan):
        shape = classify(plan)
        self.shape = shape
        cl = _is_channels_last(x)
        if isinstance(shape, ChannelShape):
            self.family = "bn_rows" if cl or shape.spatial == 1 else "bn_planar"
        elif isinstance(shape, RowShape):
            self.family = "group_cl" if cl and shape.lead == 2 else "row"
        else:
            raise ValueError(f"plan not handled by the numba kernels: {plan}")
        self.channels_last = cl and self.family in ("bn_rows", "group_cl")

    def prepare(self, t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """``t`` in ``acc`` dtype and in the memory layout the kernel family reads."""
        t = t.detach()
        if t.dtype != acc:
            t = t.to(acc)
        if self.channels_last:
            return t.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
        return t.contiguous()

    def array(self, t: torch.Tensor) -> np.ndarray:
        """The NumPy view a kernel takes of a tensor laid out by :meth:`prepare`."""
        s = self.shape
        if self.family == "bn_planar":
            return t.numpy().reshape(s.n, s.channels, s.spatial)
        if self.family == "bn_rows":
            return (t.movedim(1, -1) if self.channels_last else t).numpy().reshape(-1, s.channels)
        if self.family == "group_cl":
            flat = t.movedim(1, -1).numpy()
            return flat.reshape(flat.shape[0], -1, flat.shape[-1])
        return t.numpy().reshape(s.rows, s.size)

    @property
    def stat_count(self) -> int:
        s = self.shape
        return s.channels if isinstance(s, ChannelShape) else s.rows

    @property
    def param_count(self) -> int:
        s = self.shape
        return s.channels if isinstance(s, ChannelShape) else s.groups * s.per_row


def _per_row(fixed: torch.Tensor, views: _Views, acc: torch.dtype) -> np.ndarray:
    """Fixed per-channel statistics, repeated for every row of the plan where each sample has its own
    (InstanceNorm in eval mode)."""
    fixed = fixed.detach()
    fixed = (fixed if fixed.dtype == acc else fixed.to(acc)).numpy()
    if isinstance(views.shape, ChannelShape):
        return fixed
    return np.tile(fixed, views.shape.rows // fixed.size)


class NumbaBackend:
    """Engine backend on numba kernels; see the module docstring."""

    name = "numba"

    def unsupported(self, x: torch.Tensor, plan: Plan) -> str | None:
        """Why this backend cannot run ``x`` with ``plan``, or ``None`` if it can."""
        if x.device.type != "cpu":
            return f"the numba backend runs on CPU tensors only, got a tensor on {x.device}"
        if x.dtype not in _FAST_DTYPES and x.dtype not in _CONVERTED_DTYPES:
            return f"the numba backend does not handle dtype {x.dtype}"
        if classify(plan) is None:
            return f"the numba backend does not handle a plan reducing axes {plan.reduce} of {plan.view_shape}"
        return None

    def fuses(self, plan: Plan) -> bool:
        """Whether ReLU and a residual add can be fused into the normalization (BatchNorm plans)."""
        return isinstance(classify(plan), ChannelShape)

    def forward(self, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float,
                residual: torch.Tensor | None = None, relu: bool = False):
        """``(y, shift, mean_shifted, var, rstd)`` as :func:`normlab.core.engine.forward_torch` returns them.

        ``relu`` (and ``residual``) fuse ``relu(y + residual)`` into the normalizing pass (BatchNorm only).
        """
        acc = _acc(x)
        views = _Views(x, plan)
        train = fixed_mean is None
        xa = views.prepare(x, acc)
        y = buffers.empty_like(xa)
        stats = torch.empty(4, views.stat_count, dtype=acc)  # shift, mean_shifted, var, rstd
        arrays = stats.numpy()
        if not train:
            arrays[0] = _per_row(fixed_mean, views, acc)
            arrays[2] = _per_row(fixed_var, views, acc)
            arrays[1] = 0.0
        if x.numel():
            self._forward(views, xa, y, weight, bias, eps, train, arrays, residual, relu)
        else:  # an empty batch: the torch engine's statistics of nothing
            if train:
                stats[:2] = 0.0
                stats[2] = 1.0
            torch.rsqrt(stats[2] + eps, out=stats[3])
        shift, mean_shifted, var, rstd = stats.view(4, *plan.stat_shape).unbind(0)
        return y if y.dtype == x.dtype else y.to(x.dtype), shift, mean_shifted if train else None, var, rstd

    def _forward(self, views, xa, y, weight, bias, eps, train, stats, residual, relu):
        cpu = _cpu()
        threads = _sync_threads(xa.numel())
        acc = xa.dtype
        w = _param(weight, views.param_count, acc, 1.0)
        b = _param(bias, views.param_count, acc, 0.0)
        xn, yn = views.array(xa), views.array(y)
        s = views.shape
        if views.family in ("bn_planar", "bn_rows"):
            code = epilogue_code(relu, residual)
            rn = views.array(views.prepare(residual, acc)) if code == 2 else xn
            if views.family == "bn_planar":
                cpu.bn_planar_forward(xn, w, b, eps, train, *stats, yn, rn, code)
            else:
                parts = np.empty((max(1, min(threads, xn.shape[0])), 2, s.channels))
                cpu.bn_rows_forward(xn, w, b, eps, train, *stats, yn, rn, code, parts)
        elif relu:
            raise ValueError("the numba backend fuses ReLU into BatchNorm only")
        elif views.family == "row":
            cpu.row_forward(xn, w, b, eps, train, s.groups, s.run, *stats, yn)
        else:
            cpu.group_cl_forward(xn, w, b, eps, train, s.groups, *stats, yn)

    def backward(self, dy, x, weight, shift, mean_shifted, rstd, plan: Plan, batch_stats: bool,
                 need: tuple[bool, bool, bool], y: torch.Tensor | None = None, residual: bool = False):
        """``(dx, dγ, dβ)``: dx in ``x``'s shape and layout, dγ and dβ flat, in the accumulation dtype.

        ``y`` is the output of a fused ReLU (its mask), ``residual`` whether a residual was added before
        it; then a fourth result, the residual's gradient, follows.
        """
        acc = _acc(x)
        views = _Views(x, plan)
        nparam = views.param_count
        xa = views.prepare(x, acc)
        dya = views.prepare(dy, acc)
        dx = buffers.empty_like(xa)
        dres = buffers.empty_like(xa) if residual else None
        dw, db = torch.zeros(2, nparam, dtype=acc).unbind(0)
        if x.numel():
            self._backward(views, xa, dya, dx, dres, dw, db, weight, shift, mean_shifted, rstd, batch_stats,
                           need[0], y)
        if dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        grads = (dx if need[0] else None, dw if need[1] else None, db if need[2] else None)
        return grads if y is None else (*grads, dres)

    def _backward(self, views, xa, dya, dx, dres, dw, db, weight, shift, mean_shifted, rstd, train, need_x, y):
        cpu = _cpu()
        threads = _sync_threads(xa.numel())
        acc = xa.dtype
        w = _param(weight, views.param_count, acc, 1.0)
        xn, dyn, dxn = views.array(xa), views.array(dya), views.array(dx)
        sh = _flat(shift)
        ms = _flat(shift if mean_shifted is None else mean_shifted)
        rs = _flat(rstd)
        s = views.shape
        if views.family in ("bn_planar", "bn_rows"):
            code = 0 if y is None else 2 if dres is not None else 1
            yn = views.array(views.prepare(y, acc)) if y is not None else xn
            dresn = views.array(dres) if dres is not None else dxn
            args = (xn, dyn, yn, w, sh, ms, rs, train, need_x, code, dxn, dresn, dw.numpy(), db.numpy())
            if views.family == "bn_planar":
                cpu.bn_planar_backward(*args)
            else:
                cpu.bn_rows_backward(*args, np.empty((max(1, min(threads, xn.shape[0])), 2, s.channels)))
            return
        if views.family == "row":
            parts = np.empty((max(1, min(threads, s.rows)), 2, views.param_count))
            cpu.row_backward(xn, dyn, w, sh, ms, rs, train, need_x, s.groups, s.run, dxn, parts)
        else:
            parts = np.empty((xn.shape[0], 2, views.param_count))
            cpu.group_cl_backward(xn, dyn, w, sh, ms, rs, train, need_x, s.groups, dxn, parts)
        sums = torch.from_numpy(parts).sum(0)
        db.copy_(sums[0])
        dw.copy_(sums[1])
