"""Cifar-quick with BN (``cfqkbnc``), as in the original ACNet code.

Three 5x5 conv-BN-ReLU units (32, 32, 64 channels, padding 2); max-pool 3/2 after the first,
average-pool 3/2 after the second and third (32 -> 15 -> 7 -> 3); fc 3*3*64 -> 64, ReLU,
fc 64 -> classes. Input: 32x32 images (the fc size depends on it).
"""
from __future__ import annotations

from torch import Tensor, nn

from .builder import ConvBuilder

__all__ = ["CifarQuickBN", "CIFAR_QUICK_CHANNELS"]

CIFAR_QUICK_CHANNELS = (32, 32, 64)


class CifarQuickBN(nn.Module):
    """Cifar-quick + BN; every conv is a 5x5 conv-BN-ReLU unit from ``builder``."""

    def __init__(self, builder: ConvBuilder, num_classes: int = 10, channels=CIFAR_QUICK_CHANNELS) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = builder.conv_bn_relu(3, c1, 5, padding=2)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv2 = builder.conv_bn_relu(c1, c2, 5, padding=2)
        self.pool2 = nn.AvgPool2d(kernel_size=3, stride=2)
        self.conv3 = builder.conv_bn_relu(c2, c3, 5, padding=2)
        self.pool3 = nn.AvgPool2d(kernel_size=3, stride=2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(3 * 3 * c3, 64)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))
