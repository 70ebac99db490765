import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import normlab.functional as F
from normlab.kernels import available

settings.register_profile(
    "normlab",
    deadline=None,
    max_examples=int(os.environ.get("NORMLAB_HYPOTHESIS_EXAMPLES", "30")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("normlab")
torch.set_num_threads(min(2, torch.get_num_threads()))

BACKENDS = ["torch"] + [name for name in ("numba",) if available(name)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per installed backend, forced with NORMLAB_BACKEND (the env var is read per call)."""
    monkeypatch.setenv("NORMLAB_BACKEND", request.param)
    return request.param


OUTLIER_SHAPES = {"(N, C) rows": (8192, 4), "(N, C, H, W)": (512, 4, 4, 4), "layer rows": (64, 512)}


@pytest.fixture
def outlier_first_errors():
    """``errors(layout, shape=None, channels_last=False)``: BatchNorm (LayerNorm for ``"layer rows"``) on
    1e-2 · N(0, 1) whose first sample (LayerNorm: every row's first value) is 1e5, with γ, forward and
    backward on whichever backend is selected, against torch.nn in float64. Returns the largest error of
    y away from the outliers and on them, and the largest relative errors of dx and dγ."""

    def errors(layout, shape=None, channels_last=False):
        shape = shape or OUTLIER_SHAPES[layout]
        gen = torch.Generator().manual_seed(0)
        x = 1e-2 * torch.randn(shape, generator=gen)
        if layout == "layer rows":
            x[:, 0] = 1e5
        else:
            x[0] = 1e5
        dy = torch.randn(shape, generator=gen)
        if channels_last:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        w = torch.linspace(0.5, 2.0, shape[1])
        if layout == "layer rows":
            ours = lambda x, w: F.layer_norm(x, shape[1:], w, None)  # noqa: E731
            theirs = lambda x, w: torch.nn.functional.layer_norm(x, shape[1:], w, None)  # noqa: E731
        else:
            ours = lambda x, w: F.batch_norm(x, None, None, w, None, training=True)  # noqa: E731
            theirs = lambda x, w: torch.nn.functional.batch_norm(x, None, None, w, None, training=True)  # noqa: E731
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = ours(xs, ws)
        y.backward(dy)
        x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
        truth = theirs(x64, w64)
        truth.backward(dy.double())
        err = (y.detach().double() - truth.detach()).abs()
        outlier = x == 1e5
        rel = [((got.double() - want).abs().max() / want.abs().max()).item()
               for got, want in ((xs.grad, x64.grad), (ws.grad, w64.grad))]
        return err[~outlier].max().item(), err[outlier].max().item(), *rel

    return errors


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_spawn():
    """``spawn(workers, scenario, world, limit=60)``: run ``SCENARIO(rank, world)`` of the file ``workers`` in
    ``world`` processes of a gloo group on 127.0.0.1 (tests/gloo_runner.py) and fail with their stderr unless every one exits 0 within
    ``limit`` seconds (stragglers are killed). Returns the seconds taken."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import normlab

    def spawn(workers, scenario: str, world: int, limit: float = 60.0) -> float:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(normlab.__file__).parents[1]),
                                                           os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", NORMLAB_BACKEND="torch")  # no kernels compiled in every process
        port = _free_port()
        start = time.monotonic()
        runner = Path(__file__).with_name("gloo_runner.py")
        procs = [subprocess.Popen([sys.executable, str(runner), str(workers), scenario, str(r), str(world), str(port)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        outputs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, limit - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail(f"{scenario}: the processes did not finish within {limit} s")
            outputs.append((p.returncode, err[-3000:]))
        failed = [(r, code, err) for r, (code, err) in enumerate(outputs) if code != 0]
        assert not failed, "\n".join(f"rank {r} exited {code}:\n{err}" for r, code, err in failed)
        return time.monotonic() - start

    return spawn


@pytest.fixture
def numba_seam_calls(monkeypatch):
    """NORMLAB_BACKEND=numba with the numba backend's fused ``forward`` and ``backward`` refused, so that a layer
    which falls back to them fails instead of running the statistics seam; returns the list of the keyword
    arguments of every ``partial_moments`` and ``partial_grad_sums`` call, tagged with the method's name."""
    if not available("numba"):
        pytest.skip("numba is not installed")
    from normlab.kernels.numba.backend import NumbaBackend

    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    calls = []

    def refused(self, *args, **kwargs):
        raise AssertionError("the fused kernels ran where the statistics seam should have")

    def recorded(name):
        method = getattr(NumbaBackend, name)

        @functools.wraps(method)  # the same signature: callers ask it which keywords the seam takes
        def record(self, *args, **kwargs):
            calls.append((name, kwargs))
            return method(self, *args, **kwargs)

        return record

    monkeypatch.setattr(NumbaBackend, "forward", refused)
    monkeypatch.setattr(NumbaBackend, "backward", refused)
    for name in ("partial_moments", "partial_grad_sums"):
        monkeypatch.setattr(NumbaBackend, name, recorded(name))
    return calls
