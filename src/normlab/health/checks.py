"""Measure the health of a model's normalization layers on a few batches of data.

For every layer with running statistics (any :class:`torch.nn.modules.batchnorm._NormBase`: torch.nn's
and normlab's BatchNorm, InstanceNorm with ``track_running_stats``):

* the statistics of the batches it sees in eval mode (the model as deployed), pooled over all batches
  exactly (Chan's merge of (count, mean, M2); InstanceNorm: the batch average of per-instance
  statistics, as its running update takes), against its running statistics: the mean shift in units of
  the running standard deviation, |μ_batch − μ_running| / sqrt(σ²_running + eps), and the variance ratio
  σ²_batch / σ²_running, each at the worst channel;
* running statistics NaN/inf or negative (variance), never updated, batches skipped by the guard
  (``num_batches_skipped``), channels whose γ is about 0, too few values per channel per batch for its
  statistics to be trusted in training, and whether it can be folded into the convolution or linear
  layer before it in a ``Sequential``;

and, for the model, the gap between its output with the normalization layers in training mode (batch
statistics; the running statistics are restored afterwards) and in eval mode, mean |y_train − y_eval| /
std(y_eval) (InstanceNorm with running statistics has such a gap by construction: per-instance statistics in
training, their average in eval). The thresholds are the module constants below; every flag's text is
rendered from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from normlab.nn.transaction import running_buffers

__all__ = ["LayerHealth", "ModelHealth", "inspect", "FLAGS", "STALE_SIGMA", "VAR_RATIO", "GAP", "DEAD_GAMMA",
           "MIN_VALUES"]

STALE_SIGMA = 0.5
"""A running mean further than this many running standard deviations from the batches' is stale."""
VAR_RATIO = 2.0
"""A batch/running variance ratio above this, or below its inverse, is stale."""
GAP = 0.1
"""A model whose train-mode output differs from its eval-mode output by more than this (in eval-output
standard deviations, on average) has a train/eval gap."""
DEAD_GAMMA = 1e-3
"""|γ| below this: the channel's output is β whatever its input."""
MIN_VALUES = 16
"""Fewer values per channel per batch than this: the batch statistics of training are noise."""

FLAGS = {
    "nonfinite_stats": "running mean or variance holds NaN or inf",
    "negative_var": "running variance is negative",
    "never_updated": "running statistics were never updated (num_batches_tracked = 0, or still 0 and 1)",
    "stale_stats": (f"running statistics do not describe the data: mean shift > {STALE_SIGMA} σ or variance "
                    f"ratio outside [1/{VAR_RATIO:g}, {VAR_RATIO:g}]"),
    "nonfinite_inputs": "the batches reaching the layer hold NaN or inf (look at the layers before it)",
    "guarded_skips": "batches with non-finite statistics were skipped (num_batches_skipped > 0)",
    "dead_gamma": f"channels with |γ| < {DEAD_GAMMA:g} output β whatever their input",
    "small_batch": f"fewer than {MIN_VALUES} values per channel per batch: training statistics are noise",
    "train_eval_gap": f"train-mode output differs from eval-mode output by more than {GAP} σ on average",
}


@dataclass
class LayerHealth:
    """One layer's measurements (``None`` where not measurable) and flags (keys of :data:`FLAGS`)."""

    name: str
    kind: str
    channels: int
    values_per_channel: int | None = None
    mean_shift_sigma: float | None = None
    var_ratio_max: float | None = None
    var_ratio_min: float | None = None
    nonfinite_channels: int = 0
    negative_var_channels: int = 0
    batches_tracked: int | None = None
    batches_skipped: int = 0
    dead_gamma_channels: int = 0
    foldable: bool = False
    flags: list[str] = field(default_factory=list)
    per_channel: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class ModelHealth:
    """The layers' health, the model's train/eval gap, and the model-level flags."""

    layers: list[LayerHealth]
    batches: int
    train_eval_gap: float | None = None
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        from normlab.health.render import table

        return table(self)

    @property
    def flagged(self) -> list[str]:
        """Every flag, model-level ones first, as ``layer: flag``."""
        return [f"model: {f}" for f in self.flags] + [f"{lay.name}: {f}" for lay in self.layers for f in lay.flags]

    def to_json(self) -> dict:
        """A JSON-ready dict (NaN and inf as ``None``), with the flags' meanings and thresholds."""
        return _finite_json({
            "batches": self.batches, "train_eval_gap": self.train_eval_gap, "flags": self.flags,
            "notes": self.notes, "layers": [asdict(lay) for lay in self.layers], "flag_meanings": FLAGS,
            "thresholds": {"STALE_SIGMA": STALE_SIGMA, "VAR_RATIO": VAR_RATIO, "GAP": GAP,
                           "DEAD_GAMMA": DEAD_GAMMA, "MIN_VALUES": MIN_VALUES},
        })


