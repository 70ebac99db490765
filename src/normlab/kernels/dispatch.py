"""Which backend runs a normalization: chosen per call by device, dtype, layout and plan.

``NORMLAB_BACKEND`` (read at every call, so tests and users can change it at run time):

* ``auto`` (default) — per case, the backend measured fastest among those that keep the engine's
  precision (below), else the torch engine;
* ``torch`` — always the engine's own torch operations (:mod:`normlab.core.engine`);
* ``numba`` — always the numba CPU kernels (:mod:`normlab.kernels.numba_backend`); a case they cannot
  run raises :class:`BackendError` instead of falling back;
* ``triton`` — always the Triton kernels (:mod:`normlab.kernels.triton_backend`): CUDA tensors, or CPU
  tensors under Triton's interpreter (``TRITON_INTERPRET=1``); a case they cannot run raises
  :class:`BackendError`.

A backend is an object with ``unsupported(x, plan) -> str | None`` (why it cannot run a case),
``forward`` and ``backward`` with the signatures of :class:`~normlab.kernels.numba_backend.NumbaBackend`.
:func:`select` returns ``None`` for the torch engine.

What ``auto`` picks, and why (measured with ``normlab bench`` and per-kernel timings on the 2-core
development machine, torch 2.13, float32, 2 threads; see benchmarks/README.md for the table):

* CPU tensors in float32/float64 (float16/bfloat16 converted to float32 and back, as the torch engine
  converts them), every plan the kernels handle, of every size, train and eval: **numba**. Against the
  torch engine the kernels win by more the larger the input: its separate operations move the data five
  to eight times and allocate as many temporaries (BatchNorm2d (64, 64, 8, 8) eval: 205–222 µs against
  70 µs), and even on the smallest inputs the kernels' per-call set-up costs less than those operations
  (BatchNorm2d (8, 16, 4, 4) eval: 37–40 µs against 43–45 µs).
* Against ATen's own kernels (``torch.nn.functional``), which ``auto`` could route a case to: the kernels
  are faster on every large case, where writing into recycled memory (:mod:`.buffers`) instead of fresh
  pages matters as much as the fewer passes (BatchNorm2d train forward 3.2–6.7x, eval 4.3–4.9x, LayerNorm
  (64, 196, 768) forward+backward 2.85x; medians of three ``normlab bench`` runs). On small and mid-sized
  tensors that stay in cache the kernels still win where ATen's statistics pass is slow (contiguous
  (32, 512, 7, 7) training forward 3.4x), and elsewhere the two are close or ATen is faster (channels_last
  (32, 512, 7, 7) 0.95–1.04x, contiguous (32, 512, 7, 7) eval 1.03x, BatchNorm1d (4096, 1024) eval 0.74x,
  GroupNorm on 7x7 maps 0.56–0.87x): normlab's Python per call (35–66 µs on a tiny input against ATen's
  14–26 µs) against ATen's extra passes over memory.
  Those cases still go to **numba**, not to ATen: ATen's CPU kernels do not keep the variance of data
  with a large mean and a tiny spread (1e4 + N(0, 1e-2) in float32, shape (64, 32, 16, 16), normalizes
  with errors of 0.04 for BatchNorm, 0.09 for LayerNorm, 0.16 for GroupNorm(8) and 11 — E[x²] − E[x]² —
  for channels_last GroupNorm(8), against at most 4e-7 for normlab's kernels), and in eval, folding the
  mean into a float32 offset (x · a + b), ATen is off by 0.03 where normlab, subtracting the running mean
  first, is off by 2e-7 (running mean 1e4 + N(0, 1e-3), running variance 1e-4 to 2e-4). Routing by shape
  would make that guarantee depend on the shape.
* Plans the kernels do not handle, tensors on other devices, other dtypes: **torch**.
* While ``torch.compile`` or ``torch.export`` traces a model (``torch.compiler.is_compiling()``), whatever
  ``NORMLAB_BACKEND`` says: **torch**. The tracer records the engine's torch operations (same formulas,
  same shifted statistics) and its backend generates code for them; numba's and Triton's launches are
  opaque to it.
* CUDA tensors: **triton** (:mod:`normlab.kernels.triton_backend`) when triton is installed and the
  backend handles the case (float32/float64/float16/bfloat16, every plan the kernels handle, train and
  eval alike) and the process does not build its kernels for Triton's interpreter (``TRITON_INTERPRET=1``,
  which would copy the tensors to the host at every launch), else the torch engine. Its kernels keep the
  engine's precision guarantees (statistics of ``x − shift``, merged Welford partials). They have not been
  timed on a GPU yet, against the torch engine or ATen, so no size threshold sends small cases elsewhere
  as it does on CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # normlab.core imports this module: no import back at run time
    from normlab.core.plan import Plan

__all__ = ["BACKENDS", "BackendError", "ENV", "requested_backend", "select", "available"]

ENV = "NORMLAB_BACKEND"
CHOICES = ("auto", "torch", "numba", "triton")


class BackendError(RuntimeError):
    """A forced backend (``NORMLAB_BACKEND``) cannot run the case it was given."""


@functools.cache
def _numba_backend():
    from normlab.kernels.numba.backend import NumbaBackend

    return NumbaBackend()


@functools.cache
def _triton_backend():
    from normlab.kernels.triton_backend import TritonBackend

    return TritonBackend()


BACKENDS = {
    "numba": _numba_backend,
    "triton": _triton_backend,
}
"""Backend constructors by name (each builds its backend once, on first use)."""


@functools.cache
def available(name: str) -> bool:
    """Whether backend ``name`` can be used in this installation (numba importable, ...)."""
    if name == "torch":
        return True
    if name == "numba":
        return importlib.util.find_spec("numba") is not None
    if name == "triton":
        return importlib.util.find_spec("triton") is not None
    return False


def requested_backend() -> str:
    """The value of ``NORMLAB_BACKEND`` (``auto`` when unset), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise BackendError(f"{ENV}={value!r} is not a backend; choose one of {', '.join(CHOICES)}.")
    return value


def select(x: torch.Tensor, plan: Plan, batch_stats: bool = True):
    """The backend for normalizing ``x`` with ``plan`` (with statistics of the batch, or fixed ones:
    ``batch_stats``, which no current choice depends on), or ``None`` for the torch engine."""
    if torch.compiler.is_compiling():
        return None  # torch.compile / torch.export trace the engine's torch operations, not foreign kernels
    choice = requested_backend()
    if choice == "torch":
        return None
    if choice == "auto":
        if x.is_cuda:
            if not available("triton"):
                return None
            backend = _triton_backend()
            return None if backend.unsupported(x, plan) else backend
        if not available("numba"):
            return None
        backend = _numba_backend()
        return None if backend.unsupported(x, plan) else backend
    if not available(choice):
        raise BackendError(f"{ENV}={choice}, but {choice} is not installed (pip install {choice}).")
    backend = BACKENDS[choice]()
    reason = backend.unsupported(x, plan)
    if reason is not None:
        raise BackendError(f"{ENV}={choice}: {reason}. Set {ENV}=auto to let normlab choose, or torch.")
    return backend
