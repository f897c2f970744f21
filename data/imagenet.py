"""ImageNet-style class folders (``<root>/train/<class>/*``, ``<root>/val/<class>/*``).

torchvision ``ImageFolder`` with the standard transforms (train: RandomResizedCrop + flip; val:
Resize(size * 256 / 224) + CenterCrop), a ``DataLoader`` with worker processes, pinned memory
(when the device is CUDA) and persistent workers, sharded over DDP ranks by
``ShardedBatchSampler``: DistributedSampler's per-epoch reshuffle, but disjoint shards that cover
the set exactly once (no padding duplicates) and the same number of training steps on every rank.
Random augmentation runs in the workers and is not bit-reproducible across worker counts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from .errors import DatasetArgumentError, DatasetError
from .sharding import ShardedBatchSampler, ShardedLoaderMixin

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderLoader", "create_imagefolder_loaders",
           "load_rgb_image"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb_image(path: str) -> Image.Image:
    """Decode one image file as RGB; a corrupt file raises ``DatasetError`` naming it."""
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); the file "
                           "is corrupt or not an image: replace or delete it") from None


class ImageFolderLoader(ShardedLoaderMixin):
    """A ``DataLoader`` over an ``ImageFolder`` wrapped to the data package's loader protocol."""

    def __init__(self, dataset: Any, batch_size: int, *, train: bool, rank: int, world_size: int,
                 seed: int, workers: int, device: torch.device, image_size: int) -> None:
        self.dataset = dataset
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank,
                                           world_size=world_size, train=train, seed=seed)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0)
        self.train = train
        self.batch_size = batch_size
        self.image_size = image_size
        self.classes: List[str] = list(dataset.classes)
        self.num_classes = len(self.classes)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"ImageFolderLoader({kind}, root={self.dataset.root}, samples={self.num_samples}, "
                f"batches={len(self)}, batch_size={self.batch_size})")


def _transforms(image_size: int) -> Tuple[Any, Any]:
    from torchvision import transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize])
    val = transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
        transforms.ToTensor(), normalize])
    return train, val


def _image_folder(folder: Path, transform: Any, root: Path) -> Any:
    from torchvision.datasets import ImageFolder

    hint = (f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (the val "
            "images sorted into class folders, as torchvision's ImageNet preparation does); "
            "point the data directory at such a root or `ln -s` it to imagenet_data")
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist: {hint}")
    if not any(entry.is_dir() for entry in folder.iterdir()):
        raise DatasetError(f"image folder {folder} is empty (no class folders): {hint}")
    try:
        return ImageFolder(str(folder), transform=transform, loader=load_rgb_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"image folder {folder} has no usable images ({exc}): {hint}") from None


def create_imagefolder_loaders(root: Path, batch_size: int, eval_batch_size: int, *, rank: int,
                               world_size: int, device: torch.device, workers: int, seed: int,
                               image_size: int = 224, num_classes: Optional[int] = None
                               ) -> Tuple[ImageFolderLoader, ImageFolderLoader]:
    """Train and val loaders over ``root/train`` and ``root/val`` (same class folders required)."""
    train_tf, val_tf = _transforms(image_size)
    root = Path(root).expanduser().absolute()
    train_set = _image_folder(root / "train", train_tf, root)
    val_set = _image_folder(root / "val", val_tf, root)
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))[:5]
        only_val = sorted(set(val_set.classes) - set(train_set.classes))[:5]
        raise DatasetError(
            f"{root}: train and val have different class folders ({len(train_set.classes)} vs "
            f"{len(val_set.classes)}; only in train: {only_train}, only in val: {only_val}); "
            "both splits need the same class folders")
    if num_classes is not None and num_classes != len(train_set.classes):
        raise DatasetArgumentError(
            f"{root} has {len(train_set.classes)} classes but num_classes={num_classes} was "
            "requested; pass the matching number or another data directory")
    logger.info("ImageFolder %s: %d train / %d val images, %d classes", root, len(train_set),
                len(val_set), len(train_set.classes))
    common = dict(rank=rank, world_size=world_size, seed=seed, workers=workers, device=device,
                  image_size=image_size)
    return (ImageFolderLoader(train_set, batch_size, train=True, **common),
            ImageFolderLoader(val_set, eval_batch_size, train=False, **common))
