import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
