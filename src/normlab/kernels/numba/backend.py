"""The ``numba`` backend: the engine's forward and closed-form backward on CPU tensors, run by the
kernels of this package (:mod:`.planar`, :mod:`.columns`, :mod:`.rows`) on zero-copy NumPy views of the
tensors' memory.

float32 and float64 are computed in their own dtype (statistics always accumulate in float64);
float16 and bfloat16 are converted to float32 on the way in and back on the way out, as the torch
engine does. Results follow the engine's conventions: ``y`` and ``dx`` in the input's shape and memory
format, statistics in ``plan.stat_shape``, ``(shift, mean_shifted)`` with μ = shift + mean_shifted.

The kernels (and with them numba) are imported on the first call, not before.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.autograd.graph import increment_version

from normlab.core.conventions import CHANNELS_LAST, accumulation_dtype, fill_empty_statistics, is_channels_last
from normlab.core.plan import Plan
from normlab.kernels.layout import (
    CHANNEL_PLANES, CHANNEL_ROWS, ROW, ROW_CHANNELS_LAST, ChannelShape, classify, family as family_of,
)
from normlab.kernels.numba import buffers

__all__ = ["NumbaBackend", "epilogue_code"]

_FAST_DTYPES = (torch.float32, torch.float64)
_CONVERTED_DTYPES = (torch.float16, torch.bfloat16)


def epilogue_code(relu: bool, residual: torch.Tensor | None) -> int:
    """The kernels' ``epilogue`` argument: 0 none, 1 ReLU, 2 residual add then ReLU."""
    return 0 if not relu else 1 if residual is None else 2


@functools.cache
def _kernels() -> dict:
    """The kernels of each family by name (importing them imports numba)."""
    from normlab.kernels.numba import columns, planar, rows

    return {
        CHANNEL_PLANES: (planar.bn_planar_forward, planar.bn_planar_backward),
        CHANNEL_ROWS: (columns.bn_rows_forward, columns.bn_rows_backward),
        ROW_CHANNELS_LAST: (columns.group_cl_forward, columns.group_cl_backward),
        ROW: (rows.row_forward, rows.row_backward),
    }


SERIAL_BELOW = 1 << 15
"""Inputs with fewer values than this run on one thread: waking the others would cost more than they
save (and, on a busy machine, waits for their time slice)."""

_threads_set = [0]


@functools.cache
def _numba_max_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


def _sync_threads(numel: int) -> int:
    """Run numba's parallel loops on as many threads as torch uses (``torch.set_num_threads``), or on
    one for a small input; returns that number."""
    want = 1 if numel < SERIAL_BELOW else max(1, min(torch.get_num_threads(), _numba_max_threads()))
    if _threads_set[0] != want:
        _set_numba_threads(want)
    return want


def _set_numba_threads(want: int) -> None:
    import numba

    torch_threads = torch.get_num_threads()
    numba.set_num_threads(want)
    if not _threads_set[0]:
        # Starting numba's OpenMP pool resets the thread count of the OpenMP runtime torch shares.
        torch.set_num_threads(torch_threads)
    _threads_set[0] = want


@functools.lru_cache(maxsize=256)
def _filled(value: float, n: int, dtype: torch.dtype) -> np.ndarray:
    """``n`` copies of ``value`` (never written to): the γ = 1 or β = 0 of a layer without them."""
    return torch.full((n,), value, dtype=dtype).numpy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The NumPy view of a CPU tensor's memory (``detach`` only where autograd would refuse it)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _param(p: torch.Tensor | None, n: int, dtype: torch.dtype, default: float) -> np.ndarray:
    if p is None:
        return _filled(default, n, dtype)
    if p.dtype != dtype or not p.is_contiguous():
        p = p.detach().to(dtype).contiguous()
    a = _numpy(p)
    return a if a.ndim == 1 else a.reshape(n)


