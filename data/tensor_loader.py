"""The fast path: a whole uint8 image set held as one tensor on the training device.

Each batch is gathered, augmented (random crop + flip, ``data.augment``) and normalised on the
device in a few tensor operations: no PIL, no worker processes, no host-to-device image copies.
The epoch's order comes from ``ShardedBatchSampler`` and the augmentation parameters from a CPU
generator seeded by ``(seed, epoch, rank)``, so a run is reproducible and device-independent.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Tuple, Union

import torch

from .augment import (CropFlip, apply_affine, normalization_affine, sample_crop_flip,
                      with_zero_sentinel)
from .sharding import ShardedBatchSampler, ShardedLoaderMixin, epoch_generator

if TYPE_CHECKING:
    from .loaders import LoaderRequest

__all__ = ["TensorImageLoader", "tensor_loaders"]

_AUGMENT_STREAM = 1  # generator stream of the augmentation parameters (0: the permutation)
_CPU_CHUNK_VALUES = 24576  # < 32768, torch's grain size for parallelising an element-wise op


class TensorImageLoader(ShardedLoaderMixin):
    """Loader protocol over in-memory tensors: ``set_epoch``, ``len``, ``(images, labels)`` batches.

    ``images`` is uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``, both already on the
    device the batches are wanted on. ``train=True``: per-epoch reshuffled shard, equal batch
    count on every rank, random crop (``padding``) + flip; ``train=False``: fixed shard, no
    augmentation. Yields float32 ``(x / 255 - mean) / std`` and int64 labels on that device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 num_classes: int, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, padding: int = 4,
                 mean: Union[float, Sequence[float]] = 0.5,
                 std: Union[float, Sequence[float]] = 0.5,
                 classes: Optional[Sequence[str]] = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 (N, C, H, W) tensor")
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must be a (N,) tensor matching images")
        self.num_images, self.channels, self.height, self.width = images.shape
        self.flat_images = with_zero_sentinel(images)  # (N, C, H*W + 1), see data.augment
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.sampler = ShardedBatchSampler(images.shape[0], batch_size, rank=rank,
                                           world_size=world_size, train=train, seed=seed)
        self.train = train
        self.padding = padding
        self.mean = mean
        self.std = std
        self._scale, self._shift = normalization_affine(mean, std, self.channels,
                                                        images.device)
        self._crop_flip = CropFlip(self.height, self.width, padding, images.device)
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else None
        self.image_size = self.width
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.flat_images.device

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        sizes = self.sampler.batch_sizes()
        order = self.sampler.epoch_order().to(self.device, non_blocking=True)
        params = None
        if self.train:
            generator = epoch_generator(self.sampler.seed, self.sampler.epoch, _AUGMENT_STREAM,
                                        self.sampler.rank)
            params = torch.stack(sample_crop_flip(len(order), self.padding, generator), dim=1)
            params = params.to(self.device, non_blocking=True)  # (N, 3): top, left, flip
        start = 0
        for size in sizes:
            indices = order[start:start + size]
            batch_params = params[start:start + size] if params is not None else None
            yield self._images(indices, batch_params), self.labels.index_select(0, indices)
            start += size

    def _images(self, indices: torch.Tensor, params: Optional[torch.Tensor]) -> torch.Tensor:
        """The normalised (and, with ``params``, augmented) images of ``indices``.

        On the CPU the batch is assembled in chunks of at most ``_CPU_CHUNK_VALUES`` values,
        below torch's parallel grain size, so every kernel runs on the calling thread: these
        copies are memory-bound, and waiting for the intra-op thread pool on a busy or shared
        CPU costs far more than it gains (measured in ``benchmarks/bench_data.py``).
        """
        out = torch.empty(len(indices), self.channels, self.height, self.width,
                          dtype=torch.float32, device=self.device)
        values_per_image = self.channels * self.height * self.width
        step = len(indices) if self.device.type != "cpu" else max(
            1, _CPU_CHUNK_VALUES // values_per_image)
        for start in range(0, len(indices), step):
            chunk = slice(start, start + step)
            flat = self.flat_images.index_select(0, indices[chunk])
            if params is None:
                images = flat[:, :, :-1].reshape(len(flat), -1, self.height, self.width)
            else:
                top, left, flip = params[chunk].unbind(1)
                images = self._crop_flip(flat, top, left, flip.bool())
            apply_affine(images, self._scale, self._shift, out=out[chunk])
        return out

    def __repr__(self) -> str:
        kind = "train" if self.train else "eval"
        return (f"TensorImageLoader({kind}, samples={self.num_samples}, "
                f"batches={len(self)}, batch_size={self.batch_size}, device={self.device})")


def tensor_loaders(request: "LoaderRequest", train: Tuple[torch.Tensor, torch.Tensor],
                   val: Tuple[torch.Tensor, torch.Tensor], *, num_classes: int,
                   classes: Optional[Sequence[str]] = None, padding: Optional[int] = None
                   ) -> Tuple[TensorImageLoader, TensorImageLoader]:
    """``(train_loader, eval_loader)`` over in-memory sets, for a dataset's loader factory.

    ``train`` / ``val``: ``(images, labels)``, uint8 ``(N, C, H, W)`` and integer ``(N,)``; they
    are moved to ``request.device`` once. Batches are normalised with the spec's ``mean`` /
    ``std``; training batches are randomly cropped with ``padding`` (default ``max(1, H // 8)``:
    4 for 32x32 images) and flipped. The ranks, seed and batch sizes come from ``request``.
    """
    images = train[0]
    if padding is None:
        padding = max(1, int(images.shape[-2]) // 8) if images.dim() == 4 else 1
    common = dict(num_classes=num_classes, padding=padding, mean=request.spec.mean,
                  std=request.spec.std, classes=classes, **request.shard)
    device = request.device
    return (TensorImageLoader(train[0].to(device), train[1].to(device), request.batch_size,
                              train=True, **common),
            TensorImageLoader(val[0].to(device), val[1].to(device), request.eval_batch_size,
                              train=False, **common))
