"""Which backend runs a normalization: chosen per call by device, dtype, layout and plan.

``NORMLAB_BACKEND`` (read at every call, so tests and users can change it at run time):

* ``auto`` (default) — per case, the backend measured fastest among those that keep the engine's
  precision (below), else the torch engine;
* ``torch`` — always the engine's own torch operations (:mod:`normlab.core.engine`);
* ``numba`` — always the numba CPU kernels (:mod:`normlab.kernels.numba`); a case they cannot
  run raises :class:`BackendError` instead of falling back;
* ``triton`` — always the Triton kernels (:mod:`normlab.kernels.triton`): CUDA tensors, or CPU
  tensors under Triton's interpreter (``TRITON_INTERPRET=1``); a case they cannot run raises
  :class:`BackendError`.

A backend implements :class:`normlab.core.backend.Backend`; :func:`select` returns ``None`` for the torch
engine. The core never chooses: :mod:`normlab.functional` asks :func:`backend_for` (or :func:`select`)
and passes the answer to the engine.

What ``auto`` picks (the measurements behind each rule: benchmarks/README.md, "Backend choice"):

* CPU tensors of every dtype the kernels take (float16/bfloat16 computed in float32), every plan they
  handle, any size, train and eval: **numba**. It beats the torch engine on every size, and is never
  swapped for ATen where ATen is faster, because ATen's CPU kernels lose the variance of data with a large
  mean and a tiny spread: routing by shape would make that guarantee depend on the shape.
* Plans the kernels do not handle, tensors on other devices, other dtypes: **torch**.
* While ``torch.compile`` or ``torch.export`` traces (``torch.compiler.is_compiling()``), whatever
  ``NORMLAB_BACKEND`` says: **torch** (the tracer records the engine's torch operations; foreign kernels
  are opaque to it).
* CUDA tensors: **triton** (:mod:`normlab.kernels.triton`) when triton is installed, the backend handles
  the case and the process does not build its kernels for Triton's interpreter; else the torch engine.
  Not yet timed on a GPU, so no size threshold sends small cases elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from normlab.core.backend import Backend
from normlab.core.plan import Plan

__all__ = ["BACKENDS", "BackendError", "ENV", "requested_backend", "select", "backend_for", "available"]

ENV = "NORMLAB_BACKEND"


class BackendError(RuntimeError):
    """A forced backend (``NORMLAB_BACKEND``) cannot run the case it was given."""


@functools.cache
def _numba_backend():
    from normlab.kernels.numba.backend import NumbaBackend

    return NumbaBackend()


@functools.cache
def _triton_backend():
    from normlab.kernels.triton import TritonBackend

    return TritonBackend()


BACKENDS = {
    "numba": _numba_backend,
    "triton": _triton_backend,
}
"""Backend constructors by name (each builds its backend once, on first use): a new backend is one entry
here (and its package in :func:`available`); the conformance tests then run it too."""
CHOICES = ("auto", "torch", *BACKENDS)


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


_transforms_active = torch._C._are_functorch_transforms_active


def backend_for(x: torch.Tensor, plan: Plan, batch_stats: bool = True) -> Backend | None:
    """The backend that runs one engine call: ``None`` (the torch engine) while a ``torch.func`` transform
    is active, whose own rules then apply to the engine's torch operations; else :func:`select`'s."""
    if _transforms_active():  # normlab.core.engine.composes(), inline: this runs at every call
        return None
    return select(x, plan, batch_stats)


def select(x: torch.Tensor, plan: Plan, batch_stats: bool = True) -> Backend | None:
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
