"""normlab: batch normalization and its family for PyTorch.

- :mod:`normlab.nn` — drop-in layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d)
  and :func:`normlab.nn.convert` to swap them into an existing model.
- :func:`normlab.convert_sync_batchnorm` / :func:`normlab.revert_sync_batchnorm` — swap a model's
  BatchNorm layers for :class:`normlab.nn.SyncBatchNorm` (statistics over every process) and back.
- :mod:`normlab.functional` — ``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm``.
- :mod:`normlab.reference` — the float64 NumPy reference of every formula.
- :mod:`normlab.core` — the one engine every layer runs on.
- after training: :func:`precise_bn` and :func:`adapt_bn` (population statistics, AdaBN),
  :func:`freeze_bn`/:func:`unfreeze_bn` (fine-tuning), :func:`fold` (BN folded into convolutions).
- ``normlab lab`` — reproduce the papers' experiments on real data; ``normlab fold`` — fold a model file.

Training safety, importable from here: :class:`set_guard_stats` (batches with non-finite statistics do
not update running statistics, :mod:`normlab.core.guard`), :class:`stat_guard` (roll back a step's
running statistics when the optimizer does not step, :mod:`normlab.nn.transaction`), :class:`update_once`
(one update per layer per step, :mod:`normlab.nn.once`), :func:`inspect` (a health table of the
normalization layers, :mod:`normlab.health`; also ``normlab inspect``).
"""

__version__ = "0.1.0"

_LAZY = {
    "set_guard_stats": "normlab.core.guard",
    "stat_guard": "normlab.nn.transaction",
    "update_once": "normlab.nn.once",
    "inspect": "normlab.health.checks",
    "convert_sync_batchnorm": "normlab.nn.convert",
    "revert_sync_batchnorm": "normlab.nn.convert",
    "precise_bn": "normlab.population",
    "adapt_bn": "normlab.population",
    "freeze_bn": "normlab.freeze",
    "unfreeze_bn": "normlab.freeze",
    "fold": "normlab.folding",
    "FoldReport": "normlab.folding",
}

_SUBMODULES = ("nn", "functional", "core", "kernels", "lab", "bench", "health", "folding")
"""Subpackages reachable as attributes after a plain ``import normlab`` (``normlab.nn.BatchNorm2d``), as in torch."""


def __getattr__(name: str):
    """The training-safety and after-training tools and the subpackages, imported on first use so that
    ``import normlab`` stays light."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"normlab.{name}")
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")


__all__ = sorted(_LAZY)
