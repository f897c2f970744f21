"""Wide ResNet for CIFAR (``wrnc16plain``: WRN-16-8, no dropout), pre-activation, as in the original
ACNet code.

``stem``: a 3x3 conv (16 channels) with no BN of its own. Three stages of two pre-activation
blocks, widths 16k, 32k, 64k (k = 8: 128, 256, 512); a block is
``conv2(conv1(x)) + shortcut(x)`` with ``conv1``/``conv2`` 3x3 BN-ReLU-conv units (``conv1``
carries the stride) and, where the shape changes, a 1x1 BN-ReLU-conv projection ``shortcut``.
Then ``bn`` (the last BN), global average pool (8x8 on 32x32 inputs), ``fc``. As in the original,
there is no ReLU between the last BN and the pool. About 11.0M parameters.

Deploy structure: see :mod:`constructor.builder`; every BN-ReLU-conv unit keeps its ``bn`` and
``relu`` and its conv becomes ``nn.Conv2d(bias=True)``, the stem too.
"""
from __future__ import annotations

from torch import Tensor, nn

from .builder import ConvBuilder

__all__ = ["WideResNetCifar", "PreActBlock"]


class PreActBlock(nn.Module):
    """``conv2(conv1(x)) + shortcut(x)`` with BN-ReLU-conv units (no activation after the sum)."""

    def __init__(self, builder: ConvBuilder, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = builder.bn_relu_conv(in_channels, channels, 3, stride=stride, padding=1)
        self.conv2 = builder.bn_relu_conv(channels, channels, 3, padding=1)
        if stride == 1 and in_channels == channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = builder.bn_relu_conv(in_channels, channels, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)


class WideResNetCifar(nn.Module):
    """WRN-d-k: ``stem``, ``stage1``..``stage3`` of :class:`PreActBlock`, ``bn``, ``avgpool``, ``fc``."""

    def __init__(self, builder: ConvBuilder, depth: int = 16, widen_factor: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.stem = builder.conv(3, 16, 3, padding=1)
        in_channels = 16
        for index, base_width in enumerate((16, 32, 64)):
            channels = base_width * widen_factor
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(PreActBlock(builder, in_channels, channels, stride))
                in_channels = channels
            self.add_module(f"stage{index + 1}", nn.Sequential(*blocks))
        self.bn = builder.bn(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(self.bn(x))))