def _finite_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


class _Pooled:
    """Per-channel (count, mean, M2) of a layer's inputs over all batches, merged exactly (Chan et al.)."""

    def __init__(self, instance: bool) -> None:
        self.instance = instance
        self.n = 0
        self.mean = self.m2 = None
        self.min_values: int | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        c = x.shape[1]
        if self.instance:  # running statistics average the per-instance mean and unbiased variance
            flat = x.reshape(x.shape[0], c, -1)
            values = flat.shape[2]
            var, mean = torch.var_mean(flat, dim=2, correction=1)
            self._merge_sum(mean.sum(0), var.sum(0), x.shape[0])
        else:
            flat = x.transpose(0, 1).reshape(c, -1)
            values = flat.shape[1]
            var, mean = torch.var_mean(flat, dim=1, correction=0)
            self._merge(values, mean, var * values)
        self.min_values = values if self.min_values is None else min(self.min_values, values)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.n = total

    def _merge_sum(self, mean_sum: torch.Tensor, var_sum: torch.Tensor, n: int) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = 0, torch.zeros_like(mean_sum), torch.zeros_like(var_sum)
        self.n += n
        self.mean, self.m2 = self.mean + mean_sum, self.m2 + var_sum

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and unbiased variance (InstanceNorm: their batch averages)."""
        if self.instance:
            return self.mean / self.n, self.m2 / self.n
        return self.mean, self.m2 / max(self.n - 1, 1)


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or type(model).__name__, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None]


def _foldable(model: nn.Module) -> set[int]:
    """ids of the norm layers that directly follow a convolution or linear layer in a Sequential."""
    found = set()
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module)
            for before, after in zip(children, children[1:]):
                if isinstance(before, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) and isinstance(
                        after, nn.modules.batchnorm._BatchNorm):
                    found.add(id(after))
    return found


def _first_tensor(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"inspect: each batch must be a tensor or a (input, ...) tuple, got {type(batch).__name__}")


def _static(name: str, m: nn.Module, pooled: _Pooled | None, foldable: bool) -> LayerHealth:
    rm, rv = m.running_mean.detach().double(), m.running_var.detach().double()
    h = LayerHealth(name=name, kind=type(m).__name__, channels=rm.numel(), foldable=foldable)
    h.nonfinite_channels = int((~torch.isfinite(rm) | ~torch.isfinite(rv)).sum())
    h.negative_var_channels = int((rv < 0).sum())
    tracked = getattr(m, "num_batches_tracked", None)
    is_instance = isinstance(m, nn.modules.instancenorm._InstanceNorm)
    h.batches_tracked = None if tracked is None or is_instance else int(tracked)
    h.batches_skipped = int(getattr(m, "num_batches_skipped", 0))
    if m.affine and m.weight is not None:
        h.dead_gamma_channels = int((m.weight.detach().abs() < DEAD_GAMMA).sum())
    default = bool((rm == 0).all() and (rv == 1).all())
    never = h.batches_tracked == 0 if h.batches_tracked is not None else default
    flags = [("nonfinite_stats", h.nonfinite_channels), ("negative_var", h.negative_var_channels),
             ("never_updated", never), ("guarded_skips", h.batches_skipped), ("dead_gamma", h.dead_gamma_channels)]
    h.flags = [f for f, on in flags if on]
    if pooled is not None and pooled.mean is not None:
        bm, bv = pooled.result()
        h.values_per_channel = pooled.min_values
        inputs_ok = torch.isfinite(bm) & torch.isfinite(bv)
        if not inputs_ok.all():
            h.flags.append("nonfinite_inputs")
        ok = torch.isfinite(rm) & torch.isfinite(rv) & (rv >= 0) & inputs_ok
        shift = (bm - rm).abs() / torch.sqrt(rv.clamp(min=0) + m.eps)
        ratio = bv / rv.clamp(min=1e-30)
        if ok.any():
            h.mean_shift_sigma = float(shift[ok].max())
            h.var_ratio_max, h.var_ratio_min = float(ratio[ok].max()), float(ratio[ok].min())
            if h.mean_shift_sigma > STALE_SIGMA or h.var_ratio_max > VAR_RATIO or h.var_ratio_min < 1 / VAR_RATIO:
                h.flags.append("stale_stats")
        if h.values_per_channel < MIN_VALUES:
            h.flags.append("small_batch")
        h.per_channel = {"batch_mean": bm.tolist(), "running_mean": rm.tolist(),
                         "batch_std": bv.clamp(min=0).sqrt().tolist(), "running_std": rv.clamp(min=0).sqrt().tolist()}
    return h


def _train_eval_gap(model: nn.Module, norms: list[nn.Module], batches: list[torch.Tensor]) -> float:
    """mean |y_train − y_eval| / std(y_eval) over ``batches``, the norm layers alone in training mode; the
    running statistics and every module's mode are restored."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.clone()) for b in running_buffers(model)]
    skipped = [(m, m.num_batches_skipped) for m in norms if hasattr(m, "num_batches_skipped")]
    diff = scale = 0.0
    try:
        model.eval()
        for x in batches:
            y_eval = _first_tensor(model(x)).double()
            for m in norms:
                m.train()
            y_train = _first_tensor(model(x)).double()
            for m in norms:
                m.eval()
            diff += float((y_train - y_eval).abs().mean())
            scale += float(y_eval.std()) if y_eval.numel() > 1 else 0.0
    finally:
        for buffer, value in saved:
            buffer.copy_(value)
        for m, count in skipped:
            m.num_batches_skipped = count
        for m, mode in modes:
            m.training = mode
    if not (math.isfinite(diff) and math.isfinite(scale)):
        return math.nan  # an output holds NaN or inf: flagged, with a note
    return diff / scale if scale > 0 else math.inf if diff > 0 else 0.0


