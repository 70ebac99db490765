"""Population statistics for a trained model: :func:`precise_bn` and AdaBN (:func:`adapt_bn`).

A BN layer's running statistics are an exponential moving average of batch statistics taken while the
weights moved; when they moved fast (a large learning rate, few epochs) the average lags behind the
final weights and the model evaluates worse than it trained (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm"). :func:`precise_bn` replaces the average by the exact statistics of each layer's inputs over
a set of batches, with the weights fixed::

    count n = Σ_b n_b,    μ = (1/n) Σ_b Σ_i x_bi,    running_var = M2 / (n − 1),   M2 = Σ_b Σ_i (x_bi − μ)²

Each batch's (n_b, μ_b, M2_b) per channel is taken in float64 about a sample of the data
(:func:`normlab.core.engine.moments`) and the partials are merged exactly with Chan et al.'s formula
(:meth:`ChannelMoments.merge`), never as E[x²] − E[x]², so data with a large mean and a tiny spread keeps
its variance. The same machinery on data from a new domain is AdaBN (Li et al. 2016): :func:`adapt_bn`.

Across processes (a ``torch.distributed`` process group is up, or ``process_group=`` is given) each rank
collects the moments of its own shard of the batches; one ``all_gather`` brings every rank's (n, μ, M2)
per channel to every rank, which merges them with the same formula in rank order, so every rank writes
the same statistics, bit for bit: those of all ranks' batches, as one process fed all of them would get
(to float64 rounding). Shards may be uneven, and a rank may have no batch at all.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from normlab.core.engine import moments
from normlab.core.plan import batch_plan

__all__ = ["ChannelMoments", "precise_bn", "adapt_bn", "batchnorm_layers", "collect_moments", "write_statistics"]


@dataclass
class ChannelMoments:
    """Per-channel count, mean and M2 = Σ (x − μ)² of the values seen so far, in float64.

    Partials combine exactly in any order with :meth:`merge`; :meth:`finalize` gives the mean and the
    unbiased variance. :meth:`to_tensor`/:meth:`from_tensor` pack one into a (3, C) tensor, the form to
    gather across processes before merging there too.
    """

    count: torch.Tensor  # (C,) float64: values per channel (integers, exact up to 2**53)
    mean: torch.Tensor   # (C,) float64
    m2: torch.Tensor     # (C,) float64

    @classmethod
    def empty(cls, channels: int, device: torch.device | str = "cpu") -> "ChannelMoments":
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), zeros.clone())

    @classmethod
    def of(cls, x: torch.Tensor) -> "ChannelMoments":
        """The moments of one BN input ``x`` of shape (N, C, *S), per channel over N and *S (any memory
        format), computed in float64 about a sample of the data."""
        plan = batch_plan(tuple(x.shape))
        xv = x.detach().to(torch.float64)
        c = plan.channels
        if xv.numel() == 0:
            return cls.empty(c, x.device)
        shift, mean_shifted, var, _ = moments(xv, plan)
        count = torch.full((c,), float(plan.count), dtype=torch.float64, device=x.device)
        return cls(count, (shift + mean_shifted).reshape(c), var.reshape(c) * plan.count)

    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
        """Chan et al.'s parallel combination::

            n = n_a + n_b,   δ = μ_b − μ_a,   μ = μ_a + δ · n_b / n,   M2 = M2_a + M2_b + δ² · n_a n_b / n
        """
        n = self.count + other.count
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = other.mean - self.mean
        mean = torch.where(n > 0, self.mean + delta * (other.count / safe), self.mean)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / safe)
        return ChannelMoments(n, mean, m2)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, unbiased variance M2 / (n − 1))`` in float64; raises ValueError for n < 2."""
        if bool((self.count < 2).any()):
            raise ValueError(
                f"precise_bn: the population variance needs at least 2 values per channel, got "
                f"{int(self.count.min().item())}. Pass more (or larger) batches."
            )
        return self.mean, self.m2 / (self.count - 1)

    def to_tensor(self) -> torch.Tensor:
        """(3, C) float64: count, mean, M2."""
        return torch.stack([self.count, self.mean, self.m2])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ChannelMoments":
        return cls(t[0], t[1], t[2])


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BN layer of ``model`` that keeps running statistics, by qualified name: any instance of
    torch.nn's ``_BatchNorm`` (torch.nn's, normlab's, SyncBatchNorm and subclasses)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None}


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How a batch is fed: a tensor is the input; a tuple or list is ``(input, *rest)`` (e.g.
    ``(images, labels)``) and only its first element is passed; a dict is passed as keyword arguments
    (``model(**batch)``). Tensors are moved to the model's device first."""
    device = _model_device(model)
    if device is not None:
        batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _reraise(exc: BaseException, index: int) -> None:
    """Raise ``exc``'s type again, its message naming the batch; RuntimeError where the type cannot
    be rebuilt from a message."""
    message = (f"precise_bn: batch {index} raised {type(exc).__name__}: {exc}. "
               f"The running statistics are unchanged.")
    try:
        new = type(exc)(message)
    except Exception:
        new = RuntimeError(message)
    raise new from exc


