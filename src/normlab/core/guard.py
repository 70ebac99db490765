"""Guarded running statistics: a batch whose statistics are not finite does not update them.

One batch holding a NaN, an inf, or float16 values that overflowed upstream gives a NaN or infinite
mean or variance, and ``running = (1 − momentum) · running + momentum · batch`` then stays NaN or
infinite for good: every later evaluation of the model is wrong. With the guard on (the default), the
update is skipped as a whole when any channel's batch mean or unbiased variance, rounded to the running
statistics' dtype, is not finite: no channel is updated (a partial update would leave the channels
averaged over different batches), and the layers do not count the batch in ``num_batches_tracked``.
The batch's output is not touched: it is what the math gives (NaN propagates as in torch.nn).

The decision needs the statistics on the host: free on the CPU kernels (they check as they finish each
channel), one device synchronization per layer call on the torch engine's
path for CUDA tensors (``guard_stats=False`` removes it). While ``torch.compile`` or ``torch.export``
traces a model, and under a ``torch.func`` transform (``vmap`` with batched running statistics), the guard
is off: the skip would be a data-dependent branch, which neither can express.

The switch, in order of precedence: a layer's ``guard_stats`` attribute (``True``/``False``; ``None``,
the default, follows the global setting), then the global setting :class:`set_guard_stats` (on by
default), which also governs :mod:`normlab.functional`.
"""

from __future__ import annotations

import torch

__all__ = ["RunningUpdate", "set_guard_stats", "guard_stats_enabled", "finite_statistics"]

_ENABLED = [True]


class RunningUpdate(tuple):
    """``(running_mean, running_var, momentum)`` as the engine takes them, plus ``guarded`` (skip a batch
    whose statistics are not finite), ``unbiased`` (store the unbiased batch variance, torch's convention;
    ``False``: the biased one, Keras' and Flax's) and ``skipped``, set by whichever code would have updated
    them when it skipped the batch. A tuple, so code that indexes or unpacks the plain triple works
    unchanged."""

    def __new__(cls, mean: torch.Tensor, var: torch.Tensor, momentum: float, guarded: bool, unbiased: bool = True):
        self = super().__new__(cls, (mean, var, momentum))
        self.guarded = guarded
        self.unbiased = unbiased
        self.skipped = False
        return self


class set_guard_stats:
    """Turn the guard on or off for every layer whose ``guard_stats`` is ``None`` and for
    :mod:`normlab.functional`; like :class:`torch.set_grad_enabled`, a function call or a context manager
    that restores the previous setting on exit.

    >>> import normlab
    >>> with normlab.set_guard_stats(False):   # torch.nn's behaviour: NaN reaches the running statistics
    ...     pass
    """

    def __init__(self, mode: bool) -> None:
        if not isinstance(mode, bool):
            raise TypeError(f"set_guard_stats: mode must be True or False, got {mode!r}.")
        self.prev = _ENABLED[0]
        _ENABLED[0] = mode

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        _ENABLED[0] = self.prev


def guard_stats_enabled(layer_setting: bool | None = None) -> bool:
    """Whether a call is guarded: ``layer_setting`` if it is ``True``/``False``, else the global setting.
    Never while ``torch.compile`` or ``torch.export`` traces, nor under a ``torch.func`` transform: the decision
    would be a data-dependent branch."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return _ENABLED[0] if layer_setting is None else bool(layer_setting)


def finite_statistics(mean: torch.Tensor, var: torch.Tensor) -> bool:
    """Whether every value of the batch statistics about to be written (already in the running
    statistics' dtype) is finite."""
    return bool(torch.isfinite(mean).all() & torch.isfinite(var).all())
