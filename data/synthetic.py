"""A synthetic, learnable image set for smoke runs and throughput benchmarks (no files).

Class ``c`` has a fixed colour ``palette[c]`` (drawn from ``seed``); an image of class ``c`` is
that colour plus a smooth class-specific grating plus per-pixel Gaussian noise, stored as uint8.
A network separates the classes within a few hundred steps, so a short run's accuracy rises above
chance, and everything is a deterministic function of ``(seed, split)``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Tuple

import torch

from .errors import DatasetArgumentError
from .sharding import epoch_generator
from .tensor_loader import TensorImageLoader, tensor_loaders

if TYPE_CHECKING:
    from .loaders import LoaderRequest

__all__ = ["make_synthetic", "build_loaders"]

DEFAULT_IMAGE_SIZE, DEFAULT_NUM_CLASSES = 32, 10

_SPLIT_STREAMS = {"train": 11, "val": 12}
_CHUNK_PIXELS = 1 << 24  # generate in chunks of about 16 M values to bound memory


def make_synthetic(num_samples: int, image_size: int, num_classes: int, *, seed: int,
                   split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 3, S, S)`` and int64 labels ``(N,)`` of the synthetic set's ``split``.

    Labels are balanced (``i % num_classes``, shuffled); the class appearance is shared by the
    splits (it depends on ``seed`` only), the noise and label order are not.
    """
    class_gen = epoch_generator(seed, 0, 10)
    palette = torch.randint(40, 216, (num_classes, 3), generator=class_gen).float()
    angle = torch.rand(num_classes, generator=class_gen) * math.pi
    frequency = 1.0 + 3.0 * torch.rand(num_classes, generator=class_gen)

    gen = epoch_generator(seed, 0, _SPLIT_STREAMS[split])
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=gen)]
    images = torch.empty(num_samples, 3, image_size, image_size, dtype=torch.uint8)
    coords = torch.linspace(0.0, 2.0 * math.pi, image_size)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    chunk = max(1, _CHUNK_PIXELS // (3 * image_size * image_size))
    for start in range(0, num_samples, chunk):
        lab = labels[start:start + chunk]
        phase = (torch.cos(angle[lab])[:, None, None] * xs + torch.sin(angle[lab])[:, None, None]
                 * ys) * frequency[lab][:, None, None]
        pattern = 24.0 * torch.sin(phase)[:, None]
        noise = 32.0 * torch.randn(len(lab), 3, image_size, image_size, generator=gen)
        values = palette[lab][:, :, None, None] + pattern + noise
        images[start:start + chunk] = values.round_().clamp_(0, 255).to(torch.uint8)
    return images, labels


def build_loaders(request: "LoaderRequest") -> Tuple[TensorImageLoader, TensorImageLoader]:
    """The loader factory of ``synthetic`` (``data.registry``): ``request.image_size`` x
    ``request.num_classes`` (defaults 32 and 10), ``num_train`` / ``num_val`` images (its options),
    generated from ``request.seed``; random crops with padding ``max(1, size // 8)`` and flips."""
    size = DEFAULT_IMAGE_SIZE if request.image_size is None else int(request.image_size)
    classes = DEFAULT_NUM_CLASSES if request.num_classes is None else int(request.num_classes)
    if size < 1 or classes < 2:
        raise DatasetArgumentError(f"synthetic needs image_size >= 1 and num_classes >= 2, "
                                   f"got {size} and {classes}")
    counts = request.options
    if min(counts.values()) < 1:
        raise DatasetArgumentError(f"synthetic sizes must be >= 1, got {counts}")
    train, val = (make_synthetic(counts[key], size, classes, seed=request.seed, split=split)
                  for key, split in (("num_train", "train"), ("num_val", "val")))
    return tensor_loaders(request, train, val, num_classes=classes,
                          classes=[f"class_{i}" for i in range(classes)], padding=max(1, size // 8))
