import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "normlab",
    deadline=None,
    max_examples=int(os.environ.get("NORMLAB_HYPOTHESIS_EXAMPLES", "30")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("normlab")
torch.set_num_threads(min(2, torch.get_num_threads()))