@torch.no_grad()
def inspect(model: nn.Module, batches: Iterable) -> ModelHealth:
    """The health of ``model``'s normalization layers on ``batches`` (tensors, or tuples whose first item
    is the input); the model is left as it was (mode and running statistics).

    >>> import torch, normlab, normlab.nn as nl
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), nl.BatchNorm2d(8))
    >>> report = normlab.inspect(model, [torch.randn(16, 3, 8, 8)])
    >>> report.layers[0].flags                    # fresh layer: statistics never updated
    ['never_updated', 'stale_stats']
    """
    batches = [_first_tensor(b) for b in batches]
    layers = _norm_layers(model)
    fold = _foldable(model)
    pooled = {id(m): _Pooled(isinstance(m, nn.modules.instancenorm._InstanceNorm)) for _, m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: pooled[id(mod)].add(args[0])) for _, m in layers]
    modes = [(m, m.training) for m in model.modules()]
    notes = []
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in modes:
            m.training = mode
    report = ModelHealth([_static(name, m, pooled[id(m)], id(m) in fold) for name, m in layers], len(batches))
    if layers and batches:
        try:
            report.train_eval_gap = _train_eval_gap(model, [m for _, m in layers], batches)
        except (ValueError, RuntimeError, TypeError) as err:  # one value per channel, an output not a tensor
            notes.append(f"train-mode forward failed, no train/eval gap: {err}")
        if report.train_eval_gap is not None and not report.train_eval_gap <= GAP:
            report.flags.append("train_eval_gap")
            if math.isnan(report.train_eval_gap):
                notes.append("the model's output holds NaN or inf in train or eval mode")
    if not layers:
        notes.append("no normalization layer with running statistics found")
    report.notes = notes
    return report
