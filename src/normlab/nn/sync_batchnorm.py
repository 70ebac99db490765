"""Batch normalization whose statistics cover the batches of every process of a ``torch.distributed`` group.

Data-parallel training gives each process (rank) a slice of the batch; plain BatchNorm would normalize
each slice with its own statistics. :class:`SyncBatchNorm` normalizes with the statistics of the whole
batch, over every rank, computed through the core's statistics seam (:mod:`normlab.core.stats`) with the
process group as the combine step: per rank per channel the partial moments (count, shift, mean about
the shift, centred M2) → one ``all_gather`` → Chan's exact merge, the same on every rank. The backward
needs one ``all_reduce`` of Σg and Σg·x̂ per channel.

The partial and apply steps run on the backend :mod:`normlab.kernels.dispatch` selects for the input
(the numba kernels on CPU, Triton's on CUDA) where it implements the seam, else on the torch engine.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.core import checks, stats
from normlab.core.guard import RunningUpdate, guard_stats_enabled
from normlab.core.plan import batch_plan
from normlab.kernels.dispatch import backend_for
from normlab.nn.batchnorm import _BatchNorm
from normlab.nn.conventions import DEFAULT, given
from normlab.nn.once import may_update

__all__ = ["SyncBatchNorm", "SyncBatchNormError"]


class SyncBatchNormError(RuntimeError):
    """A collective step of a :class:`SyncBatchNorm` layer failed: a rank did not arrive in time, died, or
    the process group broke. The process group cannot be used afterwards; destroy it and restart."""


class SyncBatchNorm(_BatchNorm, _TorchBatchNorm):
    r"""Batch normalization over the batches of every rank of a process group, for inputs (N, C, \*S)
    with 0 to 3 spatial axes (like ``torch.nn.SyncBatchNorm``), on CPU (gloo) and CUDA (NCCL) alike.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training, E[x] and Var[x] (biased) are taken per channel over the values of *all* ranks' batches,
    exactly as one BatchNorm over their concatenation would (to rounding; uneven and empty per-rank batches
    included: a rank with N = 0 still takes part and contributes nothing). Each rank packs its partial
    moments per channel, (n, s, d, M2) with n values, a shift s (one of its values), d = mean(x − s) and
    M2 = Σ (x − s − d)², in float64; one ``all_gather`` brings every rank's partials to every rank, which
    merges them with Chan's formula in rank order (so every rank gets the same statistics, bit for bit):
    never E[x²] − E[x]², so a large mean with a tiny spread keeps its variance. The all-gather (4·C values
    per rank) is chosen over an all-reduce of shifted sums because the ranks' shifts differ: the merge needs
    each rank's (n, d) to correct M2 exactly. In the backward, with g = γ ∂L/∂y, one ``all_reduce`` sums
    (Σg, Σg·x̂) per channel over the ranks, and

    .. math::
        \frac{\partial L}{\partial x_i} = \mathrm{rstd} \cdot \Big(g_i - \frac{\sum g}{N} - \hat x_i
        \frac{\sum g \hat x}{N}\Big)

    with N the total count; ∂L/∂γ and ∂L/∂β are this rank's sums (DistributedDataParallel averages them as
    for any parameter). Running statistics are updated from the merged statistics (unbiased variance with
    the total count; ``momentum=None``: cumulative average) identically on every rank, and
    ``num_batches_tracked`` counts batches whose total is non-empty.

    The partial statistics and the normalization with the merged ones are computed by the backend
    :mod:`normlab.kernels.dispatch` selects (``NORMLAB_BACKEND``): on CPU the numba kernels' own passes
    (one to pack a rank's moments, one to normalize; one to sum Σ∂L/∂y and Σ∂L/∂y·x̂, one for ∂L/∂x), on
    CUDA the Triton kernels' where that backend implements the seam, else the torch engine's operations.

    No communication happens in eval mode (running statistics, or this rank's batch when
    ``track_running_stats=False``), when ``torch.distributed`` has no process group, or when the group
    has one rank: the layer is then exactly :class:`~normlab.nn.BatchNorm1d`/2d/3d.

    It is an ``nn.modules.batchnorm._BatchNorm`` (same parameters, buffers and ``state_dict`` keys as
    torch's layers) but not a ``torch.nn.SyncBatchNorm``, which DistributedDataParallel refuses on CPU.

    Args:
        num_features, eps, momentum, affine, track_running_stats, guard_stats, convention: as in
            :class:`~normlab.nn.BatchNorm1d` (the guard and the convention apply to the merged statistics,
            identically on every rank; a skipped batch is skipped by all).
        process_group: the group whose ranks share statistics (default: the whole world).
        timeout: seconds (or a ``timedelta``) each collective step may wait for the other ranks before the
            layer raises :class:`SyncBatchNormError` naming itself; ``None``: the process group's timeout
            (with NCCL, whose wait without a timeout does not block the host, a missing rank is then left to
            NCCL's watchdog, which ends the process with its own error).

    Every rank must call the layer the same number of times, in training, with the same ``num_features``.

    Example (in each process of ``torchrun --nproc-per-node 2 train.py``)::

        >>> torch.distributed.init_process_group("gloo")                  # doctest: +SKIP
        >>> model = normlab.convert_sync_batchnorm(model)                   # doctest: +SKIP
        >>> model = torch.nn.parallel.DistributedDataParallel(model)       # doctest: +SKIP
    """

    _ranks = (2, 3, 4, 5)
    _layout = "of shape (N, C) or (N, C, *spatial) with at most 3 spatial axes"

    def __init__(self, num_features: int, eps: float = DEFAULT, momentum: float | None = DEFAULT,
                 affine: bool = True, track_running_stats: bool = True, process_group=None, device=None, dtype=None,
                 *, timeout: float | datetime.timedelta | None = None, convention: str = "torch",
                 guard_stats: bool | None = None) -> None:
        super().__init__(num_features, affine=affine, track_running_stats=track_running_stats, device=device,
                         dtype=dtype, convention=convention, guard_stats=guard_stats,
                         **given(eps=eps, momentum=momentum))
        self.process_group = process_group
        self.timeout = timeout
        self.layer_name = ""  # where the layer sits in a model, for error messages (set by convert_sync_batchnorm)
        self.input_rank: int | None = None  # the rank of the last input, which revert_sync_batchnorm follows
        self.replaced: type | None = None  # the class convert_sync_batchnorm replaced, which revert restores

    def _check_input_dim(self, input: torch.Tensor) -> None:
        checks.check_ndim(input, type(self).__name__, self._ranks, self._layout)

    def _describe(self) -> str:
        where = f" '{self.layer_name}'" if self.layer_name else ""
        return f"SyncBatchNorm{where} (num_features={self.num_features})"

    def _group(self):
        """The process group to synchronize over, or ``None`` where there is nothing to synchronize."""
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_rank(group) < 0:
            raise ValueError(f"{self._describe()}: this process is not a member of the layer's process_group; "
                             f"call the layer only on the group's ranks, or build it with their group.")
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.input_rank = input.dim()
        group = self._group()
        if group is None:
            return self._normalize(input)
        name = type(self).__name__
        self._check_config()
        checks.check_floating(input, name)
        checks.check_ndim(input, name, self._ranks, self._layout)
        checks.check_channels(input, self.num_features, name)
        # Not on a checkpointed segment's recomputation, nor after the first call inside update_once.
        updating = self.track_running_stats and may_update(self)
        options = self._guarded_update()
        running = RunningUpdate(self.running_mean, self.running_var, self._update_factor(),
                                guard_stats_enabled(options["guard"]), options["unbiased"]) if updating else None
        total = []

        def on_count(n: float) -> None:
            total.append(n)
            if n == 1:
                checks.check_enough_values(1, name, tuple(input.shape), checks.BN_SUGGESTION + (
                    " (the count is over every rank's batch)"), updating)

        plan = batch_plan(input.shape)
        y = stats.normalize_combined(
            input, self.weight, self.bias, plan, self.eps, running,
            lambda local: self._all_gather(local, group), lambda local: self._all_reduce(local, group), on_count,
            backend_for(input, plan),
        )
        if running is not None and running.skipped:
            self._skipped_batch(name)
        elif updating and total[0] > 0:
            self.num_batches_tracked.add_(1)
        return y

    def _wait(self, work, what: str, group) -> None:
        timeout = self.timeout
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            timeout = datetime.timedelta(seconds=float(timeout))
        try:
            work.wait() if timeout is None else work.wait(timeout)
        except RuntimeError as error:
            limit = "the process group's timeout" if timeout is None else f"{timeout.total_seconds():g} s"
            raise SyncBatchNormError(
                f"{self._describe()}: the {what} across the {dist.get_world_size(group)} ranks of its process group "
                f"failed on rank {dist.get_rank(group)} (waited at most {limit}): {error}. A rank that died, raised, "
                f"or skipped this layer (a different number of calls, eval mode, or an unused output on one rank) "
                f"leaves the others waiting; check that rank's log. The process group is unusable now: destroy it "
                f"and restart."
            ) from error

    def _all_gather(self, local: torch.Tensor, group) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        self._wait(dist.all_gather(parts, local.contiguous(), group=group, async_op=True),
                   "all-gather of the batch statistics", group)
        return torch.cat(parts)

    def _all_reduce(self, local: torch.Tensor, group) -> torch.Tensor:
        local = local.contiguous()
        self._wait(dist.all_reduce(local, group=group, async_op=True), "all-reduce of the gradient sums", group)
        return local

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm's spelling of :func:`normlab.convert_sync_batchnorm`."""
        from normlab.nn.convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.timeout is None else f", timeout={self.timeout}")
