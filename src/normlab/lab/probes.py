"""Probes: what a run measures while it trains. Each probe is declared in a run's config as
``{"kind": ..., "every": N}`` or ``{"kind": ..., "steps": [..]}`` plus its own options, and is
called before the optimizer step of the steps it is due at, on that step's batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.lab import measure


@dataclass
class ProbeContext:
    """What a probe may look at: the model, the batch of the coming step, the loss, the learning
    rate, a fixed probe batch and extra batches drawn independently of the training order."""

    model: nn.Module
    x: Tensor
    y: Tensor
    loss_fn: measure.LossFn
    lr: float
    probe_x: Tensor
    probe_y: Tensor
    extra_batches: Callable[[int], list[tuple[Tensor, Tensor]]]
    data_dir: Any = None  # the run's --data-dir, for probes that load data of their own


ProbeFn = Callable[[dict[str, Any], ProbeContext], dict[str, Any]]
PROBES: dict[str, ProbeFn] = {}


def probe(kind: str) -> Callable[[ProbeFn], ProbeFn]:
    def register(fn: ProbeFn) -> ProbeFn:
        PROBES[kind] = fn
        return fn
    return register


def is_due(cfg: dict[str, Any], step: int, last_step: int) -> bool:
    if "steps" in cfg:
        return step in cfg["steps"]
    every = cfg["every"]
    return step % every == 0 or step == last_step


SITES = ("pre_norm", "act_input")


def _activation_target(model: nn.Module, block: int, site: str) -> tuple[nn.Module, bool]:
    """The module to hook and whether its input (True) or output (False) is the activation:
    ``"pre_norm"`` is the output of the block's weight layer (before any normalization),
    ``"act_input"`` the input of its nonlinearity (after normalization and noise)."""
    b = model.blocks[block]
    if site == "pre_norm":
        return b.layer, False
    if site == "act_input":
        for m in b.post:
            if isinstance(m, (nn.ReLU, nn.Sigmoid)):
                return m, True
        raise ValueError(f"block {block} has no nonlinearity")
    raise ValueError(f"unknown activation site {site!r}; choose one of {', '.join(SITES)}")


@contextlib.contextmanager
def captured(targets: dict[str, tuple[nn.Module, bool]]) -> Iterator[dict[str, Tensor]]:
    """Record, under each name, the input (flag True) or output of a module during the body."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, (module, want_input) in targets.items():
        if want_input:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: seen.__setitem__(name, args[0].detach())))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _args, out, name=name: seen.__setitem__(name, out.detach())))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _forward_captured(ctx: ProbeContext, targets: dict[str, tuple[nn.Module, bool]], x: Tensor,
                      train: bool) -> dict[str, Tensor]:
    was_training = ctx.model.training
    ctx.model.train(train)
    try:
        with measure.preserved(ctx.model), torch.no_grad(), captured(targets) as seen:
            ctx.model(x)
    finally:
        ctx.model.train(was_training)
    return dict(seen)


