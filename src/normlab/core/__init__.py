"""The normalization core: one plan of axes (:mod:`.plan`), one engine (:mod:`.engine`), one set of checks.

The core sits below the backends and imports nothing from the ``kernels`` package: its callers pass it
a backend implementing :class:`.backend.Backend` (or ``None``, the torch engine), and
:mod:`.conventions` holds the rules every backend follows (accumulation dtype, memory format, empty batch).
"""

from normlab.core.engine import Normalize, moments, normalize, normalize_backward, update_running_stats
from normlab.core.plan import Plan, batch_plan, group_plan, instance_plan, layer_plan

__all__ = [
    "Plan",
    "batch_plan",
    "group_plan",
    "instance_plan",
    "layer_plan",
    "Normalize",
    "moments",
    "normalize",
    "normalize_backward",
    "update_running_stats",
]
