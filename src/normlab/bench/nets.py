"""The architectures ``normlab bench --models`` times, written with torch.nn the way model zoos write them.

The residual blocks follow torchvision's ``BasicBlock``/``Bottleneck`` (``conv1``/``bn1``…, one ``relu``
module used after each BatchNorm, ``downsample``, ``out += identity``), so that
``normlab.nn.convert(model, fuse=True)`` meets them as it meets a torchvision ResNet. Each builder takes a
``scale`` that shrinks widths and depths for smoke runs (``--quick``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "EncoderBlock", "mobilenet", "resnet18", "resnet50", "transformer_block"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, ReLU, and the identity (or a strided 1x1 projection) added."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (×4), each with BatchNorm; ReLU after the first two and after the add."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _projection(inplanes: int, planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem (stride 1, optional max-pool), four stages, average pool, classifier."""

    def __init__(self, block: type[nn.Module], depths: list[int], width: int, num_classes: int = 10,
                 pool: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2) if pool else nn.Identity()
        layers, inplanes = [], width
        for i, depth in enumerate(depths):
            planes = width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(inplanes, planes, 2 if j == 0 and i > 0 else 1))
                inplanes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 32, scale: int = 1) -> nn.Module:
    """ResNet-18 (BasicBlock ×[2, 2, 2, 2]) of base ``width`` for 32x32 inputs; ``scale > 1`` divides the
    width and keeps one block per stage."""
    return ResNet(BasicBlock, [2, 2, 2, 2] if scale == 1 else [1, 1, 1, 1], max(4, width // scale))


def resnet50(width: int = 32, scale: int = 1) -> nn.Module:
    """ResNet-50 (Bottleneck ×[3, 4, 6, 3]) of base ``width``, with a max-pool after the stem (for 64x64
    inputs); ``scale > 1`` divides the width and keeps one block per stage."""
    return ResNet(Bottleneck, [3, 4, 6, 3] if scale == 1 else [1, 1, 1, 1], max(4, width // scale), pool=True)


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """A depthwise 3x3 convolution then a pointwise 1x1 one, each followed by BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


MOBILENET_PLAN = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                  (512, 1), (512, 1), (1024, 2), (1024, 1)]
"""MobileNet (v1)'s depthwise-separable blocks as (output channels, stride), for a 32-channel stem."""


def mobilenet(scale: int = 1, num_classes: int = 10) -> nn.Sequential:
    """MobileNet v1 for 32x32 inputs (a stride-1 stem); ``scale > 1`` divides the widths and keeps the
    first four blocks."""
    plan = MOBILENET_PLAN if scale == 1 else MOBILENET_PLAN[:4]
    cin = 32 // scale
    layers: list[nn.Module] = [nn.Conv2d(3, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
    for cout, stride in plan:
        layers.append(_separable(cin, cout // scale, stride))
        cin = cout // scale
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class EncoderBlock(nn.Module):
    """A pre-norm Transformer encoder block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``, and a classifier
    on the mean token (so that a training step has a loss)."""

    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 1024, num_classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(n, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def transformer_block(dim: int = 256, scale: int = 1) -> nn.Module:
    """:class:`EncoderBlock` of width ``dim`` (MLP 4x, 4 heads); ``scale > 1`` divides the width."""
    dim = max(16, dim // scale)
    return EncoderBlock(dim, 4, 4 * dim)
