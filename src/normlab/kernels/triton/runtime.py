"""Triton at run time: whether it is installed, whether this process runs its kernels on the GPU or under
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), and building the kernels once per process.

Triton is imported on the first build, not before. The kernels are built once per process, for the GPU or
for the interpreter, whichever the first use asked for; the interpreter needs ``TRITON_INTERPRET=1`` set
before triton is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading

__all__ = ["KERNELS", "built_for", "installed", "interpreter_problem", "gpu_problem", "kernels"]

KERNELS: dict = {}
"""Every jitted Triton function by name, once built (:func:`kernels`), and ``"tl"``, triton.language; the
host code launches ``KERNELS[name][grid](...)``."""
_DEVICE_MODULES = ("normlab.kernels.triton.device", "normlab.kernels.triton.device_backward")
_built = {"interpret": None}
_build_lock = threading.Lock()



@functools.cache
def installed() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_problem() -> str | None:
    """Why CPU tensors cannot run under Triton's interpreter in this process, or ``None``.

    Triton builds its own library functions (``tl.sum``, ``tl.cdiv``, ...) when it is imported, for the
    interpreter only if ``TRITON_INTERPRET=1`` is set then; this module builds its kernels on first use.
    """
    if not _interpret_requested():
        return "CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1"
    if _built["interpret"] is False:
        return "this process built the triton kernels for the GPU before TRITON_INTERPRET=1 was set"
    if _library_interpreted() is False:
        return "triton was imported before TRITON_INTERPRET=1 was set, so its library runs on the GPU only"
    return None


def _library_interpreted() -> bool | None:
    """Whether triton's own library functions (``tl.cdiv``, ...) were built for the interpreter when it was
    imported; ``None`` before it is imported."""
    triton = sys.modules.get("triton")
    if triton is None:
        return None
    return type(triton.language.standard.cdiv).__name__ == "InterpretedFunction"


def gpu_problem() -> str | None:
    """Why CUDA tensors cannot run compiled kernels in this process, or ``None``: where the kernels were (or
    would now be) built for Triton's interpreter, which would copy every tensor to the host and back at
    every launch."""
    if _built["interpret"] or (_built["interpret"] is None and _interpret_requested()):
        return ("TRITON_INTERPRET=1: this process builds the triton kernels for Triton's interpreter, which "
                "would run CUDA tensors on the host; unset TRITON_INTERPRET to run them on the GPU")
    if _library_interpreted():
        return ("triton was imported with TRITON_INTERPRET=1, so its library runs under the interpreter only; "
                "start a process without it to run CUDA tensors on the GPU")
    return None


def built_for() -> str | None:
    """What this process's kernels were built for: ``"interpreter"``, ``"gpu"``, or ``None`` before their
    first use."""
    mode = _built["interpret"]
    return None if mode is None else "interpreter" if mode else "gpu"


def kernels() -> dict:
    """Import triton and jit every Triton function of the device modules, once per process: :data:`KERNELS`.

    Each function is jitted once and rebound under its name in every device module that names it, so that
    a kernel calling a helper of another module finds the jitted helper."""
    with _build_lock:
        if _built["interpret"] is None:
            import importlib

            import triton
            import triton.language

            KERNELS["tl"] = triton.language
            modules = [importlib.import_module(name) for name in _DEVICE_MODULES]
            registry = modules[0].JIT
            for module_name, name in registry:
                KERNELS[name] = triton.jit(getattr(sys.modules[module_name], name))
            for module in modules:
                module.tl = triton.language
                for name, fn in KERNELS.items():
                    if name in vars(module):
                        setattr(module, name, fn)
            _built["interpret"] = _interpret_requested()
    return KERNELS