def _flat(stat: torch.Tensor) -> np.ndarray:
    """A saved statistic as the flat array the kernels index (a copy only if it is not contiguous)."""
    a = _numpy(stat if stat.is_contiguous() else stat.contiguous())
    return a if a.ndim == 1 else a.reshape(-1)


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_NO_RUNNING = {dtype: np.empty(0, t) for dtype, t in _NUMPY.items()}
"""Stand-ins for the running statistics when a kernel is not to update any."""


class _Launch:
    """How one case (plan, memory layout, dtype) runs on the kernels, worked out once per plan
    (:meth:`~normlab.core.plan.Plan.memo`): which kernel family, and which flat views of memory it takes."""

    __slots__ = ("family", "channels_last", "shape", "acc", "np_dtype", "stat_count", "param_count",
                 "array_shape", "split_rows", "perm", "fmt", "out_fmt")

    def __init__(self, plan: Plan, channels_last: bool, dtype: torch.dtype):
        shape = classify(plan)
        self.shape = shape
        if shape is None:
            raise ValueError(f"plan not handled by the numba kernels: {plan}")
        self.family = family_of(plan, channels_last)
        if isinstance(shape, ChannelShape):
            self.stat_count = self.param_count = shape.channels
        else:
            self.stat_count, self.param_count = shape.rows, shape.groups * shape.per_row
        self.channels_last = channels_last and self.family in (CHANNEL_ROWS, ROW_CHANNELS_LAST)
        self.acc = accumulation_dtype(dtype)
        self.np_dtype = np.dtype(_NUMPY[self.acc])
        ndim = len(plan.input_shape)
        # channels_last memory is (N, *spatial, C): a transpose of the NumPy view makes it C-contiguous.
        self.perm = (0, *range(2, ndim), 1) if self.channels_last else None
        self.fmt = CHANNELS_LAST.get(ndim) if self.channels_last else torch.contiguous_format
        # A channels_last input that a family reads as contiguous rows still gets channels_last results.
        self.out_fmt = CHANNELS_LAST[ndim] if channels_last and not self.channels_last else None
        # split_rows: the rows (runs, for bn_planar) a kernel cuts into one block of partial sums per thread;
        # group_cl keeps one block per sample.
        if self.family == CHANNEL_PLANES:
            self.array_shape = (shape.n, shape.channels, shape.spatial)
            self.split_rows = shape.n * shape.channels
        elif self.family == CHANNEL_ROWS:
            self.array_shape = (-1, shape.channels)
            self.split_rows = shape.n * shape.spatial
        elif self.family == ROW_CHANNELS_LAST:
            self.array_shape = (plan.input_shape[0], -1, plan.input_shape[1])
            self.split_rows = plan.input_shape[0]
        else:
            self.array_shape = (shape.rows, shape.size)
            self.split_rows = shape.rows

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the accumulation dtype and in the memory layout the kernel family reads."""
        if t.dtype != self.acc:
            t = t.to(self.acc)
        if not t.is_contiguous(memory_format=self.fmt):
            t = t.contiguous(memory_format=self.fmt)
        return t

    def array(self, t: torch.Tensor) -> np.ndarray:
        """The NumPy view a kernel takes of a tensor laid out by :meth:`prepare`."""
        a = _numpy(t)
        if self.perm is not None:
            a = a.transpose(self.perm)
        if not a.flags.c_contiguous:  # reshape would copy, and a kernel would write into the copy
            raise RuntimeError(f"numba backend: a {tuple(t.shape)} tensor with strides {t.stride()} is not laid "
                               f"out as its kernels read it; this is a bug in normlab, please report it")
        return a.reshape(self.array_shape)

    def finish(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A result computed in the accumulation dtype, in ``x``'s dtype and memory format."""
        if t.dtype != x.dtype:
            t = t.to(x.dtype)
        if self.out_fmt is not None:
            t = t.contiguous(memory_format=self.out_fmt)
        return t


def _launch(x: torch.Tensor, plan: Plan) -> _Launch:
    cl = is_channels_last(x)
    return plan.memo(("numba", cl, x.dtype), lambda: _Launch(plan, cl, x.dtype))


