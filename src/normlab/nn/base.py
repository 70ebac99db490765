"""What normlab's normalization layers with running statistics share: :class:`_NormBase` (BatchNorm,
InstanceNorm and the layers built on BatchNorm) and :class:`_GuardedStats` (also the Lp layers).

Mixed in before the torch.nn class of the layer (``class BatchNorm2d(_BatchNorm, nn.BatchNorm2d)``), so
that constructor arguments, parameters, buffers and ``state_dict`` keys stay torch's.
"""

from __future__ import annotations

import warnings

from normlab.core import checks

__all__: list[str] = []


class _GuardedStats:
    """Guarded running statistics (:mod:`normlab.core.guard`) of a layer: its ``guard_stats`` setting and
    ``num_batches_skipped``, warned about once.

    ``num_batches_skipped`` (an ``int`` attribute, not a buffer, so that ``state_dict`` keys stay
    torch.nn's and checkpoints load both ways with ``strict=True``) counts the training batches whose
    statistics were not finite and so did not update the running statistics. ``state_dict()`` records it
    in the state dict's metadata (``state_dict._metadata[prefix]["num_batches_skipped"]``, next to the
    ``version`` torch keeps there), which ``torch.save``/``torch.load`` and ``load_state_dict`` carry;
    a state dict without it (torch.nn's, or a copy made with a dict comprehension) loads as 0.
    """

    def __init__(self, *args, guard_stats: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if guard_stats is not None and not isinstance(guard_stats, bool):
            raise TypeError(f"{type(self).__name__}: guard_stats must be True, False or None (follow "
                            f"normlab.set_guard_stats), got {guard_stats!r}.")
        self.guard_stats = guard_stats
        self.num_batches_skipped = 0
        self._warned_skip = False

    def _skipped_batch(self, op: str) -> None:
        """Count a batch whose statistics were not finite; warn the first time only."""
        self.num_batches_skipped = getattr(self, "num_batches_skipped", 0) + 1
        if not getattr(self, "_warned_skip", False):
            self._warned_skip = True
            warnings.warn(
                f"{op}: a training batch's mean or variance is not finite (NaN or inf in the input, or values "
                f"that overflowed in float16), so the running statistics and num_batches_tracked were left as "
                f"they were; the output is what the math gives. Such batches are counted in "
                f"num_batches_skipped; this warning is given once per layer. guard_stats=False (or "
                f"normlab.set_guard_stats(False)) restores torch.nn's behaviour.",
                RuntimeWarning, stacklevel=4,
            )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        skipped = getattr(self, "num_batches_skipped", 0)
        metadata = getattr(destination, "_metadata", None)
        if skipped and metadata is not None:
            metadata.setdefault(prefix[:-1], {})["num_batches_skipped"] = skipped

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        self.num_batches_skipped = int(local_metadata.get("num_batches_skipped", 0))


class _NormBase(_GuardedStats):
    """What BatchNorm and InstanceNorm layers share (they also subclass torch's ``_NormBase`` through their
    torch.nn class): eps and momentum checked at construction and per call, guarded running statistics
    (:class:`_GuardedStats`) updated exactly once (:mod:`normlab.nn.once`), ``reset_running_stats``
    clearing the skip count too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_config()

    def _check_config(self) -> None:
        name = type(self).__name__
        checks.check_eps(self.eps, name)
        checks.check_momentum(self.momentum, name, allow_none=True)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.num_batches_skipped = 0
