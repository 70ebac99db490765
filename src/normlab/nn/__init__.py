"""normlab layers: drop-in replacements for torch.nn's normalization layers.

>>> import normlab.nn as nn
>>> bn = nn.BatchNorm2d(64)          # same arguments, parameters, buffers and state_dict keys as torch.nn
>>> model = nn.convert(model)        # doctest: +SKIP  (swap the norm layers of an existing model)
>>> frozen = nn.FrozenBatchNorm2d(64)  # fixed statistics in every mode, for fine-tuning
"""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.convert import convert
from normlab.nn.extra import CovariateShiftNoise, LpBatchNorm1d, LpBatchNorm2d
from normlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normlab.nn.fused import BatchNormAddReLU2d, BatchNormReLU2d
from normlab.nn.groupnorm import GroupNorm, LayerNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAddReLU2d",
    "BatchNormReLU2d",
    "CovariateShiftNoise",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LpBatchNorm1d",
    "LpBatchNorm2d",
    "convert",
]
