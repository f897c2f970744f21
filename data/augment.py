"""Batched image augmentation on tensors, on whatever device the batch lives on (no PIL).

``CropFlip`` is torchvision's ``RandomCrop(size, padding=p)`` (zero fill) followed by
``RandomHorizontalFlip()``, applied to a whole batch with per-image parameters as ONE gather:
images are stored flattened with one extra zero pixel per channel (``with_zero_sentinel``), and
every output pixel reads either its source pixel or that zero. The gather indices of all
``(2p + 1)**2 * 2`` crop/flip choices are precomputed when they are small (CIFAR: 1.3 MB), so a
batch costs an index lookup, a gather and the normalisation: a handful of kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["sample_crop_flip", "with_zero_sentinel", "CropFlip", "random_crop_flip",
           "normalization_affine", "apply_affine", "normalize"]

_MAX_TABLE_ENTRIES = 1 << 22  # precomputed index tables up to 32 MB (int64)


def sample_crop_flip(count: int, padding: int, generator: torch.Generator
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(top, left, flip)``: offsets uniform in ``[0, 2 * padding]``, flip with p=1/2."""
    top = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    return top, left, flip


def with_zero_sentinel(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H * W + 1)``: each channel flattened, then one zero pixel."""
    batch, channels, height, width = images.shape
    zeros = images.new_zeros(batch, channels, 1)
    return torch.cat([images.reshape(batch, channels, height * width), zeros], dim=2)


class CropFlip:
    """Crop a zero-padded image at ``(top, left)`` and mirror it if ``flip``, for a whole batch.

    With ``P`` the image zero-padded by ``padding`` on every side, the output is
    ``out[b, c, i, j] = P[b, c, top[b] + i, left[b] + (W - 1 - j if flip[b] else j)]``.
    """

    def __init__(self, height: int, width: int, padding: int,
                 device: Union[str, torch.device] = "cpu") -> None:
        self.height, self.width, self.padding = height, width, padding
        self.choices = 2 * padding + 1
        size = height * width
        offsets = torch.arange(self.choices, device=device)
        # source row of output row i for each top offset, as a flat offset (or "outside": size)
        rows = offsets[:, None] + torch.arange(height, device=device) - padding
        self.row_code = torch.where((rows >= 0) & (rows < height), rows * width, size)
        # source column of output column j for each (left offset, flip)
        j = torch.arange(width, device=device)
        columns = offsets[:, None, None] + torch.stack([j, width - 1 - j]) - padding
        self.column_code = torch.where((columns >= 0) & (columns < width), columns, size)
        self.table = None
        if self.choices ** 2 * 2 * size <= _MAX_TABLE_ENTRIES:
            self.table = self._combine(self.row_code[:, None, None, :],
                                       self.column_code[None, :, :, :]).reshape(-1, size)

    def _combine(self, row_code: torch.Tensor, column_code: torch.Tensor) -> torch.Tensor:
        """Flat source index in ``[0, H*W]`` (``H*W``: the zero sentinel) of each output pixel."""
        return (row_code[..., :, None] + column_code[..., None, :]).clamp_max_(
            self.height * self.width)

    def flat_index(self, top: torch.Tensor, left: torch.Tensor,
                   flip: torch.Tensor) -> torch.Tensor:
        """``(B, H * W)`` gather indices into sentinel-extended images."""
        flip = flip.long()
        if self.table is not None:
            return self.table.index_select(0, (top * self.choices + left) * 2 + flip)
        index = self._combine(self.row_code[top], self.column_code[left, flip])
        return index.reshape(len(top), -1)

    def __call__(self, flat_images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                 flip: torch.Tensor) -> torch.Tensor:
        """``flat_images`` from ``with_zero_sentinel`` -> cropped/flipped ``(B, C, H, W)``."""
        batch, channels = flat_images.shape[:2]
        index = self.flat_index(top, left, flip)[:, None, :].expand(batch, channels, -1)
        out = flat_images.gather(2, index)
        return out.view(batch, channels, self.height, self.width)


def random_crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                     flip: torch.Tensor, padding: int) -> torch.Tensor:
    """``CropFlip`` on an ordinary ``(B, C, H, W)`` batch (any dtype)."""
    height, width = images.shape[-2:]
    return CropFlip(height, width, padding, images.device)(with_zero_sentinel(images), top,
                                                            left, flip)


def normalization_affine(mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]],
                         channels: int, device: Union[str, torch.device]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``(1, C, 1, 1)``, so that ``(x / 255 - mean) / std`` equals
    ``x * scale - shift``."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).expand(channels)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).expand(channels)
    return (1.0 / (255.0 * std_t)).view(1, channels, 1, 1), (mean_t / std_t).view(1, channels, 1, 1)


def apply_affine(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 ``images * scale - shift``, written into ``out`` when given."""
    out = torch.mul(images, scale, out=out) if out is not None else images.mul(scale)
    return out.sub_(shift)


def normalize(images: torch.Tensor, mean: Union[float, Sequence[float]],
              std: Union[float, Sequence[float]]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in ``[0, 255]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    scale, shift = normalization_affine(mean, std, images.shape[1], images.device)
    return apply_affine(images, scale, shift)
