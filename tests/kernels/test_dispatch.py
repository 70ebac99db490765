"""Backend selection: NORMLAB_BACKEND, automatic choice, clear errors, lazy import of numba."""

import subprocess
import sys

import pytest
import torch

import normlab.functional as F
from normlab.core.plan import batch_plan
from normlab.kernels import BackendError, available, dispatch, requested_backend, select

needs_numba = pytest.mark.skipif(not available("numba"), reason="numba is not installed")


def test_importing_normlab_compiles_nothing():
    code = (
        "import sys, normlab, normlab.nn, normlab.functional, normlab.kernels; "
        "bad = [m for m in ('numba', 'normlab.kernels.numba.primitives') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_requested_backend_reads_the_environment_per_call(monkeypatch):
    monkeypatch.delenv("NORMLAB_BACKEND", raising=False)
    assert requested_backend() == "auto"
    monkeypatch.setenv("NORMLAB_BACKEND", " Torch ")
    assert requested_backend() == "torch"
    monkeypatch.setenv("NORMLAB_BACKEND", "cuda-magic")
    with pytest.raises(BackendError, match="auto, torch, numba"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True)


def test_torch_backend_is_the_engine(monkeypatch):
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    assert select(torch.randn(4, 3), batch_plan((4, 3))) is None


@needs_numba
@pytest.mark.parametrize("choice", ["auto", "numba"])
def test_cpu_float_cases_go_to_numba(monkeypatch, choice):
    monkeypatch.setenv("NORMLAB_BACKEND", choice)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert select(torch.randn(4, 3).to(dtype), batch_plan((4, 3))).name == "numba"
    x = torch.randn(5, 3, requires_grad=True)
    y = F.batch_norm(x, None, None, training=True)
    assert type(y.grad_fn).__name__ == "NormalizeBackward"


@needs_numba
@pytest.mark.parametrize("shape", [(4, 3), (8, 16, 4, 4), (64, 64, 8, 8)])
def test_auto_runs_cpu_inputs_of_every_size_on_the_kernels(monkeypatch, shape):
    monkeypatch.setenv("NORMLAB_BACKEND", "auto")
    x = torch.randn(shape)
    for batch_stats in (True, False):
        assert select(x, batch_plan(x.shape), batch_stats=batch_stats).name == "numba"


@needs_numba
def test_forced_backend_that_cannot_run_a_case_raises(monkeypatch):
    x = torch.empty(4, 3, device="meta")
    monkeypatch.setenv("NORMLAB_BACKEND", "auto")
    assert F.batch_norm(x, None, None, training=True).device.type == "meta"  # auto: the torch engine
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    with pytest.raises(BackendError, match=r"NORMLAB_BACKEND=numba: .*CPU tensors only.*auto"):
        F.batch_norm(x, None, None, training=True)


def test_forced_backend_that_is_not_installed_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda name: name == "torch")
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    with pytest.raises(BackendError, match="not installed"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True)
    monkeypatch.setenv("NORMLAB_BACKEND", "auto")
    assert select(torch.randn(4, 3), batch_plan((4, 3))) is None


@needs_numba
def test_numba_follows_torch_thread_count(monkeypatch):
    import numba

    from normlab.kernels.numba.backend import SERIAL_BELOW

    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    large = torch.randn(8, 4, SERIAL_BELOW // 32, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        F.batch_norm(large, None, None, training=True)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    F.batch_norm(large, None, None, training=True)
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)
    F.batch_norm(torch.randn(8, 3, 4, 4), None, None, training=True)  # small: one thread
    assert numba.get_num_threads() == 1


@needs_numba
def test_first_numba_call_keeps_torch_thread_count():
    """Starting numba's OpenMP pool resets the count of the OpenMP runtime torch shares; it is put back."""
    code = (
        "import os, torch; torch.set_num_threads(1); os.environ['NORMLAB_BACKEND'] = 'numba'; "
        "import normlab.functional as F; F.batch_norm(torch.randn(64, 4, 64, 64), None, None, training=True); "
        "assert torch.get_num_threads() == 1, torch.get_num_threads()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
