"""Exactly-once running-statistics updates: under activation checkpointing, and for a module run several
times in one step.

Checkpointing (:func:`torch.utils.checkpoint.checkpoint`, ``use_reentrant=True`` or ``False``) runs a
segment's forward once, then again during the backward pass to rebuild what it did not save. torch.nn's
BatchNorm updates its running statistics on both runs, so a checkpointed model's statistics drift from
the plain model's (momentum applied twice per step, ``num_batches_tracked`` counting double). normlab's
layers do not update them on the recomputation: a training forward that runs while autograd's engine is
executing a backward pass (``torch._C._current_graph_task_id() != -1``, the test torch's own
non-reentrant checkpoint uses to tell a recomputation) normalizes with the batch's statistics, as the
first run did, and leaves the running statistics and ``num_batches_tracked`` alone. Both checkpoint
modes recompute inside the backward pass, so both are covered; a model whose forward is deliberately
run from inside a backward hook is treated the same way.

Several calls in one step (siamese branches, multiple crops): inside :class:`update_once`, each layer
updates its running statistics on its **first** training call only; the later calls normalize with
their own batch's statistics and update nothing. Pass the crop that should set the statistics first.

While ``torch.compile`` or ``torch.export`` traces, neither applies (every training call updates, as in
torch.nn).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["in_recomputation", "may_update", "update_once"]

_SCOPES: list[update_once] = []


def in_recomputation() -> bool:
    """Whether this forward runs during a backward pass: the recomputation of a checkpointed segment."""
    return torch._C._current_graph_task_id() != -1


def may_update(module: nn.Module) -> bool:
    """Whether ``module``'s training call may update its running statistics now: not while a checkpointed
    segment is recomputed, and once only per module inside :class:`update_once`. A call that may claims
    the module's one update in the innermost :class:`update_once`."""
    if torch.compiler.is_compiling():
        return True
    if in_recomputation():
        return False
    if not _SCOPES:
        return True
    seen = _SCOPES[-1].updated
    if id(module) in seen:
        return False
    seen.add(id(module))
    return True


class update_once:
    """Context manager: inside it, each normlab layer updates its running statistics (and counts
    ``num_batches_tracked``) on its first training call only.

    >>> import torch, normlab, normlab.nn as nl
    >>> bn = nl.BatchNorm1d(3)
    >>> with normlab.update_once():
    ...     a, b = bn(torch.randn(8, 3)), bn(torch.randn(8, 3))   # only the first batch updates bn
    >>> int(bn.num_batches_tracked)
    1

    Usable as a decorator of a training step too. Nested contexts each start afresh.
    """

    def __init__(self) -> None:
        self.updated: set[int] = set()

    def __enter__(self) -> update_once:
        self.updated = set()
        _SCOPES.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _SCOPES.remove(self)

    def __call__(self, fn):
        def step(*args, **kwargs):
            with update_once():
                return fn(*args, **kwargs)

        step.__wrapped__ = fn
        step.__doc__ = fn.__doc__
        step.__name__ = getattr(fn, "__name__", "step")
        return step
