"""VGG-16 for CIFAR (``vc``), as in the original ACNet code.

13 conv3x3-BN-ReLU units with channels 64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M,
512, 512, 512, M (M: 2x2 max-pool, 32 -> 1), then fc 512 -> 512, ReLU, fc 512 -> classes.
Input: 32x32 images.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

from torch import Tensor, nn

from .builder import ConvBuilder

__all__ = ["VGGCifar", "VGG16_CIFAR_LAYOUT"]

#: Output channels of each conv; ``"M"`` is a 2x2 max-pool.
VGG16_CIFAR_LAYOUT: Sequence[Union[int, str]] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGGCifar(nn.Module):
    """VGG for 32x32 inputs: ``stem`` (``conv1``..``conv13``, ``maxpool1``..``maxpool5``), then two fcs."""

    def __init__(self, builder: ConvBuilder, num_classes: int = 10, layout: Sequence[Union[int, str]] = VGG16_CIFAR_LAYOUT) -> None:
        super().__init__()
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        in_channels, convs, pools = 3, 0, 0
        for item in layout:
            if item == "M":
                pools += 1
                layers[f"maxpool{pools}"] = nn.MaxPool2d(kernel_size=2)
            else:
                convs += 1
                layers[f"conv{convs}"] = builder.conv_bn_relu(in_channels, int(item), 3, padding=1)
                in_channels = int(item)
        self.stem = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(in_channels, 512)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.relu(self.linear1(self.flatten(self.stem(x)))))
