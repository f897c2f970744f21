"""CIFAR ResNets (``src56``, ``src110``): depth 6n+2, as in the original ACNet code.

A 3x3 conv-BN-ReLU stem (16 channels), three stages of n basic blocks (16, 32, 64 channels; the
first block of stages 2 and 3 has stride 2 and a 1x1 conv-BN projection shortcut), global average
pool, fc. ResNet-56: n = 9, about 0.85M parameters; ResNet-110: n = 18, about 1.7M.
"""
from __future__ import annotations

from torch import Tensor, nn

from .builder import ConvBuilder
from .resnet import BasicBlock, make_stage

__all__ = ["CifarResNet"]


class CifarResNet(nn.Module):
    """``stem``, ``stage1``..``stage3`` of :class:`BasicBlock`, ``avgpool``, ``fc``."""

    def __init__(self, builder: ConvBuilder, depth: int = 56, num_classes: int = 10, widths=(16, 32, 64)) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = builder.conv_bn_relu(3, widths[0], 3, padding=1)
        in_channels = widths[0]
        for index, channels in enumerate(widths):
            stage = make_stage(builder, BasicBlock, in_channels, channels, blocks_per_stage, stride=1 if index == 0 else 2)
            self.add_module(f"stage{index + 1}", stage)
            in_channels = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(x)))
