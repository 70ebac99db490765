"""Measurements of the batch-norm papers, as small pure functions.

Probes that evaluate the model do so inside :func:`preserved`, which restores parameters, buffers
(batch-norm running statistics) and the state of every noise generator afterwards, so a probe never
changes what training does next.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from normlab.nn.extra import CovariateShiftNoise

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body, then put back the model's parameters, buffers, gradients and noise-generator
    states exactly as they were."""
    params = [(p, p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    gens = [(m.generator, m.generator.get_state()) for m in model.modules()
            if isinstance(m, CovariateShiftNoise) and m.generator is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value, grad in params:
                p.copy_(value)
                p.grad = grad
            for b, value in buffers:
                b.copy_(value)
        for gen, state in gens:
            gen.set_state(state)


def gradients(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
              params: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
    """Loss ``L(θ)`` on the batch and ``∂L/∂p`` for each ``p`` in ``params`` (the model is left as it
    is: wrap the call in :func:`preserved` to keep running statistics untouched)."""
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a: Tensor, b: Tensor) -> float:
    """``<a, b> / (||a|| ||b||)``; 1.0 when both are zero, 0.0 when only one is."""
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a, b) / (na * nb))


def ics_gradients(model: nn.Module, blocks: Sequence[nn.Module], loss_fn: LossFn, x: Tensor, y: Tensor,
                  lr: float) -> dict[str, list[float]]:
    """Internal covariate shift measured on gradients (Santurkar et al. 2018, §2.2).

    For layer ``i`` (the parameters of ``blocks[i].layer``):

    * ``G_i = ∇_{W_i} L(W_1, …, W_k; x, y)``: the gradient at step t;
    * ``G'_i = ∇_{W_i} L(W_1 − lr·G_1, …, W_{i−1} − lr·G_{i−1}, W_i, …, W_k; x, y)``: the same
      gradient on the same batch after every parameter of blocks ``1..i−1`` (weights, biases and
      normalization parameters) has taken its plain-SGD step, while block ``i`` and later are unchanged.

    Returns per layer ``l2 = ||G_i − G'_i||_2`` and ``cos = cos(G_i, G'_i)``. Training state is untouched.
    """
    block_params = [list(b.parameters()) for b in blocks]
    all_params = [p for ps in block_params for p in ps]
    with preserved(model):
        _, all_grads = gradients(model, loss_fn, x, y, all_params)
    grad_of = {id(p): g for p, g in zip(all_params, all_grads)}
    l2, cos = [], []
    for i, block in enumerate(blocks):
        weights = list(block.layer.parameters())
        g = flat([grad_of[id(p)] for p in weights])
        with preserved(model):
            with torch.no_grad():
                for ps in block_params[:i]:
                    for p in ps:
                        p.sub_(lr * grad_of[id(p)])
            _, shifted = gradients(model, loss_fn, x, y, weights)
        g2 = flat(shifted)
        l2.append(float((g - g2).norm()))
        cos.append(cosine(g, g2))
    return {"l2": l2, "cos": cos}


def landscape_probe(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                    etas: Sequence[float]) -> dict[str, float | list[float]]:
    """The loss landscape along the gradient (Santurkar et al. 2018, §3.1).

    With ``g = ∇L(θ)`` on the batch and each step size η in ``etas``:

    * loss range ``max_η L(θ − η g) − min_η L(θ − η g)``;
    * gradient predictiveness ``||g − ∇L(θ − η g)||_2``, reported per η and as its max and min;
    * effective β-smoothness ``max_η ||g − ∇L(θ − η g)||_2 / ||η g||_2``.

    All parameters move; the model is evaluated in its current mode and restored afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved(model):
        loss0, g = gradients(model, loss_fn, x, y, params)
    g_flat = flat(g)
    g_norm = float(g_flat.norm())
    losses, diffs, betas = [], [], []
    for eta in etas:
        with preserved(model):
            with torch.no_grad():
                for p, gp in zip(params, g):
                    p.sub_(eta * gp)
            loss, g2 = gradients(model, loss_fn, x, y, params)
        diff = float((g_flat - flat(g2)).norm())
        losses.append(loss)
        diffs.append(diff)
        betas.append(diff / (eta * g_norm) if eta * g_norm > 0 else math.inf)
    finite_or_inf = [v if math.isfinite(v) else math.inf for v in losses]
    return {
        "loss": loss0,
        "losses": losses,
        "grad_diffs": diffs,
        "loss_range": max(finite_or_inf) - min(finite_or_inf),
        "predictiveness_max": max(diffs),
        "predictiveness_min": min(diffs),
        "beta": max(betas),
    }


def relative_loss(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                  step_sizes: Sequence[float]) -> list[float]:
    """Bjorck et al. 2018, Fig. 2: ``L_B(θ − s·∇L_B(θ)) / L_B(θ)`` for each step size ``s``,
    on one mini-batch B. Training state is untouched."""
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved(model):
        loss0, g = gradients(model, loss_fn, x, y, params)
    out = []
    for s in step_sizes:
        with preserved(model), torch.no_grad():
            for p, gp in zip(params, g):
                p.sub_(s * gp)
            out.append(float(loss_fn(model(x), y)) / loss0)
    return out


def percentiles(values: Tensor, qs: Sequence[float] = (15, 50, 85)) -> list[float]:
    """The ``qs``-th percentiles (0–100, linear interpolation) of all entries of ``values``."""
    v = values.detach().reshape(-1).double().cpu().numpy()
    return [float(p) for p in np.percentile(v, list(qs))]


def channel_stats(act: Tensor) -> dict[str, float]:
    """Per-channel statistics of an activation ``(N, C, *)``: for channel c, ``m_c`` and ``s_c`` are
    the mean and standard deviation over samples and positions. Returns the averages over channels
    of ``|m_c|`` and ``s_c``."""
    a = act.detach().transpose(0, 1).reshape(act.shape[1], -1).double()
    return {"abs_mean": float(a.mean(dim=1).abs().mean()), "std": float(a.std(dim=1, correction=0).mean())}


def distribution_shift(means: Sequence[float], stds: Sequence[float]) -> float:
    """How much one unit's distribution moves between consecutive probes, in units of its typical
    spread: ``mean_t (|m_{t+1} − m_t| + |s_{t+1} − s_t|) / mean_t s_t``."""
    m, s = np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
    if len(m) < 2:
        return 0.0
    scale = float(np.mean(s))
    steps = np.abs(np.diff(m)) + np.abs(np.diff(s))
    return float(np.mean(steps) / scale) if scale > 0 else math.inf


def percentile_drift(first: Sequence[float], last: Sequence[float]) -> float:
    """Ioffe & Szegedy's "the distribution moves": ``mean_q |p_q(end) − p_q(start)|`` over the
    tracked percentiles, in the units of the activation."""
    return float(np.mean(np.abs(np.asarray(last, dtype=float) - np.asarray(first, dtype=float))))


def log10_histogram(values: Tensor, edges: Sequence[float]) -> list[int]:
    """Counts of ``log10|v|`` in the bins ``edges`` (zeros count in the lowest bin, values beyond
    the edges in the outermost bins)."""
    v = values.detach().reshape(-1).abs().double().cpu().numpy()
    logs = np.log10(np.maximum(v, 10.0 ** edges[0]))
    logs = np.clip(logs, edges[0], edges[-1])
    counts, _ = np.histogram(logs, bins=np.asarray(edges, dtype=float))
    return [int(c) for c in counts]
