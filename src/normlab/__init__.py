"""normlab: batch normalization and its family for PyTorch.

- :mod:`normlab.nn` — drop-in layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d)
  and :func:`normlab.nn.convert` to swap them into an existing model.
- :mod:`normlab.functional` — ``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm``.
- :mod:`normlab.reference` — the float64 NumPy reference of every formula.
- :mod:`normlab.core` — the one engine every layer runs on.
- ``normlab lab`` — reproduce the papers' experiments on real data.
"""

__version__ = "0.1.0"
