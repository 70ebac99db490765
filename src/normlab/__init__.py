"""normlab: batch normalization and its family for PyTorch.

- :mod:`normlab.nn` — drop-in layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d),
  :func:`normlab.nn.convert` to swap them into an existing model, and FrozenBatchNorm1d/2d/3d.
- :mod:`normlab.functional` — ``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm``.
- :mod:`normlab.reference` — the float64 NumPy reference of every formula.
- :mod:`normlab.core` — the one engine every layer runs on.
- after training: :func:`precise_bn` and :func:`adapt_bn` (population statistics, AdaBN),
  :func:`freeze_bn`/:func:`unfreeze_bn` (fine-tuning), :func:`fold` (BN folded into convolutions).
- ``normlab lab`` — reproduce the papers' experiments on real data; ``normlab fold`` — fold a model file.
"""

__version__ = "0.1.0"

# Imported on first use, so that ``import normlab`` (and the command line) stays light.
_LAZY = {
    "precise_bn": "normlab.population",
    "adapt_bn": "normlab.population",
    "freeze_bn": "normlab.freeze",
    "unfreeze_bn": "normlab.freeze",
    "fold": "normlab.folding",
    "FoldReport": "normlab.folding",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
