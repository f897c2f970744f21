"""ImageNet-style class folders (``<root>/train/<class>/*``, ``<root>/val/<class>/*``).

The input pipeline keeps images in uint8 until they are on the training device:

* workers read a file, decode it (``--decode cpu``: ``torchvision.io``, libjpeg-turbo) and make
  the crop: training ``RandomResizedCrop(size)`` (scale (0.08, 1), ratio (3/4, 4/3)) + horizontal
  flip, evaluation ``Resize(size * 256 / 224)`` + ``CenterCrop(size)``; batches are collated as
  uint8 ``(B, 3, size, size)``, a quarter of the float32 bytes to pin and copy;
* ``--decode gpu``: workers only read the bytes and draw the crop parameters; the batch is decoded
  by ``torchvision.io.decode_jpeg(list, device="cuda")`` and cropped on the GPU (``data.decode``);
* ``loader.device_transform(images, device, memory_format)`` (what ``data.to_device`` calls) moves
  a batch to the device, decodes it there in GPU mode, converts it to float32 in
  ``memory_format`` and normalises it with the ImageNet mean and std: once per batch.

Batches are sharded over DDP ranks by ``ShardedBatchSampler`` (disjoint shards that cover the set
exactly once per epoch, the same number of training steps on every rank). Determinism: the crop
and flip of a sample are drawn from a generator seeded by ``(seed, epoch, sample index)``, so the
augmentation is the same for any number of workers, ranks or processes, and a resumed run sees
the crops an uninterrupted one would.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import normalization_affine
from .decode import (DECODE_MODES, JPEG_MAGIC, EncodedBatch, crop_eval, crop_train, decode_batch, decode_rgb,
                     image_size_from_header, random_resized_crop_box, read_file_bytes,
                     sample_generator)
from .errors import DatasetArgumentError, DatasetError
from .registry import IMAGENET_MEAN, IMAGENET_STD
from .sharding import ShardedBatchSampler, ShardedLoaderMixin

if TYPE_CHECKING:
    from .loaders import LoaderRequest

__all__ = ["DECODE_MODES", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderLoader", "ImageFiles",
           "create_imagefolder_loaders", "build_loaders"]

logger = logging.getLogger(__name__)

Normalization = Union[float, Sequence[float]]

Batch = Union[torch.Tensor, EncodedBatch]


class ImageFiles(Dataset):
    """The per-sample work of the workers; items are keyed by ``(sample index, epoch)``.

    ``decode="cpu"``: ``(uint8 (3, S, S) crop, label)``. ``decode="gpu"``: ``(payload, params,
    path, label)`` with the JPEG's bytes (or the decoded image of a non-JPEG file) and the crop
    row ``top, left, h, w, flip`` (see ``data.decode.EncodedBatch``).
    """

    def __init__(self, samples: List[Tuple[str, int]], *, train: bool, image_size: int,
                 seed: int, decode: str) -> None:
        self.samples = samples
        self.train = train
        self.image_size = image_size
        self.seed = seed
        self.decode = decode

    def __len__(self) -> int:
        return len(self.samples)

    def _crop_params(self, height: int, width: int, index: int, epoch: int) -> Tuple[tuple, bool]:
        rng = sample_generator(self.seed, epoch, index)
        box = random_resized_crop_box(height, width, rng)
        return box, bool(rng.random() < 0.5)

    def __getitem__(self, key: Tuple[int, int]) -> tuple:
        index, epoch = key
        path, label = self.samples[index]
        data = read_file_bytes(path)
        if self.decode == "gpu":
            return self._encoded_item(data, path, index, epoch) + (label,)
        image = decode_rgb(data, path)
        if not self.train:
            return crop_eval(image, self.image_size), label
        box, flip = self._crop_params(image.shape[1], image.shape[2], index, epoch)
        return crop_train(image, box, flip, self.image_size), label

    def _encoded_item(self, data: torch.Tensor, path: str, index: int, epoch: int) -> tuple:
        payload = None
        if bytes(data[:3].tolist()) == JPEG_MAGIC:
            try:
                height, width = image_size_from_header(data)
                payload = data
            except (OSError, ValueError, SyntaxError):
                payload = None  # unreadable header: the CPU decoder names the problem below
        if payload is None:
            payload = decode_rgb(data, path)
            height, width = payload.shape[1:]
        params = torch.zeros(5, dtype=torch.int64)
        if self.train:
            box, flip = self._crop_params(height, width, index, epoch)
            params = torch.tensor([*box, int(flip)], dtype=torch.int64)
        return payload, params, path


def collate_encoded(items: List[tuple]) -> Tuple[EncodedBatch, torch.Tensor]:
    """GPU mode: the workers' items -> ``(EncodedBatch, int64 labels)``."""
    payloads, params, paths, labels = zip(*items)
    return (EncodedBatch(list(payloads), torch.stack(params), list(paths)),
            torch.tensor(labels, dtype=torch.int64))


