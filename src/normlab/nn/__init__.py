"""normlab layers: drop-in replacements for torch.nn's normalization layers.

>>> import normlab.nn as nn
>>> bn = nn.BatchNorm2d(64)          # same arguments, parameters, buffers and state_dict keys as torch.nn
>>> model = nn.convert(model)        # doctest: +SKIP  (swap the norm layers of an existing model)
>>> frozen = nn.FrozenBatchNorm2d(64)  # fixed statistics in every mode, for fine-tuning
"""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, MaskedBatchNorm1d
from normlab.nn.conventions import keras_kernel, load_flax_batchnorm, load_keras_batchnorm
from normlab.nn.convert import convert, convert_sync_batchnorm, revert_sync_batchnorm
from normlab.nn.extra import CovariateShiftNoise, LpBatchNorm1d, LpBatchNorm2d
from normlab.nn.fuse import FusionReport, fuse
from normlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normlab.nn.fused import BatchNormAddReLU2d, BatchNormReLU2d
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.groupnorm import GroupNorm, LayerNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normlab.nn.sync_batchnorm import SyncBatchNorm, SyncBatchNormError

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAddReLU2d",
    "BatchNormReLU2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CovariateShiftNoise",
    "FrozenBatchNorm1d",
    "FusionReport",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LpBatchNorm1d",
    "LpBatchNorm2d",
    "MaskedBatchNorm1d",
    "SyncBatchNorm",
    "SyncBatchNormError",
    "convert",
    "convert_sync_batchnorm",
    "fuse",
    "keras_kernel",
    "load_flax_batchnorm",
    "load_keras_batchnorm",
    "revert_sync_batchnorm",
]
