"""Health of a model's normalization layers: ``normlab.inspect(model, batches)`` and ``normlab inspect``.

:mod:`.checks` measures each layer (running statistics against the batches', NaN/inf/negative or
never-updated running statistics, guarded skips, dead γ, values per channel, foldability, and the model's
train-mode against eval-mode output); :mod:`.render` prints the table and writes JSON and a
self-contained HTML page with plots; :mod:`.cli` is the command.
"""

from normlab.health.checks import LayerHealth, ModelHealth, inspect

__all__ = ["LayerHealth", "ModelHealth", "inspect"]