class _KeyedBatches:
    """The sampler's index batches as ``[(index, epoch), ...]``: persistent workers see the epoch."""

    def __init__(self, sampler: ShardedBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(index, epoch) for index in batch]


def _worker_message(message: str) -> str:
    """The one-line message of a ``DatasetError`` re-raised by ``DataLoader`` from a worker
    (``"Caught DatasetError in DataLoader worker process 0. Original Traceback ...\n...Error: msg"``)."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


class ImageFolderLoader(ShardedLoaderMixin):
    """A ``DataLoader`` over image files following the data package's loader protocol.

    Iterating yields ``(images, labels)`` with ``images`` uint8 ``(B, 3, S, S)`` (``decode="cpu"``)
    or an ``EncodedBatch`` (``decode="gpu"``); ``device_transform`` turns either into the model's
    float32 input on the device.
    """

    def __init__(self, dataset: Any, classes: List[str], root: Path, batch_size: int, *,
                 train: bool, rank: int, world_size: int, seed: int, workers: int,
                 device: torch.device, image_size: int, decode: str = "cpu",
                 mean: Normalization = IMAGENET_MEAN, std: Normalization = IMAGENET_STD) -> None:
        if decode not in DECODE_MODES:
            raise DatasetArgumentError(f"unknown decode mode {decode!r}; choose one of "
                                       f"{', '.join(DECODE_MODES)}")
        self.files = ImageFiles(dataset.samples, train=train, image_size=image_size, seed=seed,
                                decode=decode)
        self.root = root
        self.sampler = ShardedBatchSampler(len(self.files), batch_size, rank=rank,
                                           world_size=world_size, train=train, seed=seed)
        self.loader = DataLoader(self.files, batch_sampler=_KeyedBatches(self.sampler),
                                 num_workers=workers,
                                 collate_fn=collate_encoded if decode == "gpu" else None,
                                 pin_memory=device.type == "cuda" and decode == "cpu",
                                 persistent_workers=workers > 0)
        self.train = train
        self.decode = decode
        self.batch_size = batch_size
        self.image_size = image_size
        self.classes: List[str] = list(classes)
        self.num_classes = len(self.classes)
        self.mean, self.std = mean, std
        self._affine: dict = {}

    def __iter__(self) -> Iterator[Tuple[Batch, torch.Tensor]]:
        try:
            yield from self.loader
        except DatasetError as exc:  # from a worker: its message holds the worker's traceback
            raise type(exc)(_worker_message(str(exc))) from None

    def device_transform(self, images: Batch, device: Union[str, torch.device],
                         memory_format: torch.memory_format = torch.contiguous_format
                         ) -> torch.Tensor:
        """A batch from this loader -> float32 ``(x / 255 - mean) / std`` on ``device`` in
        ``memory_format`` (decoding and cropping it there first in GPU mode)."""
        device = torch.device(device)
        if isinstance(images, EncodedBatch):
            images = decode_batch(images, device, train=self.train, size=self.image_size)
        else:
            images = images.to(device, non_blocking=True)
        images = images.contiguous(memory_format=memory_format)
        key = str(device)
        if key not in self._affine:
            self._affine[key] = normalization_affine(self.mean, self.std, 3, device)
        scale, shift = self._affine[key]
        return images.float().mul_(scale).sub_(shift)  # .float() keeps memory_format

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"ImageFolderLoader({kind}, root={self.root}, samples={self.num_samples}, "
                f"batches={len(self)}, batch_size={self.batch_size}, decode={self.decode})")


def _image_folder(folder: Path, root: Path) -> Any:
    from torchvision.datasets import ImageFolder

    hint = (f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (the val "
            "images sorted into class folders, as torchvision's ImageNet preparation does); "
            "point the data directory at such a root or `ln -s` it to imagenet_data")
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist: {hint}")
    if not any(entry.is_dir() for entry in folder.iterdir()):
        raise DatasetError(f"image folder {folder} is empty (no class folders): {hint}")
    try:
        return ImageFolder(str(folder))  # only its file list and classes: decoding is ImageFiles's
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"image folder {folder} has no usable images ({exc}): {hint}") from None


def create_imagefolder_loaders(root: Path, batch_size: int, eval_batch_size: int, *, rank: int,
                               world_size: int, device: torch.device, workers: int, seed: int,
                               image_size: int = 224, num_classes: Optional[int] = None,
                               decode: str = "cpu", mean: Normalization = IMAGENET_MEAN,
                               std: Normalization = IMAGENET_STD
                               ) -> Tuple[ImageFolderLoader, ImageFolderLoader]:
    """Train and val loaders over ``root/train`` and ``root/val`` (same class folders required),
    normalising with ``mean`` / ``std`` (default: ImageNet's).

    ``decode``: ``"cpu"`` (workers decode and crop) or ``"gpu"`` (``device`` decodes the batch;
    also runs with a CPU ``device``, where it is the CPU mode's work done in the main process).
    """
    root = Path(root).expanduser().absolute()
    train_set = _image_folder(root / "train", root)
    val_set = _image_folder(root / "val", root)
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
    logger.info("ImageFolder %s: %d train / %d val images, %d classes, decode on %s", root,
                len(train_set), len(val_set), len(train_set.classes), decode)
    common = dict(rank=rank, world_size=world_size, seed=seed, workers=workers, device=device,
                  image_size=image_size, decode=decode, mean=mean, std=std)
    return (ImageFolderLoader(train_set, train_set.classes, root, batch_size, train=True,
                              **common),
            ImageFolderLoader(val_set, val_set.classes, root, eval_batch_size, train=False,
                              **common))


def build_loaders(request: "LoaderRequest") -> Tuple[ImageFolderLoader, ImageFolderLoader]:
    """The loader factory of ``imagenet`` (``data.registry``), and of any class-folder dataset that
    registers it: ``<data_dir>/train`` and ``<data_dir>/val``, crops of ``request.image_size`` (default:
    the spec's input size), normalised with the spec's mean / std, decoded where ``request.decode`` says."""
    spec = request.spec
    if request.decode == "gpu" and request.device.type != "cuda":
        raise DatasetArgumentError(f"decoding on the GPU needs a CUDA device, the device is "
                                   f"{request.device}; use decode='cpu' (--decode cpu)")
    if request.data_dir is None:
        raise DatasetArgumentError(f"dataset {spec.name!r} is read from class folders and has no default "
                                   "folder; pass its data directory (--data-dir)")
    size = request.image_size or spec.input_size or 224
    return create_imagefolder_loaders(Path(request.data_dir), request.batch_size, request.eval_batch_size,
                                      device=request.device, workers=request.workers, image_size=size,
                                      num_classes=request.num_classes, decode=request.decode,
                                      mean=spec.mean, std=spec.std, **request.shard)
