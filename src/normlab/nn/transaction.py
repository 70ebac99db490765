"""Transactional running statistics: one training step's updates are kept only if the optimizer steps.

With mixed precision, :class:`torch.amp.GradScaler` skips the optimizer step whenever the scaled
gradients hold an inf or a NaN, but the forward pass has already moved every BatchNorm's running
statistics with the batch that overflowed. :class:`stat_guard` snapshots the statistics of a model's
normalization layers on entry and, on exit, keeps them if an optimizer step ran inside the block and
restores them exactly otherwise::

    with normlab.stat_guard(model, optimizer):
        ...forward, scaler.scale(loss).backward(), scaler.step(optimizer), scaler.update()...

How a skipped step is detected: the optimizer's own step hooks
(:meth:`torch.optim.Optimizer.register_step_post_hook`, public API), which run only when
``optimizer.step()`` does. ``GradScaler.step`` skips a step by not calling ``optimizer.step()`` at all, so
the hook sees exactly the steps that happened, with any scaler (or none, or any other code that decides
not to step), without reading the scaler's private state (``_found_inf_per_device``) or guessing from
the scale. Without an ``optimizer`` argument any optimizer's step counts
(:func:`torch.optim.optimizer.register_optimizer_step_post_hook`). An exception inside the block rolls
back too, then propagates.

What is snapshotted: every buffer (``running_mean``, ``running_var``, ``num_batches_tracked``, and the
running scale of the ℓp layers) of every module that is a :class:`torch.nn.modules.batchnorm._NormBase`
(torch.nn's and normlab's BatchNorm, SyncBatchNorm, InstanceNorm with running statistics, and layers
derived from them) or has a ``running_mean`` buffer. ``num_batches_skipped`` (a count of what happened,
not state) is not rolled back.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["stat_guard", "running_buffers"]


def running_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers holding ``model``'s running statistics, in module order: every buffer of each
    normalization module (see the module docstring)."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(
                getattr(module, "running_mean", None), torch.Tensor):
            found.extend(b for b in module.buffers(recurse=False) if b is not None)
    return found


class stat_guard:
    """Context manager: ``model``'s running statistics change inside the block only if an optimizer step
    (of ``optimizer``, or of any optimizer when it is ``None``) runs in it; otherwise they are restored
    exactly on exit. ``committed`` tells, after the block, which it was.

    >>> import torch, normlab, normlab.nn as nl
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), nl.BatchNorm1d(4))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with normlab.stat_guard(model, opt) as guard:
    ...     model(torch.randn(8, 3)).sum().backward()      # no opt.step(): the step is rolled back
    >>> guard.committed, int(model[1].num_batches_tracked)
    (False, 0)

    Also a decorator of a step function (each call is one transaction).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.committed = False
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hook = None

    def _stepped(self, *args) -> None:
        self.committed = True

    def __enter__(self) -> stat_guard:
        self.committed = False
        with torch.no_grad():
            self._snapshot = [(b, b.detach().clone()) for b in running_buffers(self.model)]
        if self.optimizer is None:
            self._hook = register_optimizer_step_post_hook(self._stepped)
        else:
            self._hook = self.optimizer.register_step_post_hook(self._stepped)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._hook.remove()
        if exc_type is not None:
            self.committed = False
        if not self.committed:
            with torch.no_grad():
                for buffer, saved in self._snapshot:
                    buffer.copy_(saved)
        self._snapshot = []

    def __call__(self, fn):
        def step(*args, **kwargs):
            with stat_guard(self.model, self.optimizer):
                return fn(*args, **kwargs)

        step.__wrapped__ = fn
        step.__name__ = getattr(fn, "__name__", "step")
        step.__doc__ = fn.__doc__
        return step