@probe("activations")
def activations(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """Distribution of one unit (``channel``; every position counts) at ``blocks`` and ``sites`` on
    the fixed probe batch: its ``percentiles``, mean and std, under keys ``b{block}_{site}_pct`` etc.
    ``train`` evaluates in training mode (batch statistics of the probe batch, noise on)."""
    targets = {f"b{b}_{site}": _activation_target(ctx.model, b, site)
               for b in cfg["blocks"] for site in cfg.get("sites", SITES)}
    seen = _forward_captured(ctx, targets, ctx.probe_x, cfg.get("train", True))
    out: dict[str, Any] = {}
    for name, act in seen.items():
        unit = act[:, cfg.get("channel", 0)]
        out[f"{name}_pct"] = measure.percentiles(unit, cfg.get("percentiles", (15, 50, 85)))
        out[f"{name}_mean"] = float(unit.double().mean())
        out[f"{name}_std"] = float(unit.double().std(correction=0))
    return out


@probe("ics")
def ics(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """||G − G'|| and cos(G, G') for every block (see :func:`measure.ics_gradients`)."""
    return measure.ics_gradients(ctx.model, list(ctx.model.blocks), ctx.loss_fn, ctx.x, ctx.y, ctx.lr)


@probe("landscape")
def landscape(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """The landscape along the gradient at step sizes ``factors`` times the learning rate."""
    etas = [f * ctx.lr for f in cfg["factors"]]
    return measure.landscape_probe(ctx.model, ctx.loss_fn, ctx.x, ctx.y, etas)


@probe("relative_loss")
def relative_loss(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """Relative loss at step sizes ``sizes`` on ``batches`` independent mini-batches."""
    return {"per_batch": [measure.relative_loss(ctx.model, ctx.loss_fn, x, y, cfg["sizes"])
                          for x, y in ctx.extra_batches(cfg.get("batches", 1))]}


@probe("channel_stats")
def channel_stats(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """Channel mean/std of every block's output but the classifier's, in depth order."""
    blocks = list(ctx.model.blocks)[:-1]
    seen = _forward_captured(ctx, {str(i): (b, False) for i, b in enumerate(blocks)}, ctx.x, True)
    stats = [measure.channel_stats(seen[str(i)]) for i in range(len(blocks))]
    return {"abs_mean": [s["abs_mean"] for s in stats], "std": [s["std"] for s in stats]}


@probe("grad_hist")
def grad_hist(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """Histogram of log10|gradient| of the middle block's weight (or block ``block``)."""
    index = cfg.get("block", len(ctx.model.blocks) // 2)
    weight = ctx.model.blocks[index].layer.weight
    with measure.preserved(ctx.model):
        _, (g,) = measure.gradients(ctx.model, ctx.loss_fn, ctx.x, ctx.y, [weight])
    return {
        "block": index,
        "edges": list(cfg["edges"]),
        "counts": measure.log10_histogram(g, cfg["edges"]),
        "mean_abs": float(g.abs().mean()),
    }


@probe("batch_stats")
def batch_stats(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """How far the coming step's batch statistics are from the running ones, in every BatchNorm-style layer
    (Shen et al. 2020's fluctuation of batch statistics): per layer, the mean over channels of
    |μ_B − μ| / σ (``mean_dev``) and of |σ²_B / σ² − 1| (``var_dev``), μ and σ² the running statistics
    before the step. The batch's statistics are read back from the running update a training-mode forward
    makes (μ_B = (μ' − (1 − m) μ) / m), so they are exactly the ones the layer uses, over whatever positions
    it counts (a mask's valid ones, say); model, buffers and the random generator are then restored."""
    layers = [m for m in ctx.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and isinstance(m.momentum, float) and m.momentum > 0]
    before = [(m.running_mean.double().clone(), m.running_var.double().clone()) for m in layers]
    rng = torch.random.get_rng_state()
    was_training = ctx.model.training
    try:
        with measure.preserved(ctx.model), torch.no_grad():
            ctx.model.train(True)
            ctx.model(ctx.x)
            after = [(m.running_mean.double().clone(), m.running_var.double().clone()) for m in layers]
    finally:
        ctx.model.train(was_training)
        torch.random.set_rng_state(rng)
    mean_dev, var_dev = [], []
    for m, (mu, var), (mu_new, var_new) in zip(layers, before, after):
        mu_b = (mu_new - (1 - m.momentum) * mu) / m.momentum
        var_b = (var_new - (1 - m.momentum) * var) / m.momentum
        sigma2 = var.clamp_min(m.eps)
        mean_dev.append(float(((mu_b - mu).abs() / sigma2.sqrt()).mean()))
        var_dev.append(float((var_b / sigma2 - 1).abs().mean()))
    return {"mean_dev": mean_dev, "var_dev": var_dev}
