"""Backends of the engine: the same forward and closed-form backward as :mod:`normlab.core.engine`,
computed by kernels that move the data fewer times than a sequence of torch operations.

- :mod:`.dispatch` — which backend runs a call (``NORMLAB_BACKEND=auto|torch|numba|triton``), and why.
- :mod:`.numba` — the CPU backend (:class:`~normlab.kernels.numba.backend.NumbaBackend`) and its numba
  kernels, one module per layout family, compiled on first use and cached on disk.
- :mod:`.triton` — the GPU backend for CUDA tensors, Triton kernels with the same conventions (runtime
  probing, device code, launch heuristics, host class, offline compile for a GPU architecture).
- :mod:`.layout` — how a plan maps onto the kernels' flat views of memory.

Importing this package imports neither numba nor triton nor any kernel.
"""

from normlab.kernels.dispatch import BackendError, available, requested_backend, select

__all__ = ["BackendError", "available", "requested_backend", "select"]
