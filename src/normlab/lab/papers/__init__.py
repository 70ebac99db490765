"""Lab experiments, one paper (or one measurement) per file; each module's docstring names the paper, the
claim and the command that runs it, and its Experiment objects join ``normlab.lab.experiments.EXPERIMENTS``.
:mod:`~normlab.lab.papers.common` holds what several share (the VGG-style CNN and the deep linear network).

This package's own list: BatchNorm's variants for small and unusual batches."""

from normlab.lab.papers.batch_size import BATCH_SIZE
from normlab.lab.papers.sequence import SEQUENCE

EXPERIMENTS = (BATCH_SIZE, SEQUENCE)

__all__ = ["BATCH_SIZE", "EXPERIMENTS", "SEQUENCE"]
