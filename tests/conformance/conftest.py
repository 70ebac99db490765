"""PyTorch's own tests of its normalization modules and functions, ported to run against either library.

Every test takes the ``impl`` fixture: ``torch`` (torch.nn / torch.nn.functional themselves), or normlab
on its torch engine and on every backend of :data:`normlab.kernels.dispatch.BACKENDS` that runs CPU tensors
here (``normlab-torch``, ``normlab-numba``, ``normlab-triton`` under Triton's interpreter; forced with
NORMLAB_BACKEND): a new backend gets the whole table by its one entry there. A test
that torch itself fails here is marked ``torch_fails(reason)``: strict xfail on the torch implementation,
so it is seen, not hidden. Where normlab differs on purpose (README, "Differences from torch.nn") the test
asserts normlab's documented behaviour, with a comment saying why.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest
import torch

import normlab.functional
import normlab.nn
from normlab.core.plan import batch_plan
from normlab.kernels import available, dispatch

INTERPRETED = {"triton": {"TRITON_INTERPRET": "1"}}
"""The environment a backend needs to run CPU tensors (Triton: its interpreter)."""


def _runs_cpu_tensors(name: str) -> bool:
    """Whether backend ``name`` is installed and can run CPU tensors in this process."""
    if not available(name):
        return False
    env = INTERPRETED.get(name, {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if name == "triton" and "triton" not in sys.modules:
            import triton  # noqa: F401  (its library is built for the interpreter only if imported so)
        return dispatch.BACKENDS[name]().unsupported(torch.zeros(2, 2), batch_plan((2, 2))) is None
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


IMPLS = ["torch", "normlab-torch"] + [f"normlab-{name}" for name in dispatch.BACKENDS if _runs_cpu_tensors(name)]


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation under test: its ``nn`` (the layers) and ``F`` (the functions)."""

    name: str
    nn: types.ModuleType
    F: types.ModuleType

    @property
    def is_torch(self) -> bool:
        return self.name == "torch"

    @property
    def is_normlab(self) -> bool:
        return not self.is_torch

    @staticmethod
    def gradcheck(fn, inputs, **kwargs):
        return gradcheck(fn, inputs, **kwargs)

    @staticmethod
    def gradgradcheck(fn, inputs, grad_outputs=None, **kwargs):
        return gradgradcheck(fn, inputs, grad_outputs, **kwargs)


def gradcheck(fn, inputs, **kwargs):
    """torch.autograd.gradcheck with the defaults of PyTorch's own test harness (batched gradients on,
    fast mode)."""
    kwargs.setdefault("check_batched_grad", True)
    kwargs.setdefault("fast_mode", True)
    return torch.autograd.gradcheck(fn, inputs, **kwargs)


def gradgradcheck(fn, inputs, grad_outputs=None, **kwargs):
    """torch.autograd.gradgradcheck with the defaults of PyTorch's own test harness."""
    kwargs.setdefault("check_batched_grad", True)
    kwargs.setdefault("fast_mode", True)
    return torch.autograd.gradgradcheck(fn, inputs, grad_outputs, **kwargs)


def pytest_configure(config):
    config.addinivalue_line("markers", "torch_fails(reason, strict=True): torch.nn itself fails this port here (strict xfail unless strict=False: a failure that depends on the processor's rounding)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("torch_fails")
        callspec = getattr(item, "callspec", None)
        if marker is not None and callspec is not None and callspec.params.get("impl") == "torch":
            item.add_marker(pytest.mark.xfail(strict=marker.kwargs.get("strict", True), reason=marker.args[0]))


@pytest.fixture(autouse=True)
def _seed():
    """Each test starts from the same random state, as PyTorch's TestCase seeds every test."""
    torch.manual_seed(0)


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> Impl:
    if request.param == "torch":
        monkeypatch.delenv("NORMLAB_BACKEND", raising=False)
        return Impl("torch", torch.nn, torch.nn.functional)
    backend = request.param.split("-", 1)[1]
    monkeypatch.setenv("NORMLAB_BACKEND", backend)
    for key, value in INTERPRETED.get(backend, {}).items():
        monkeypatch.setenv(key, value)
    return Impl(request.param, normlab.nn, normlab.functional)
