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

Which datasets exist and how each is built is the registry's (``data.registry``): this module
checks the arguments every dataset shares, then calls the dataset's factory with a
:class:`LoaderRequest`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .cifar import Downloader
from .decode import DECODE_MODES
from .errors import DatasetArgumentError
from .registry import CIFAR_MEAN, CIFAR_STD, DatasetSpec, dataset_names, get_dataset  # noqa: F401 (CIFAR_*: their former home)

__all__ = ["DATASETS", "DEFAULT_ROOTS", "LoaderRequest", "create_loaders", "to_device"]

PathLike = Union[str, "os.PathLike[str]"]


def __getattr__(name: str) -> Any:  # the registry's live contents under their former names
    if name == "DATASETS":
        return dataset_names()
    if name == "DEFAULT_ROOTS":
        return {n: get_dataset(n).default_dir for n in dataset_names() if get_dataset(n).default_dir}
    if name == "SYNTHETIC_DEFAULTS":
        return dict(get_dataset("synthetic").options)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class LoaderRequest:
    """What a dataset's loader factory (``DatasetSpec.loader``) is asked to build, after
    :func:`create_loaders` checked every argument that is not the dataset's own.

    ``data_dir``: the directory given, else the spec's ``default_dir`` (``None`` when it has none);
    ``batch_size`` / ``eval_batch_size``: per rank; ``image_size`` / ``num_classes``: what the caller
    asks for (``None``: the dataset's own); ``options``: the spec's ``options`` updated with the
    caller's; ``download`` (CIFAR) and ``decode`` (ImageNet) as :func:`create_loaders` takes them.
    """

    spec: DatasetSpec
    data_dir: Optional[PathLike]
    batch_size: int
    eval_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 0
    image_size: Optional[int] = None
    num_classes: Optional[int] = None
    download: Union[bool, Downloader] = True
    decode: str = "cpu"
    options: Dict[str, int] = field(default_factory=dict)

    @property
    def shard(self) -> Dict[str, int]:
        """``rank``, ``world_size`` and ``seed``: the sharding keywords of the loaders."""
        return dict(rank=self.rank, world_size=self.world_size, seed=self.seed)

    def check_fixed(self, name: str, fixed: int) -> None:
        """Refuse a requested ``image_size`` / ``num_classes`` the dataset does not have."""
        value = getattr(self, name)
        if value is not None and value != fixed:
            raise DatasetArgumentError(
                f"dataset {self.spec.name!r} has {name} {fixed}, but {name}={value} was requested; "
                f"leave {name} unset or choose a dataset that has it")


def _check_arguments(dataset: str, global_batch_size: int, rank: int, world_size: int,
                     eval_batch_size: Any, workers: int, seed: int,
                     dataset_kwargs: dict) -> DatasetSpec:
    try:
        spec = get_dataset(dataset)
    except ValueError as exc:
        raise DatasetArgumentError(str(exc)) from None
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
    allowed = set(spec.options)
    unknown = sorted(set(dataset_kwargs) - allowed)
    if unknown:
        raise DatasetArgumentError(
            f"unexpected options {unknown} for dataset {dataset!r}"
            + (f"; it accepts {sorted(allowed)}" if allowed else "; it takes none"))
    return spec


def create_loaders(dataset: str, data_dir: Optional[PathLike] = None,
                   global_batch_size: int = 128, *, rank: int = 0, world_size: int = 1,
                   device: Union[str, torch.device] = "cpu", workers: int = 4, seed: int = 0,
                   eval_batch_size: Union[int, None] = None, image_size: Union[int, None] = None,
                   num_classes: Union[int, None] = None,
                   download: Union[bool, Downloader] = True, decode: str = "cpu",
                   **dataset_kwargs: int) -> Tuple[Any, Any]:
    """Build ``(train_loader, eval_loader)`` for ``dataset`` on this DDP ``rank``.

    ``dataset`` is a registered name (``data.registry.dataset_names()``: cifar10, cifar100,
    imagenet, synthetic, and any :func:`data.registry.register_dataset` added); its
    :class:`~data.registry.DatasetSpec`'s factory builds the loaders from a :class:`LoaderRequest`.
    ``data_dir`` defaults to the spec's ``default_dir`` in the working directory (``cifar10_data``,
    ``cifar100_data``, ``imagenet_data``; ignored by ``synthetic``).
    The per-rank batch size is ``global_batch_size // world_size``; ``eval_batch_size`` is per
    rank and defaults to the training one. ``workers`` only matters for ImageNet (CIFAR and
    synthetic need none). ``image_size`` / ``num_classes`` choose the synthetic set's shape
    (defaults 32 and 10) and, if given for a real dataset, must match it (ImageNet: the crop
    size, default 224). Synthetic also takes ``num_train`` / ``num_val`` (defaults 1280 / 256):
    ``dataset_kwargs`` are the spec's ``options``.
    ``download``: fetch missing CIFAR files through torchvision (``False`` disables it; a
    callable ``(spec, parent_dir)`` replaces the downloader). ``decode`` (ImageNet only): where
    JPEGs are decoded, ``"cpu"`` (the workers) or ``"gpu"`` (the CUDA ``device``, per batch).
    Raises ``DatasetError`` (``DatasetArgumentError`` for invalid arguments).
    """
    spec = _check_arguments(dataset, global_batch_size, rank, world_size, eval_batch_size, workers,
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
    try:
        factory = spec.factory()
    except ValueError as exc:
        raise DatasetArgumentError(str(exc)) from None
    batch_size = global_batch_size // world_size
    request = LoaderRequest(
        spec, data_dir if data_dir is not None else spec.default_dir, batch_size,
        eval_batch_size or batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
        workers=workers, image_size=image_size, num_classes=num_classes, download=download,
        decode=decode, options={**spec.options, **dataset_kwargs})
    return factory(request)


def to_device(loader: Any, images: Any, device: Union[str, torch.device],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A batch's images as the model's input: ``loader.device_transform`` where the loader has one
    (ImageNet: uint8 -> float32, normalised, on ``device``, once per batch), else
    ``images.to(device).contiguous(memory_format)`` (CIFAR, synthetic, any iterable of tensors)."""
    transform = getattr(loader, "device_transform", None)
    if transform is not None:
        return transform(images, device, memory_format)
    return images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
