"""The normalization core: one plan of axes (:mod:`.plan`), one engine (:mod:`.engine`), one set of checks."""

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
