"""MobileNetV1 for ImageNet (``smi1``): the DBB paper's depthwise case, about 4.2M parameters.

``conv1``: 3x3/2 conv-BN-ReLU (32 channels). 13 blocks, each a 3x3 depthwise conv-BN-ReLU
(``depthwise``, stride 2 in blocks 2, 4, 6 and 12) and a 1x1 pointwise conv-BN-ReLU
(``pointwise``); output channels 64, 128, 128, 256, 256, 512 x6, 1024, 1024. Global average pool,
fc 1024 -> classes. The depthwise 3x3 convs become blocks (grouped: one group per channel);
the pointwise 1x1 convs stay plain.
"""
from __future__ import annotations

from torch import Tensor, nn

from .builder import ConvBuilder

__all__ = ["MobileNetV1", "MOBILENET_V1_LAYOUT"]

#: (output channels, stride) of the 13 depthwise-separable blocks.
MOBILENET_V1_LAYOUT = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """``pointwise(depthwise(x))``: 3x3 depthwise conv-BN-ReLU (stride), 1x1 conv-BN-ReLU."""

    def __init__(self, builder: ConvBuilder, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = builder.conv_bn_relu(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels)
        self.pointwise = builder.conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """``conv1``, ``blocks`` (13 :class:`DepthwiseSeparable`), ``avgpool``, ``fc``."""

    def __init__(self, builder: ConvBuilder, num_classes: int = 1000, stem_channels: int = 32) -> None:
        super().__init__()
        self.conv1 = builder.conv_bn_relu(3, stem_channels, 3, stride=2, padding=1)
        blocks, in_channels = [], stem_channels
        for out_channels, stride in MOBILENET_V1_LAYOUT:
            blocks.append(DepthwiseSeparable(builder, in_channels, out_channels, stride))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.blocks(self.conv1(x)))))
