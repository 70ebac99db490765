"""Experiments that each live in their own module: BatchNorm's variants for small and unusual batches."""

from normlab.lab.papers.batch_size import BATCH_SIZE
from normlab.lab.papers.sequence import SEQUENCE

EXPERIMENTS = (BATCH_SIZE, SEQUENCE)

__all__ = ["BATCH_SIZE", "EXPERIMENTS", "SEQUENCE"]
