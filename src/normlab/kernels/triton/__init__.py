"""The GPU backend: Triton kernels with the engine's conventions, for CUDA tensors (and CPU tensors under
Triton's interpreter, ``TRITON_INTERPRET=1``, which the tests use).

- :mod:`.runtime` — is triton installed, GPU or interpreter, building the kernels once per process;
- :mod:`.device`, :mod:`.device_backward` — the ``@jit`` device code (statistics and normalizing; backward);
- :mod:`.launch` — tiles, splits and warps, and how a call's tensors are laid out for the kernels;
- :mod:`.backend` — :class:`TritonBackend`, the host code that launches them;
- :mod:`.seam` — its statistics seam (partial moments → the caller's combine → apply) on the same passes;
- :mod:`.compile` — every kernel specialization compiled for a GPU architecture on a machine without one.

Importing this package does not import triton.
"""

from normlab.kernels.triton.backend import TritonBackend
from normlab.kernels.triton.runtime import built_for, installed

__all__ = ["TritonBackend", "built_for", "installed"]