def _parts(threads: int, launch: _Launch) -> np.ndarray:
    """The kernels' per-block float64 partial sums, (B, 2, P) for P parameters: one block of rows per
    thread (at most one per row), or one per sample for channels_last GroupNorm."""
    rows = launch.split_rows
    blocks = rows if launch.family == ROW_CHANNELS_LAST else max(1, min(threads, rows))
    return np.empty((blocks, 2, launch.param_count))


def _streams(out: torch.Tensor) -> bool:
    """Whether a kernel writes ``out`` with streaming stores: from
    :func:`normlab.kernels.numba.stream.threshold` bytes on (half the last-level cache)."""
    return out.numel() * out.element_size() >= _threshold()()


@functools.cache
def _threshold():
    """:func:`normlab.kernels.numba.stream.threshold`, imported once (an import statement at every call
    costs as much as the rest of :func:`_streams`)."""
    from normlab.kernels.numba import stream

    return stream.threshold


def _per_row(fixed: torch.Tensor, launch: _Launch) -> np.ndarray:
    """Fixed per-channel statistics, repeated for every row of the plan where each sample has its own
    (InstanceNorm in eval mode)."""
    fixed = _numpy(fixed if fixed.dtype == launch.acc else fixed.to(launch.acc))
    if isinstance(launch.shape, ChannelShape):
        return fixed
    return np.tile(fixed, launch.shape.rows // fixed.size)


class NumbaBackend:
    """Engine backend on numba kernels; see the module docstring."""

    name = "numba"

    def unsupported(self, x: torch.Tensor, plan: Plan) -> str | None:
        """Why this backend cannot run ``x`` with ``plan``, or ``None`` if it can."""
        if not x.is_cpu:
            return f"the numba backend runs on CPU tensors only, got a tensor on {x.device}"
        if x.dtype not in _FAST_DTYPES and x.dtype not in _CONVERTED_DTYPES:
            return f"the numba backend does not handle dtype {x.dtype}"
        if classify(plan) is None:
            return f"the numba backend does not handle a plan reducing axes {plan.reduce} of {plan.view_shape}"
        return None

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor like ``t`` (dense) in the kernels' recycled memory (:mod:`.buffers`), for a
        caller that assembles one output from several of this backend's results (ghost batch norm)."""
        return buffers.empty_like(t)

    def fuses(self, plan: Plan) -> bool:
        """Whether ReLU and a residual add can be fused into the normalization (BatchNorm plans)."""
        return isinstance(classify(plan), ChannelShape)

    def updates_running(self, x: torch.Tensor, plan: Plan, running_mean: torch.Tensor,
                        running_var: torch.Tensor) -> bool:
        """Whether :meth:`forward` can update these running statistics itself, as it computes the batch's
        (BatchNorm plans, running statistics contiguous and in the accumulation dtype of ``x``)."""
        acc = accumulation_dtype(x.dtype)
        return (
            running_mean.dtype == acc and running_var.dtype == acc
            and running_mean.is_cpu and running_var.is_cpu
            and running_mean.is_contiguous() and running_var.is_contiguous()
            and isinstance(classify(plan), ChannelShape)
        )

    def forward(self, x, weight, bias, fixed_mean, fixed_var, plan: Plan, eps: float,
                residual: torch.Tensor | None = None, relu: bool = False, running=None):
        """``(y, shift, mean_shifted, var, rstd)`` as :func:`normlab.core.engine.forward_torch` returns them,
        the statistics flat (one value per statistic).

        ``relu`` (and ``residual``) fuse ``relu(y + residual)`` into the normalizing pass (BatchNorm only).
        ``running``, ``(running_mean, running_var, momentum)`` where :meth:`updates_running` allows it, is
        updated in place with the batch's statistics in the same pass (unless, guarded, they are not
        finite: see :class:`~normlab.core.guard.RunningUpdate`).
        """
        return self._run_forward(x, weight, bias, fixed_mean, fixed_var, plan, eps, residual, relu, running)

    def _run_forward(self, x, weight, bias, fixed_mean, fixed_var, plan, eps, residual, relu, running, merged=None,
                     valid=None):
        """:meth:`forward`, or with ``merged`` ((4, C) float64: N, K, D, σ²) the batch's statistics given (and
        ``valid``, a bool array over the rows, the rows they are of: the others give 0)."""
        launch = _launch(x, plan)
        train = fixed_mean is None
        xa = launch.prepare(x)
        y = buffers.empty_like(xa)
        stats_t = torch.empty((4, launch.stat_count), dtype=launch.acc)  # shift, mean_shifted, var, rstd
        stats = stats_t.numpy()
        if not train:
            stats[0] = _per_row(fixed_mean, launch)
            stats[2] = _per_row(fixed_var, launch)
            stats[1] = 0.0
        if merged is not None:  # the count for the running variance's correction is the whole batch's
            self._forward(launch, xa, y, weight, bias, eps, train, stats, residual, relu, running,
                          float(merged[0].max()), merged, valid)
        elif x.numel():
            self._forward(launch, xa, y, weight, bias, eps, train, stats, residual, relu, running, plan.count)
        else:  # an empty batch: the torch engine's statistics of nothing
            if train:
                fill_empty_statistics(stats)
            stats[3] = 1.0 / np.sqrt(stats[2] + eps)
        shift, mean_shifted, var, rstd = stats_t.unbind()
        return launch.finish(y, x), shift, mean_shifted if train else None, var, rstd

    def _forward(self, launch, xa, y, weight, bias, eps, train, stats, residual, relu, running, count, merged=None,
                 valid=None):
        kernel = _kernels()[launch.family][0]
        threads = _sync_threads(xa.numel())
        acc = launch.acc
        w = _param(weight, launch.param_count, acc, 1.0)
        b = _param(bias, launch.param_count, acc, 0.0)
        xn, yn = launch.array(xa), launch.array(y)
        s = launch.shape
        family = launch.family
        if family == CHANNEL_PLANES or family == CHANNEL_ROWS:
            code = epilogue_code(relu, residual)
            rn = launch.array(launch.prepare(residual)) if code == 2 else xn
            if running is None:
                rm = rv = _NO_RUNNING[acc]
                momentum = unbias = 0.0
            else:
                rm, rv = _numpy(running[0]), _numpy(running[1])
                momentum = float(running[2])
                unbias = count / (count - 1) if getattr(running, "unbiased", True) else 1.0
            guarded = running is not None and getattr(running, "guarded", False)
            given = {} if merged is None else {"merged": merged}
            if valid is not None:
                given["valid"] = valid
            skipped = kernel(xn, w, b, eps, train, stats, yn, rn, code, rm, rv, momentum, unbias,
                             _parts(threads, launch), _streams(y), guarded=guarded, **given)
            if skipped:  # a guarded update of non-finite statistics, not made (normlab.core.guard)
                running.skipped = True
            elif running is not None:  # written through NumPy: tell autograd they changed, as an in-place op would
                increment_version((running[0], running[1]))
        elif relu:
            raise ValueError("the numba backend fuses ReLU into BatchNorm only")
        elif family == ROW:
            kernel(xn, w, b, eps, train, s.groups, s.run, stats, yn, threads, _streams(y))
        else:
            kernel(xn, w, b, eps, train, s.groups, stats, yn, _streams(y))

    def backward(self, dy, x, weight, shift, mean_shifted, rstd, plan: Plan, batch_stats: bool,
                 need: tuple[bool, bool, bool], y: torch.Tensor | None = None, residual: bool = False):
        """``(dx, dγ, dβ)``: dx in ``x``'s shape and layout, dγ and dβ flat, in the accumulation dtype.

        ``y`` is the output of a fused ReLU (its mask), ``residual`` whether a residual was added before
        it; then a fourth result, the residual's gradient, follows.
        """
        return self._run_backward(dy, x, weight, shift, mean_shifted, rstd, plan, batch_stats, need, y, residual)

    def _run_backward(self, dy, x, weight, shift, mean_shifted, rstd, plan, batch_stats, need, y, residual,
                      totals=None, count=0.0, valid=None):
        """:meth:`backward`, or with ``totals`` ((2, C) float64: Σ dy' and Σ dy' · x̂ over a batch of
        ``count`` values per channel) the batch's sums given; dγ and dβ are then zeros. ``valid`` (a bool
        array over the rows, with ``totals``): the other rows get dx = 0."""
        launch = _launch(x, plan)
        xa = launch.prepare(x)
        dya = launch.prepare(dy)
        dx = buffers.empty_like(xa)
        dres = buffers.empty_like(xa) if residual else None
        sums_t = torch.zeros((2, launch.param_count), dtype=launch.acc)  # dγ, dβ
        sums = sums_t.numpy()
        if x.numel():
            self._backward(launch, xa, dya, dx, dres, sums, weight, shift, mean_shifted, rstd, batch_stats,
                           need[0], y, totals, count, valid)
        dx = launch.finish(dx, x)
        dw, db = sums_t.unbind()
        grads = (dx if need[0] else None, dw if need[1] else None, db if need[2] else None)
        return grads if y is None else (*grads, dres)

    def _backward(self, launch, xa, dya, dx, dres, sums, weight, shift, mean_shifted, rstd, train, need_x, y,
                  totals=None, count=0.0, valid=None):
        kernel = _kernels()[launch.family][1]
        threads = _sync_threads(xa.numel())
        w = _param(weight, launch.param_count, launch.acc, 1.0)
        xn, dyn, dxn = launch.array(xa), launch.array(dya), launch.array(dx)
        sh = _flat(shift)
        ms = _flat(shift if mean_shifted is None else mean_shifted)
        rs = _flat(rstd)
        s = launch.shape
        family = launch.family
        if family == CHANNEL_PLANES or family == CHANNEL_ROWS:
            code = 0 if y is None else 2 if dres is not None else 1
            yn = launch.array(launch.prepare(y)) if y is not None else xn
            dresn = launch.array(dres) if dres is not None else dxn
            args = (xn, dyn, yn, w, sh, ms, rs, train, need_x, code, dxn, dresn, sums[0], sums[1])
            given = {} if totals is None else {"totals": totals, "count": float(count)}
            if valid is not None:
                given["valid"] = valid
            kernel(*args, _parts(threads, launch), _streams(dx), **given)
            return
        parts = _parts(threads, launch)
        if family == ROW:
            kernel(xn, dyn, w, sh, ms, rs, train, need_x, s.groups, s.run, dxn, parts, _streams(dx))
        else:
            kernel(xn, dyn, w, sh, ms, rs, train, need_x, s.groups, dxn, parts, _streams(dx))
        total = parts.sum(axis=0)  # per block: Σ dy (dβ), Σ dy · x̂ (dγ)
        sums[0] = total[1]
        sums[1] = total[0]

    # The statistics seam (BatchNorm plans): partial statistics → combine (the caller's) → apply. With
    # one place and the identity combine it computes what forward and backward compute in one call.
    # ``mask`` (bool, one entry per position: the plan's (N, *S) values of one channel; True = the
    # position counts): statistics over the positions it marks, outputs and gradients 0 at the others,
    # whose values are never read. The kernels take it on channels-last rows (2D input, channels_last
    # storage: one row of C values per position). ``group_size`` (samples): every step per group of that
    # many consecutive samples (the last one possibly smaller), G groups, results and statistics (G, …)
    # with one row per group (:mod:`.groups`).

    def partial_moments(self, x: torch.Tensor, plan: Plan, mask: torch.Tensor | None = None,
                        group_size: int | None = None) -> torch.Tensor:
        """This place's per-channel ``(n, s, d, M2)`` as a (1, 4, C) float64 tensor, in the layout of
        :func:`normlab.core.stats.partial_moments` (merged by :func:`normlab.core.stats.merge_moments`):
        the forward kernel's own first pass, its sums about each channel's first value (the first valid
        one, with ``mask``; the torch reference is :func:`normlab.core.stats.masked_partial_moments`);
        with ``group_size`` (G, 4, C), one row per group."""
        launch = _seam_launch(x, plan, mask, group_size)
        if group_size is not None:
            return _grouped().moments(launch, x, plan, group_size)
        packed = torch.zeros(1, 4, launch.param_count, dtype=torch.float64)
        valid = _valid(mask)
        count = plan.count if valid is None else int(np.count_nonzero(valid))
        if x.numel() and count:
            xa = launch.prepare(x)
            parts = _parts(_sync_threads(xa.numel()), launch)
            shift = np.empty(launch.param_count, launch.np_dtype)
            kernels = _seam_kernels()[launch.family]
            if valid is None:
                kernels[0](launch.array(xa), shift, parts)
            else:
                kernels[4](launch.array(xa), valid, shift, parts)
            kernels[2](parts, shift, float(count), packed[0].numpy())
        return packed

    def apply_moments(self, x, weight, bias, merged, plan: Plan, eps: float, residual: torch.Tensor | None = None,
                      relu: bool = False, running=None, mask: torch.Tensor | None = None,
                      group_size: int | None = None):
        """:meth:`forward`'s results with the batch's statistics given: ``merged``, ``(N, K, D, σ²)`` per
        channel as :func:`normlab.core.stats.merge_moments` returns them. ``running`` is updated as in
        :meth:`forward`, the variance corrected with the whole batch's count N. ``mask``: ``y`` = 0 at the
        positions it marks False. ``group_size``: ``merged`` per group ((G, C) each), the statistics
        returned (G, C)."""
        _seam_launch(x, plan, mask, group_size)
        if group_size is not None:
            if relu or residual is not None or running is not None:
                raise ValueError("the numba backend's statistics seam per group fuses no ReLU, residual or running "
                                 "update (merge the groups' moments and update the running statistics with them)")
            return _grouped().apply(_launch(x, plan), x, weight, bias, merged, plan, eps, group_size)
        if mask is not None and (relu or residual is not None):
            raise ValueError("the numba backend's statistics seam fuses no ReLU or residual with a mask")
        packed = np.stack([torch.as_tensor(t).to(torch.float64).reshape(-1).numpy() for t in merged])
        return self._run_forward(x, weight, bias, None, None, plan, eps, residual, relu, running, packed,
                                 _valid(mask))

    def partial_grad_sums(self, dy, x, shift, mean_shifted, rstd, plan: Plan, y: torch.Tensor | None = None,
                          mask: torch.Tensor | None = None, group_size: int | None = None):
        """This place's per-channel ``(Σ dy', Σ dy' · x̂)`` as a (2, C) float64 tensor: its share of dβ
        and dγ, and (times γ) of the closed form's Σ g and Σ g · x̂ (:mod:`normlab.core.stats`); ``dy'``
        is ``dy`` masked by ``y > 0`` after a fused ReLU. ``mask``: over the positions it marks True.
        ``group_size``: (G, 2, C), per group, with its statistics (G, C)."""
        launch = _seam_launch(x, plan, mask, group_size)
        if group_size is not None:
            return _grouped().grad_sums(launch, dy, x, shift, mean_shifted, rstd, plan, group_size, y)
        sums = torch.zeros(2, launch.param_count, dtype=torch.float64)
        if x.numel():
            xa, dya = launch.prepare(x), launch.prepare(dy)
            xn = launch.array(xa)
            yn = launch.array(launch.prepare(y)) if y is not None else xn
            parts = _parts(_sync_threads(xa.numel()), launch)
            kernels = _seam_kernels()[launch.family]
            valid = _valid(mask)
            if valid is None:
                kernels[1](xn, launch.array(dya), yn, _flat(shift), 0 if y is None else 1, parts)
            else:
                kernels[5](xn, launch.array(dya), yn, valid, _flat(shift), 0 if y is None else 1, parts)
            kernels[3](parts, _flat(mean_shifted), _flat(rstd), sums.numpy())
        return sums

    def apply_grad(self, dy, x, weight, shift, mean_shifted, rstd, totals: torch.Tensor, count: float, plan: Plan,
                   y: torch.Tensor | None = None, residual: bool = False, mask: torch.Tensor | None = None,
                   group_size: int | None = None):
        """∂L/∂x from the whole batch's ``totals`` (the combined :meth:`partial_grad_sums`) over ``count``
        values per channel; with ``y`` (a fused ReLU's output) ``(dx, dres)``, the residual's gradient
        after a fused add (``residual``) or ``None``. ``mask``: dx = 0 at the positions it marks False.
        ``group_size``: ``totals`` (G, 2, C) and ``count`` (G,) per group."""
        _seam_launch(x, plan, mask, group_size)
        if group_size is not None:
            return _grouped().grad(_launch(x, plan), dy, x, weight, shift, mean_shifted, rstd, totals, count, plan,
                                   group_size, y)
        grads = self._run_backward(dy, x, weight, shift, mean_shifted, rstd, plan, True, (True, False, False), y,
                                   residual, totals.to(torch.float64).contiguous().numpy(), count, _valid(mask))
        return grads[0] if y is None else (grads[0], grads[3])


def _valid(mask: torch.Tensor | None) -> np.ndarray | None:
    """A seam call's mask as the kernels read it: a flat bool array, one entry per row."""
    if mask is None:
        return None
    return _numpy(mask.reshape(-1) if mask.is_contiguous() else mask.contiguous().reshape(-1))


def _seam_launch(x: torch.Tensor, plan: Plan, mask: torch.Tensor | None = None,
                 group_size: int | None = None) -> _Launch:
    launch = _launch(x, plan)
    if launch.family not in (CHANNEL_PLANES, CHANNEL_ROWS):
        raise ValueError(f"the statistics seam takes BatchNorm plans (one statistic per channel), got {plan}")
    if group_size is not None and (mask is not None or int(group_size) < 1 or not x.numel()):
        raise ValueError(f"the statistics seam per group takes a non-empty input, a group_size of at least 1 and "
                         f"no mask, got group_size={group_size} on {tuple(x.shape)}"
                         f"{' with a mask' if mask is not None else ''}")
    if mask is not None:
        if launch.family != CHANNEL_ROWS:
            raise ValueError("the numba backend's statistics seam takes a mask on channels-last rows (2D input "
                             "or channels_last storage); give the input as (positions, C) rows")
        if mask.dtype != torch.bool or mask.numel() != plan.count or mask.device.type != "cpu":
            raise ValueError(f"the seam's mask must be a CPU bool tensor with one entry per position ({plan.count}), "
                             f"got {mask.dtype} with {mask.numel()} entries on {mask.device}")
    return launch


def _grouped():
    """The seam's steps per group of samples (:mod:`.grouped`, which imports this module)."""
    from normlab.kernels.numba import grouped

    return grouped


@functools.cache
def _seam_kernels() -> dict:
    """Per BatchNorm family: the forward's and the backward's first pass, their packing steps, and the
    first passes over the valid rows of a mask (channels-last rows only)."""
    from normlab.kernels.numba import channel, columns, planar

    packs = (channel.pack_moments, channel.pack_grad_sums)
    return {
        CHANNEL_PLANES: (planar.planar_sums, planar.planar_grad_sums, *packs, None, None),
        CHANNEL_ROWS: (columns.rows_sums, columns.rows_grad_sums, *packs, columns.rows_valid_sums,
                       columns.rows_valid_grad_sums),
    }
