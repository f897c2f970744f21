"""ResNets: the residual blocks, and the ImageNet ResNet-18/34/50 (``sres18``, ``sres34``, ``sres50``).

The ImageNet networks are torchvision's ``resnet18/34/50`` (ResNet v1.5: the stride of a bottleneck
sits on its 3x3 conv), with exactly its parameter counts in base form: a 7x7 conv-BN-ReLU stem
(plain in every block type), 3x3 max-pool, four stages, global average pool, fc. Every conv-BN of
torchvision's model is one builder unit here.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

from torch import Tensor, nn

from .builder import ConvBuilder

__all__ = ["BasicBlock", "Bottleneck", "ImageNetResNet", "make_shortcut"]


def make_shortcut(builder: ConvBuilder, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a 1x1 conv-BN projection with the block's stride."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return builder.conv_bn(in_channels, out_channels, 1, stride=stride)


class BasicBlock(nn.Module):
    """``relu(conv2(conv1(x)) + shortcut(x))``: ``conv1`` 3x3 conv-BN-ReLU (stride), ``conv2`` 3x3 conv-BN."""

    expansion = 1

    def __init__(self, builder: ConvBuilder, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = builder.conv_bn_relu(in_channels, channels, 3, stride=stride, padding=1)
        self.conv2 = builder.conv_bn(channels, channels, 3, padding=1)
        self.shortcut = make_shortcut(builder, in_channels, channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """``relu(conv3(conv2(conv1(x))) + shortcut(x))``: 1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (stride),
    1x1 conv-BN to ``4 * channels``."""

    expansion = 4

    def __init__(self, builder: ConvBuilder, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = builder.conv_bn_relu(in_channels, channels, 1)
        self.conv2 = builder.conv_bn_relu(channels, channels, 3, stride=stride, padding=1)
        self.conv3 = builder.conv_bn(channels, out_channels, 1)
        self.shortcut = make_shortcut(builder, in_channels, out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


ResidualBlock = Union[Type[BasicBlock], Type[Bottleneck]]


def make_stage(
    builder: ConvBuilder, block: ResidualBlock, in_channels: int, channels: int, num_blocks: int, stride: int
) -> nn.Sequential:
    """``num_blocks`` residual blocks; the first one has the stride (and the projection shortcut)."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(block(builder, in_channels, channels, stride if index == 0 else 1))
        in_channels = channels * block.expansion
    return nn.Sequential(*blocks)


class ImageNetResNet(nn.Module):
    """``conv1`` (7x7/2 conv-BN-ReLU), ``maxpool``, ``layer1``..``layer4`` (64..512 channels), ``avgpool``, ``fc``."""

    def __init__(
        self, builder: ConvBuilder, block: ResidualBlock, blocks_per_stage: Sequence[int], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.conv1 = builder.conv_bn_relu(3, 64, 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for index, (channels, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            stage = make_stage(builder, block, in_channels, channels, num_blocks, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
            in_channels = channels * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))
