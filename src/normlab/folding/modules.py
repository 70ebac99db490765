"""Folding by module patterns, for models torch.fx cannot trace (data-dependent control flow, ...).

Two patterns are recognised without a graph:

- **Sequential chains**: a BN that follows a Conv/ConvTranspose/Linear in an ``nn.Sequential`` folds into
  it (or, by the rules of :func:`~normlab.folding.affine.before_reason`, into the layer after it), since a
  Sequential feeds each child's output to the next and to nothing else;
- **named attribute pairs**: ``bn1``/``conv1``, ``bn``/``conv``, ``norm``/``conv`` (``bn`` or ``norm``
  in the BN's name replaced by ``conv``, ``fc`` or ``linear``), folded only when a run on the example
  inputs shows each called once with the BN reading the layer's very output tensor. The caller checks
  the folded model's output against the original's and refolds without these pairs when they differ (a
  layer output can still be read by something else).

In both, a layer whose module appears more than once in the model (shared) is never folded into.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from normlab.folding import affine as A

__all__ = ["fold_modules", "confirmed_pairs"]

_PAIR_NAMES = (("bn", "conv"), ("norm", "conv"), ("bn", "fc"), ("bn", "linear"))


def _candidates(name: str) -> list[str]:
    return [name.replace(old, new) for old, new in _PAIR_NAMES if old in name]


@torch.no_grad()
def confirmed_pairs(model: nn.Module, example_inputs: tuple) -> set[tuple[int, int]]:
    """``(id(layer), id(bn))`` for the layer/BN pairs seen, on one run of ``example_inputs``, each
    called once with the BN reading the layer's output tensor itself."""
    outputs: dict[int, list] = {}
    inputs: dict[int, list] = {}
    handles = []
    for m in model.modules():
        if isinstance(m, A.FOLDABLE):
            handles.append(m.register_forward_hook(lambda mod, args, out: outputs.setdefault(id(mod), []).append(out)))
        elif A.bn_like(m):
            handles.append(m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(id(mod), []).append(args[0])))
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    pairs = set()
    for layer_id, outs in outputs.items():
        for bn_id, ins in inputs.items():
            if len(outs) == 1 and len(ins) == 1 and outs[0] is ins[0]:
                pairs.add((layer_id, bn_id))
    return pairs


def fold_modules(model: nn.Module, pairs: set[tuple[int, int]] | None):
    """Fold ``model``'s BN layers in place by the patterns above; ``pairs`` as from
    :func:`confirmed_pairs` (``None``: no named pairs are folded). Returns ``(model, folded, unfolded)``."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    names = {id(m): n for n, m in model.named_modules()}
    folded: list[tuple[str, str, str]] = []
    unfolded: list[tuple[str, str]] = []

    def free(layer) -> bool:
        return uses[id(layer)] == 1 and all(owners[id(p)] == 1 for p in layer.parameters(recurse=False))

    for parent_name, parent in list(model.named_modules()):
        children = list(parent._modules.items())
        for i, (child_name, bn) in enumerate(children):
            if bn is None or not A.bn_like(bn) or names.get(id(bn)) != _join(parent_name, child_name):
                continue
            name = _join(parent_name, child_name)
            reason = A.not_affine_reason(bn)
            if reason is not None:
                unfolded.append((name, reason + "; left as it is"))
                continue
            if uses[id(bn)] > 1:
                why = "it is used in several places (shared)"
            elif isinstance(parent, nn.Sequential):
                why = _fold_in_sequence(parent, children, i, bn, name, parent_name, free, folded)
            else:
                why = _fold_named_pair(parent, child_name, bn, name, parent_name, pairs, free, folded)
            if why is None:
                setattr(parent, child_name, nn.Identity())
            else:
                setattr(parent, child_name, A.eval_affine(bn))
                unfolded.append((name, why + "; replaced by its affine map"))
    return model, folded, unfolded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fold_in_sequence(parent, children, i, bn, name, parent_name, free, folded) -> str | None:
    prev = children[i - 1][1] if i > 0 else None
    nxt = children[i + 1][1] if i + 1 < len(children) else None
    why_after = "it is the first of its Sequential" if prev is None else A.after_reason(prev, bn)
    if why_after is None and not free(prev):
        why_after = f"'{_join(parent_name, children[i - 1][0])}' is shared"
    if why_after is None:
        A.fold_after(prev, bn)
        folded.append((name, _join(parent_name, children[i - 1][0]), "after"))
        return None
    why_before = "it is the last of its Sequential" if nxt is None else A.before_reason(bn, nxt)
    if why_before is None and not free(nxt):
        why_before = f"'{_join(parent_name, children[i + 1][0])}' is shared"
    if why_before is None:
        A.fold_before(bn, nxt)
        folded.append((name, _join(parent_name, children[i + 1][0]), "before"))
        return None
    return f"after: {why_after}; before: {why_before}"


def _fold_named_pair(parent, child_name, bn, name, parent_name, pairs, free, folded) -> str | None:
    layer_name = next((c for c in _candidates(child_name) if isinstance(parent._modules.get(c), A.FOLDABLE)), None)
    if layer_name is None:
        return "the model does not trace with torch.fx and the layer is neither in a Sequential nor named as a pair"
    layer = parent._modules[layer_name]
    full = _join(parent_name, layer_name)
    if pairs is None:
        return f"'{full}' looks like its convolution; pass example_inputs to confirm the pair and fold it"
    why = A.after_reason(layer, bn)
    if why is None and not free(layer):
        why = f"'{full}' is shared"
    if why is None and (id(layer), id(bn)) not in pairs:
        why = f"a run on the example inputs did not show it reading the output of '{full}' alone"
    if why is not None:
        return why
    A.fold_after(layer, bn)
    folded.append((name, full, "after"))
    return None
