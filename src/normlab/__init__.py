"""normlab: batch normalization and its family for PyTorch.

- :mod:`normlab.nn` — drop-in layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d)
  and :func:`normlab.nn.convert` to swap them into an existing model.
- :func:`normlab.convert_sync_batchnorm` / :func:`normlab.revert_sync_batchnorm` — swap a model's
  BatchNorm layers for :class:`normlab.nn.SyncBatchNorm` (statistics over every process) and back.
- :mod:`normlab.functional` — ``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm``.
- :mod:`normlab.reference` — the float64 NumPy reference of every formula.
- :mod:`normlab.core` — the one engine every layer runs on.
- ``normlab lab`` — reproduce the papers' experiments on real data.
"""

__version__ = "0.1.0"

_LAZY = {"convert_sync_batchnorm": "normlab.nn.convert", "revert_sync_batchnorm": "normlab.nn.convert"}


def __getattr__(name: str):
    """``normlab.convert_sync_batchnorm`` and ``normlab.revert_sync_batchnorm``, imported on first use so
    that ``import normlab`` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
