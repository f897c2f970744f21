"""``create_loaders``: the one entry point the training engine calls, for every dataset.

Both returned loaders follow one protocol: ``set_epoch(epoch)``; ``len(loader)`` is the number of
batches per epoch on this rank; iterating yields ``(images, labels)``, and
``to_device(loader, images, device, memory_format)`` makes ``images`` the model's input (float32
NCHW normalised, on ``device``, in ``memory_format``); attributes ``num_classes``, ``image_size``,
``num_samples`` (on this rank), ``batch_size`` (per rank). The train loader reshuffles every epoch
and gives each rank a disjoint shard (every rank runs the same number of steps); the eval loader's
shards are disjoint and cover the set exactly once. CIFAR and synthetic batches are produced
normalised directly on ``device``; ImageNet batches are uint8 (or, decoding on the GPU, file
bytes) until ``to_device`` (``data.imagenet``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Tuple, Union

import torch

from .cifar import CIFAR_SPECS, Downloader, load_cifar
from .errors import DatasetArgumentError
from .imagenet import DECODE_MODES, create_imagefolder_loaders
from .synthetic import make_synthetic
from .tensor_loader import TensorImageLoader

__all__ = ["DATASETS", "DEFAULT_ROOTS", "create_loaders", "to_device"]

DATASETS = ("cifar10", "cifar100", "imagenet", "synthetic")
DEFAULT_ROOTS = {"cifar10": "cifar10_data", "cifar100": "cifar100_data",
                 "imagenet": "imagenet_data"}
CIFAR_MEAN = CIFAR_STD = 0.5  # the original recipe: normalise with mean 0.5, std 0.5
SYNTHETIC_DEFAULTS = {"num_train": 1280, "num_val": 256}


def _check_arguments(dataset: str, global_batch_size: int, rank: int, world_size: int,
                     eval_batch_size: Any, workers: int, seed: int,
                     dataset_kwargs: dict) -> None:
    if dataset not in DATASETS:
        raise DatasetArgumentError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetArgumentError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise DatasetArgumentError(
            f"the global batch size ({global_batch_size}) must be a positive multiple of the "
            f"number of processes ({world_size}); change the batch size or the process count")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise DatasetArgumentError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    if workers < 0:
        raise DatasetArgumentError(f"workers must be >= 0, got {workers}")
    if seed < 0:
        raise DatasetArgumentError(f"seed must be >= 0, got {seed}")
    allowed = set(SYNTHETIC_DEFAULTS) if dataset == "synthetic" else set()
    unknown = sorted(set(dataset_kwargs) - allowed)
    if unknown:
        raise DatasetArgumentError(
            f"unexpected options {unknown} for dataset {dataset!r}"
            + (f"; it accepts {sorted(allowed)}" if allowed else "; it takes none"))


def _check_fixed(dataset: str, name: str, value: Any, fixed: int) -> None:
    if value is not None and value != fixed:
        raise DatasetArgumentError(
            f"dataset {dataset!r} has {name} {fixed}, but {name}={value} was requested; "
            f"leave {name} unset or choose a dataset that has it")


def create_loaders(dataset: str, data_dir: Union[str, "os.PathLike[str]", None] = None,
                   global_batch_size: int = 128, *, rank: int = 0, world_size: int = 1,
                   device: Union[str, torch.device] = "cpu", workers: int = 4, seed: int = 0,
                   eval_batch_size: Union[int, None] = None, image_size: Union[int, None] = None,
                   num_classes: Union[int, None] = None,
                   download: Union[bool, Downloader] = True, decode: str = "cpu",
                   **dataset_kwargs: int) -> Tuple[Any, Any]:
    """Build ``(train_loader, eval_loader)`` for ``dataset`` on this DDP ``rank``.

    ``dataset`` is one of ``DATASETS``; ``data_dir`` defaults to ``cifar10_data``,
    ``cifar100_data`` or ``imagenet_data`` in the working directory (ignored by ``synthetic``).
    The per-rank batch size is ``global_batch_size // world_size``; ``eval_batch_size`` is per
    rank and defaults to the training one. ``workers`` only matters for ImageNet (CIFAR and
    synthetic need none). ``image_size`` / ``num_classes`` choose the synthetic set's shape
    (defaults 32 and 10) and, if given for a real dataset, must match it (ImageNet: the crop
    size, default 224). Synthetic also takes ``num_train`` / ``num_val`` (defaults 1280 / 256).
    ``download``: fetch missing CIFAR files through torchvision (``False`` disables it; a
    callable ``(spec, parent_dir)`` replaces the downloader). ``decode`` (ImageNet only): where
    JPEGs are decoded, ``"cpu"`` (the workers) or ``"gpu"`` (the CUDA ``device``, per batch).
    Raises ``DatasetError`` (``DatasetArgumentError`` for invalid arguments).
    """
    _check_arguments(dataset, global_batch_size, rank, world_size, eval_batch_size, workers,
                     seed, dataset_kwargs)
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise DatasetArgumentError(f"invalid device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DatasetArgumentError(f"device {device} requested but CUDA is not available; "
                                   "use device='cpu'")
    if decode not in DECODE_MODES:
        raise DatasetArgumentError(f"unknown decode mode {decode!r}; choose one of "
                                   f"{', '.join(DECODE_MODES)}")
    if decode == "gpu" and dataset == "imagenet" and device.type != "cuda":
        raise DatasetArgumentError(f"decoding on the GPU needs a CUDA device, the device is "
                                   f"{device}; use decode='cpu' (--decode cpu)")
    batch_size = global_batch_size // world_size
    eval_batch_size = eval_batch_size or batch_size
    shard = dict(rank=rank, world_size=world_size, seed=seed)

    if dataset == "imagenet":
        root = Path(data_dir if data_dir is not None else DEFAULT_ROOTS[dataset])
        return create_imagefolder_loaders(root, batch_size, eval_batch_size, device=device,
                                          workers=workers, image_size=image_size or 224,
                                          num_classes=num_classes, decode=decode, **shard)

    if dataset == "synthetic":
        size = 32 if image_size is None else int(image_size)
        classes = 10 if num_classes is None else int(num_classes)
        if size < 1 or classes < 2:
            raise DatasetArgumentError(f"synthetic needs image_size >= 1 and num_classes >= 2, "
                                       f"got {size} and {classes}")
        counts = {**SYNTHETIC_DEFAULTS, **dataset_kwargs}
        if min(counts.values()) < 1:
            raise DatasetArgumentError(f"synthetic sizes must be >= 1, got {counts}")
        splits = [make_synthetic(counts[key], size, classes, seed=seed, split=split)
                  for key, split in (("num_train", "train"), ("num_val", "val"))]
        padding, names = max(1, size // 8), [f"class_{i}" for i in range(classes)]
    else:
        spec = CIFAR_SPECS[dataset]
        _check_fixed(dataset, "image_size", image_size, 32)
        _check_fixed(dataset, "num_classes", num_classes, spec.num_classes)
        root = data_dir if data_dir is not None else DEFAULT_ROOTS[dataset]
        loaded = [load_cifar(dataset, root, train=train, download=download)
                  for train in (True, False)]
        splits = [(split.images, split.labels) for split in loaded]
        classes, padding, names = spec.num_classes, 4, loaded[0].classes

    (train_x, train_y), (val_x, val_y) = splits
    common = dict(num_classes=classes, padding=padding, mean=CIFAR_MEAN, std=CIFAR_STD,
                  classes=names, **shard)
    train = TensorImageLoader(train_x.to(device), train_y.to(device), batch_size, train=True,
                              **common)
    val = TensorImageLoader(val_x.to(device), val_y.to(device), eval_batch_size, train=False,
                            **common)
    return train, val


def to_device(loader: Any, images: Any, device: Union[str, torch.device],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A batch's images as the model's input: ``loader.device_transform`` where the loader has one
    (ImageNet: uint8 -> float32, normalised, on ``device``, once per batch), else
    ``images.to(device).contiguous(memory_format)`` (CIFAR, synthetic, any iterable of tensors)."""
    transform = getattr(loader, "device_transform", None)
    if transform is not None:
        return transform(images, device, memory_format)
    return images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
