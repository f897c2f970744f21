"""Batched image augmentation on tensors, on whatever device the batch lives on (no PIL).

``random_crop_flip`` is torchvision's ``RandomCrop(size, padding=p)`` (zero fill) followed by
``RandomHorizontalFlip()``, applied to a whole batch with per-image parameters in one gather.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["sample_crop_flip", "random_crop_flip", "normalize", "normalization_affine",
           "apply_affine"]


def sample_crop_flip(count: int, padding: int, generator: torch.Generator
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(top, left, flip)``: offsets uniform in ``[0, 2 * padding]``, flip with p=1/2."""
    top = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    return top, left, flip


def random_crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                     flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of a zero-padded batch, then mirror the flagged ones.

    With ``P`` the batch zero-padded by ``padding`` on every side, image ``b`` of ``(B, C, H, W)``
    becomes ``out[b, c, i, j] = P[b, c, top[b] + i, left[b] + (W - 1 - j if flip[b] else j)]``.
    Any dtype; ``top``, ``left``, ``flip`` are ``(B,)`` tensors on the batch's device.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    rows = top[:, None] + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device).expand(batch, width)
    columns = torch.where(flip[:, None], width - 1 - columns, columns) + left[:, None]
    flat = (rows[:, :, None] * padded_width + columns[:, None, :]).reshape(batch, 1, height * width)
    out = padded.reshape(batch, channels, -1).gather(2, flat.expand(batch, channels, -1))
    return out.reshape(batch, channels, height, width)


def normalization_affine(mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]],
                         channels: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``(1, C, 1, 1)``, so that ``(x / 255 - mean) / std`` equals
    ``x * scale - shift``."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).expand(channels)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).expand(channels)
    return (1.0 / (255.0 * std_t)).view(1, channels, 1, 1), (mean_t / std_t).view(1, channels, 1, 1)


def normalize(images: torch.Tensor, mean: Union[float, Sequence[float]],
              std: Union[float, Sequence[float]]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in ``[0, 255]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    scale, shift = normalization_affine(mean, std, images.shape[1], images.device)
    return apply_affine(images, scale, shift)


def apply_affine(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """float32 ``images * scale - shift`` (constants from ``normalization_affine``)."""
    return images.to(torch.float32).mul_(scale).sub_(shift)
