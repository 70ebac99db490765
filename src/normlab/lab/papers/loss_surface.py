"""``loss-surface``: the loss surface of the lab's CNN with and without BN, for the eye.

The source documents cite Im, Tao & Branson 2016 ("An empirical analysis of the optimization of deep network
loss surfaces") for pictures of the loss surface; this experiment draws the two pictures that literature
uses, with and without BN, on the lab's VGG-style CNN:

* 1-D: the loss along the straight line from the initial weights θ₀ to the trained ones θ₁,
  L((1 − α)·θ₀ + α·θ₁) for α in [−0.25, 1.25] (Goodfellow et al. 2015; Im et al. 2016);
* 2-D: the loss on the plane θ₁ + a·δ₁ + b·δ₂ through the trained weights, δ₁ and δ₂ random Gaussian
  directions *filter-normalized* as Li et al. 2018 do: every filter (output channel) of δ has the norm of
  the same filter of θ₁, and the directions of biases and BN parameters are zero.

Claim checked (Goodfellow et al. 2015, observed again by Im et al. 2016): the straight path from the initial
to the trained weights crosses no barrier, with or without BN. The contour plots are the point.

Run it with ``normlab lab run loss-surface`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.lab import measure
from normlab.lab.papers.common import CNN_BUDGETS, cnn_protocol, image_data
from normlab.lab.probes import ProbeContext, probe
from normlab.lab.spec import Check, Experiment, Figure, Panel, Row, Runs, Setup, Trace, num, run_config

LABELS = {"bn": "with BN", "none": "without BN"}
BARRIER = 0.05
"""No barrier: going from θ₀ to θ₁ (α from 0 to 1) the loss never rises above the lowest value it has reached
so far by more than this fraction of L(θ₀) (a plateau is not a barrier, a bump is)."""

_INITIAL: "weakref.WeakKeyDictionary[nn.Module, list[Tensor]]" = weakref.WeakKeyDictionary()

BUDGETS: dict[str, dict[str, Any]] = {
    suite: {**CNN_BUDGETS[suite], **extra} for suite, extra in {
        "smoke": {"steps": 4, "eval_every": 2, "alphas": 7, "grid": 3, "probe_n": 64},
        "quick": {"steps": 200, "eval_every": 100, "alphas": 25, "grid": 9, "probe_n": 256},
        "full": {"steps": 3000, "eval_every": 500, "alphas": 49, "grid": 31, "probe_n": 1000},
    }.items()
}


def filter_normalized(direction: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """Li et al. 2018's filter normalization: each filter (slice along dim 0) of a weight's direction gets the
    norm of the same filter of the weight; 1-D parameters (biases, BN's γ and β) get a zero direction."""
    out = []
    for d, w in zip(direction, weights):
        if w.dim() <= 1:
            out.append(torch.zeros_like(w))
            continue
        dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        out.append(d * (wn / dn).reshape((-1,) + (1,) * (d.dim() - 1)))
    return out


@torch.no_grad()
def _loss_at(ctx: ProbeContext, params: list[Tensor], point: list[Tensor]) -> float:
    for p, v in zip(params, point):
        p.copy_(v)
    n = ctx.probe_x.shape[0]
    return float(ctx.loss_fn(ctx.model(ctx.probe_x[:n]), ctx.probe_y[:n]))


@probe("loss_surface")
def loss_surface(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """At the first step: remember θ₀. At the last: the 1-D path θ₀ → θ₁ (``alphas`` points on [−0.25, 1.25])
    and the 2-D filter-normalized slice (``grid`` x ``grid`` points on [−1, 1]²) around θ₁, on the fixed probe
    images in training mode (batch statistics); the model, its buffers and the random state are restored."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    if ctx.model not in _INITIAL:
        _INITIAL[ctx.model] = [p.detach().clone() for p in params]
        return {"stored": True}
    theta0, theta1 = _INITIAL.pop(ctx.model), [p.detach().clone() for p in params]
    alphas = [float(a) for a in np.linspace(-0.25, 1.25, cfg["alphas"])]
    coords = [float(c) for c in np.linspace(-1.0, 1.0, cfg["grid"])]
    gen = torch.Generator().manual_seed(cfg.get("direction_seed", 0))
    d1, d2 = ([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in theta1] for _ in range(2))
    d1, d2 = filter_normalized(d1, theta1), filter_normalized(d2, theta1)
    rng = torch.random.get_rng_state()
    try:
        with measure.preserved(ctx.model):
            path = [_loss_at(ctx, params, [(1 - a) * t0 + a * t1 for t0, t1 in zip(theta0, theta1)]) for a in alphas]
            plane = [[_loss_at(ctx, params, [t + a * u + b * v for t, u, v in zip(theta1, d1, d2)]) for a in coords]
                     for b in coords]
    finally:
        torch.random.set_rng_state(rng)
    return {"alphas": alphas, "path": path, "coords": coords, "plane": plane}


def _surface(run: dict[str, Any]) -> dict[str, Any]:
    rec = run["series"].get("loss_surface", {})
    return {k: v[-1] for k, v in rec.items()} if rec.get("path") else {}


def barrier(alphas: list[float], path: list[float]) -> float:
    """The largest rise of the loss on the way from θ₀ to θ₁: max over 0 ≤ α ≤ 1 of L(α) − min_{0 ≤ α′ ≤ α} L(α′),
    as a fraction of L(θ₀); 0 for a path whose loss never goes up."""
    a, loss = np.asarray(alphas), np.asarray(path, dtype=float)
    inside = loss[(a >= 0) & (a <= 1)]
    l0 = inside[0] if len(inside) else float("nan")
    rise = inside - np.minimum.accumulate(inside)
    return float(np.max(rise) / l0) if l0 > 0 else float("nan")


def flatness(coords: list[float], plane: list[list[float]]) -> float:
    """Mean loss over the slice divided by the loss at its centre (θ₁): how fast the loss rises around the
    trained weights in the filter-normalized units."""
    z = np.asarray(plane, dtype=float)
    centre = z[len(coords) // 2, len(coords) // 2]
    return float(np.mean(z) / centre) if centre > 0 else float("nan")


def _build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    pr = {"kind": "loss_surface", "steps": [0, b["steps"]], "alphas": b["alphas"], "grid": b["grid"]}
    data = {**image_data(setup, b), "n_probe": b["probe_n"]}
    return {norm: run_config(setup, data, {"arch": "vgg", "widths": b["widths"], "pool_after": b["pool_after"],
                                           "norm": norm}, lr=0.1, steps=b["steps"], batch=b["batch"],
                             eval_every=b["eval_every"], probes=[pr])
            for norm in LABELS}


def _evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows, checks = [], []
    for norm, label in LABELS.items():
        s = _surface(runs[norm])
        bar = barrier(s["alphas"], s["path"]) if s else float("nan")
        flat = flatness(s["coords"], s["plane"]) if s else float("nan")
        rows += [Row(f"barrier on the path θ₀ → θ₁ (largest rise / L(θ₀)), {label}", num(bar),
                     "none (Goodfellow et al. 2015; Im et al. 2016)", bar),
                 Row(f"mean loss over the filter-normalized slice / loss at θ₁, {label}", num(flat),
                     "— (Li et al. 2018: pictures)", flat)]
        checks.append(Check.level(f"{label}: no barrier on the straight path θ₀ → θ₁ (largest rise < {BARRIER:g} of "
                                  "L(θ₀))", bar, BARRIER, "<", paper="none (Goodfellow et al. 2015; Im et al. 2016)"))
    return rows, checks


def _path_traces(runs: Runs) -> list[Trace]:
    return [Trace(label, _surface(runs[n]).get("alphas", []), _surface(runs[n]).get("path", []))
            for n, label in LABELS.items()]


def _contour(norm: str):
    def make(runs: Runs) -> list[Trace]:
        s = _surface(runs[norm])
        return [Trace(LABELS[norm], s.get("coords", []), s.get("coords", []), z=s.get("plane"), kind="contour")]
    return make


EXPERIMENT = Experiment(
    name="loss-surface",
    title="The loss surface with and without BN: interpolation and a filter-normalized slice",
    paper="Im, Tao & Branson 2016 (arXiv 1612.04010); Li, Xu, Taylor, Studer & Goldstein 2018 (arXiv 1712.09913)",
    claim=("The straight path from the initial to the trained weights crosses no barrier, with or without BN "
           "(Goodfellow et al. 2015, Im et al. 2016); the filter-normalized slices show how the surface around "
           "the trained weights differs with BN."),
    protocol=lambda b: (cnn_protocol({**b}) + f" lr 0.1, {b['steps']} steps. At step 0 θ₀ is kept; after the last "
                        f"step the loss on {b['probe_n']} fixed test images in training mode (batch statistics) is "
                        f"taken at {b['alphas']} points α ∈ [−0.25, 1.25] of (1 − α)θ₀ + αθ₁ and on a "
                        f"{b['grid']}x{b['grid']} grid (a, b) ∈ [−1, 1]² of θ₁ + aδ₁ + bδ₂, δ₁, δ₂ Gaussian and "
                        "filter-normalized (Li et al. 2018; biases and BN parameters not moved)."),
    criterion=(f"One level check per arm: the largest rise of the path's loss on α ∈ [0, 1] above the lowest value "
               f"reached before it, as a fraction of L(θ₀), is below {BARRIER:g} (over several seeds: its 95% CI "
               "wholly below). Reproduced "
               "if both pass, not reproduced if either CI lies wholly above."),
    budgets=BUDGETS,
    build=_build,
    evaluate=_evaluate,
    figures=(Figure("loss-surface", "Loss surface of the CNN with and without BN", (
        Panel("1-D: θ₀ (α = 0) → θ₁ (α = 1)", "α", "loss on the probe images", (_path_traces,), ylog=True),
        Panel("2-D slice around θ₁, with BN", "a (filter-normalized δ₁)", "b (δ₂)", (_contour("bn"),)),
        Panel("2-D slice around θ₁, without BN", "a (filter-normalized δ₁)", "b (δ₂)", (_contour("none"),)),
    )),),
)
