import sys
from pathlib import Path

import pytest
import torch

from normlab.core.plan import batch_plan
from normlab.kernels import available, dispatch

sys.path.insert(0, str(Path(__file__).parent))  # kernel_cases.py: the cases every backend's tests share


def run_kernel_case(case, backend, monkeypatch, dtype=torch.float64, need=(True, True, True)):
    """Forward and backward of one kernel test case, ``(fn, shape, parameter count, memory format)``, on
    ``backend`` (forced with NORMLAB_BACKEND): the output and the gradients of (x, weight, bias), each
    None where ``need`` asks for none. The data are the same for every backend (fixed seed)."""
    fn, shape, pcount, fmt = case
    monkeypatch.setenv("NORMLAB_BACKEND", backend)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(pcount, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(pcount, generator=gen, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x, w, b = (t.clone().requires_grad_(r) for t, r in zip((x, w, b), need))
    y = fn(x, w, b)
    y.backward(dy)
    return y, [t.grad for t in (x, w, b)]


@pytest.fixture
def run_case(monkeypatch):
    """:func:`run_kernel_case` with this test's monkeypatch: ``run_case(case, backend, dtype, need)``."""
    return lambda case, backend, dtype=torch.float64, need=(True, True, True): run_kernel_case(
        case, backend, monkeypatch, dtype, need)


@pytest.fixture
def matches_engine(run_case):
    """``matches_engine(case, backend, need)``: asserts that ``backend`` gives the torch engine's output (in
    the input's memory format) and gradients on ``case``, in float64, to rounding."""

    def check(case, backend, need=(True, True, True)):
        y_ref, grads_ref = run_case(case, "torch", need=need)
        y, grads = run_case(case, backend, need=need)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        assert y.is_contiguous(memory_format=case[3] or torch.contiguous_format)
        for g, g_ref in zip(grads, grads_ref):
            assert (g is None) == (g_ref is None)
            if g is not None:
                torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)

    return check


@pytest.fixture(params=list(dispatch.BACKENDS))
def seam_backend(request, monkeypatch):
    """An instance of every backend of :data:`normlab.kernels.dispatch.BACKENDS` (each has the statistics
    seam) that runs CPU tensors here (Triton under its interpreter, which needs ``TRITON_INTERPRET=1`` from
    before triton is first imported); skipped where it cannot run."""
    name = request.param
    if name == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not available(name):
        pytest.skip(f"{name} is not installed")
    backend = dispatch.BACKENDS[name]()
    reason = backend.unsupported(torch.zeros(2, 2), batch_plan((2, 2)))
    if reason is not None:
        pytest.skip(f"the {name} backend cannot run CPU tensors in this process: {reason}")
    return backend