@torch.no_grad()
def collect_moments(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, ChannelMoments]:
    """Feed ``batches`` through ``model`` with its BN layers in training mode (normalizing with batch
    statistics, as in training) and return, per BN layer, the exact moments of its inputs.

    Leaves the model as it found it: modes, running statistics and ``num_batches_tracked`` are restored
    and the hooks removed, whether the passes succeed or raise (a raising batch is re-raised naming its
    index).
    """
    acc, seen = _collect(model, batches, num_batches, progress, forward)
    if seen == 0:
        raise ValueError(EMPTY_MESSAGE)
    _warn_unseen(batchnorm_layers(model), acc)
    return acc


EMPTY_MESSAGE = ("precise_bn: the batches are empty (the iterator gave no batch); the running statistics are "
                 "unchanged. Pass an iterable of batches, e.g. a DataLoader.")


def _warn_unseen(layers: dict[str, _BatchNorm], acc: dict[str, ChannelMoments]) -> None:
    unseen = [name for name in layers if name not in acc]
    if unseen:
        warnings.warn(f"precise_bn: {len(unseen)} BatchNorm layer(s) received no input and keep their "
                      f"running statistics: {', '.join(unseen)}", stacklevel=4)


def _collect(model, batches, num_batches, progress, forward) -> tuple[dict[str, ChannelMoments], int]:
    """:func:`collect_moments`'s passes: the moments per layer that received input, and how many batches
    were fed (possibly 0)."""
    from tqdm.auto import tqdm

    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(
            "precise_bn: the model has no BatchNorm layer with running statistics (an instance of "
            "torch.nn.modules.batchnorm._BatchNorm with track_running_stats=True); nothing to compute."
        )
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"precise_bn: num_batches must be a positive integer or None, got {num_batches}.")
    forward = default_forward if forward is None else forward
    modes = {m: m.training for m in model.modules()}
    saved = {name: [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]
             for name, m in layers.items()}
    acc: dict[str, ChannelMoments] = {}

    def hook_for(name):
        def hook(module, args):
            part = ChannelMoments.of(args[0])
            acc[name] = part if name not in acc else acc[name].merge(part)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers.items()]
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    seen = 0
    try:
        for m in layers.values():
            m.train()
        iterator = iter(batches)
        with tqdm(total=total, desc="precise_bn", unit="batch", disable=not progress, leave=False) as bar:
            while num_batches is None or seen < num_batches:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                except Exception as exc:
                    _reraise(exc, seen)
                try:
                    forward(model, batch)
                except Exception as exc:
                    _reraise(exc, seen)
                seen += 1
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for name, m in layers.items():
            for buf, old in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved[name]):
                buf.copy_(old)
    return acc, seen


