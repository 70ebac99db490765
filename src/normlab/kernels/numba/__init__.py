"""The CPU backend: numba kernels for the engine's forward and closed-form backward.

- :mod:`.backend` — :class:`~.backend.NumbaBackend`: tensors in, tensors out, on NumPy views of their
  memory; the fused single-call path and the statistics seam (partial moments → combine → apply).
- :mod:`.primitives` — compile flags, the per-value formulas (each written once, inlined into every
  loop), sums over one run, the per-statistic constants.
- :mod:`.runs` — maps over one contiguous run, with ordinary or streaming stores.
- :mod:`.channel` — BatchNorm's per-channel step between its passes (and the seam's).
- :mod:`.planar` — BatchNorm on channel-contiguous (N, C, S) data.
- :mod:`.columns` — (M, C) rows with C contiguous: BatchNorm on 2D and channels_last data, GroupNorm and
  InstanceNorm on channels_last data.
- :mod:`.rows` — GroupNorm, InstanceNorm and LayerNorm on contiguous (R, K) rows.
- :mod:`.stream` — streaming (non-temporal) stores; :mod:`.buffers` — recycled output memory.

The layout vocabulary (:class:`~normlab.kernels.layout.ChannelShape`, :class:`~normlab.kernels.layout.RowShape`)
is :mod:`normlab.kernels.layout`'s. Importing this package imports neither numba nor any kernel.
"""