def _process_group(process_group):
    """The group whose ranks' batches are merged, or ``None`` for this process's alone: ``False``, no
    process group up, or a group of one rank."""
    if process_group is False or not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _gather(model, batches, num_batches, progress, forward, group) -> dict[str, ChannelMoments]:
    """Every rank's moments, merged in rank order: the same on every rank. Each rank first says whether its
    own passes succeeded (one all-reduce), so that a rank whose batch raised makes the others raise too
    instead of waiting; then one all-gather of every layer's (count, mean, M2), empty where a rank saw none."""
    layers = batchnorm_layers(model)
    if not layers:  # the same model on every rank: all raise here
        return collect_moments(model, [], num_batches, False, forward)
    device = next(iter(layers.values())).running_mean.device
    try:
        local, seen = _collect(model, batches, num_batches, progress, forward)
        failure = None
    except Exception as exc:  # reported to the other ranks first, then raised here
        local, seen, failure = {}, 0, exc
    status = torch.tensor([float(failure is not None), float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(status, group=group)
    if failure is not None:
        raise failure
    if status[0] > 0:
        raise RuntimeError(f"precise_bn: {int(status[0])} other rank(s) of the process group failed while feeding "
                           f"their batches (see their error); the running statistics are unchanged.")
    if status[1] == 0:
        raise ValueError(EMPTY_MESSAGE.replace("the iterator gave no batch", "no rank's iterator gave a batch"))
    sizes = [m.running_mean.shape[0] for m in layers.values()]
    packed = torch.cat([(local[name] if name in local else ChannelMoments.empty(c, device)).to_tensor().to(device)
                        for name, c in zip(layers, sizes)], dim=1)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    merged: dict[str, ChannelMoments] = {}
    for part in parts:  # rank order: every rank merges the same values in the same order
        for name, t in zip(layers, part.split(sizes, dim=1)):
            m = ChannelMoments.from_tensor(t)
            merged[name] = m if name not in merged else merged[name].merge(m)
    merged = {name: m for name, m in merged.items() if bool((m.count > 0).all())}
    _warn_unseen(layers, merged)
    return merged


@torch.no_grad()
def write_statistics(model: nn.Module, stats: dict[str, ChannelMoments]) -> dict[str, int]:
    """Store each layer's mean and unbiased variance in its ``running_mean``/``running_var`` (in their
    dtype); every check runs before the first write. Returns the values each layer's came from."""
    layers = batchnorm_layers(model)
    final = {name: s.finalize() for name, s in stats.items()}
    for name, (mean, var) in final.items():
        m = layers[name]
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return {name: int(s.count[0].item()) for name, s in stats.items()}


def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    process_group=None,
) -> dict[str, int]:
    """Recompute every BN layer's ``running_mean``/``running_var`` as the exact population statistics
    of its inputs over ``batches`` (the first ``num_batches`` of them, or all), in place; across every
    rank's batches when a process group is up.

    Args:
        model: any module; its BN layers are the instances of torch.nn's ``_BatchNorm`` with running
            statistics (torch.nn's, normlab's, SyncBatchNorm, subclasses).
        batches: an iterable of batches: tensors, ``(input, *rest)`` tuples/lists (only the input is
            used) or dicts (passed as ``model(**batch)``); tensors are moved to the model's device.
        num_batches: how many batches to use (default: all the iterable gives).
        progress: show a tqdm bar on stderr.
        forward: ``forward(model, batch)`` to feed a batch some other way.
        process_group: where ``torch.distributed`` is initialized, the group whose ranks' batches make the
            statistics (default: the whole world; every rank of it must call ``precise_bn``, each with its
            own shard, which may be uneven or empty); ``False``: this process's batches only.

    During the passes the BN layers are in training mode, so each normalizes with its batch's
    statistics exactly as in training and the layers after it see the inputs they were trained on;
    every other module keeps its mode (call ``model.eval()`` first for deterministic dropout). Each
    layer's statistics are the mean and the *unbiased* variance (as torch stores it) of all the values
    of each channel over every batch, merged exactly (see :class:`ChannelMoments`). Weights,
    ``num_batches_tracked`` and every module's train/eval mode are left as they were; a layer that
    received no input keeps its statistics (with a warning).

    Returns the number of values each layer's statistics were computed from (over every rank), by layer
    name. Across processes, a model holding SyncBatchNorm layers needs the same number of batches on every
    rank (those layers communicate in each training forward).

    Raises ValueError when the model has no BN layer with running statistics or ``batches`` is empty;
    a batch that raises is re-raised (its type kept where possible) naming its index. In every error
    case the running statistics are unchanged.

    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> counts = normlab.precise_bn(model, [torch.randn(32, 4) for _ in range(5)], progress=False)
    >>> counts["1"]
    160
    """
    group = _process_group(process_group)
    if group is None:
        stats = collect_moments(model, batches, num_batches, progress, forward)
    else:
        stats = _gather(model, batches, num_batches, progress, forward, group)
    return write_statistics(model, stats)


def adapt_bn(
    model: nn.Module,
    target_batches: Iterable[Any],
    inplace: bool = False,
    num_batches: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    process_group=None,
) -> nn.Module:
    """AdaBN (Li et al. 2016): the model with every BN layer's statistics re-estimated on data from the
    target domain, the weights kept; it is :func:`precise_bn` run on ``target_batches``.

    Returns a new model (a deep copy; ``model`` is untouched), or ``model`` itself with ``inplace=True``.
    ``num_batches=k`` adapts from only the first k target batches. Other arguments as in
    :func:`precise_bn`.
    """
    adapted = model if inplace else copy.deepcopy(model)
    precise_bn(adapted, target_batches, num_batches=num_batches, progress=progress, forward=forward,
               process_group=process_group)
    return adapted
