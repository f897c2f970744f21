"""Which samples each DDP rank sees, in which batches, for every epoch.

Every rank draws the same permutation of ``range(N)`` (a function of ``seed`` and ``epoch`` only)
and takes ``permutation[rank::world_size]``, so within an epoch the shards are disjoint and
together cover the set exactly once (shard sizes differ by at most one). A new epoch gives a new
permutation. Evaluation shards are ``range(rank, N, world_size)``: disjoint, complete, unshuffled.

Training needs the same number of steps on every rank (each step is a collective all-reduce), so a
training shard is cut into ``ceil(ceil(N / world_size) / batch_size)`` batches on every rank: full
batches, then the remainder. In the rare case where a one-sample-shorter shard would end exactly
on a batch boundary (``floor(N / W)`` a multiple of the batch size), its last full batch is split
in two halves instead; only with ``batch_size == 1`` is a sample repeated to pad it.
"""
from __future__ import annotations

import math
from typing import Iterator, List

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import DatasetArgumentError

__all__ = ["epoch_generator", "shard_indices", "ShardedBatchSampler"]


def epoch_generator(seed: int, epoch: int, *streams: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, *streams)`` (well mixed, never colliding)."""
    entropy = np.random.SeedSequence([int(seed), int(epoch), *map(int, streams)])
    state = int(entropy.generate_state(1, np.uint64)[0]) >> 1  # torch seeds are < 2**63
    return torch.Generator(device="cpu").manual_seed(state)


def shard_indices(num_samples: int, rank: int, world_size: int, *, shuffle: bool, seed: int = 0,
                  epoch: int = 0) -> torch.Tensor:
    """The sample indices (int64, CPU) of ``rank``'s shard for ``epoch``, in iteration order."""
    if shuffle:
        order = torch.randperm(num_samples, generator=epoch_generator(seed, epoch))
    else:
        order = torch.arange(num_samples)
    return order[rank::world_size]


class ShardedBatchSampler(Sampler[List[int]]):
    """Batches of indices of one rank's shard (see the module docstring); call ``set_epoch``.

    ``train=True`` shuffles per epoch and gives every rank the same number of batches;
    ``train=False`` keeps the order and cuts the shard into ``ceil(shard / batch_size)`` batches.
    Usable as a ``DataLoader`` ``batch_sampler``; ``epoch_order`` / ``batch_sizes`` serve loaders
    that slice tensors directly.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 train: bool = True, seed: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetArgumentError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise DatasetArgumentError(f"batch size must be >= 1, got {batch_size}")
        if seed < 0:
            raise DatasetArgumentError(f"seed must be >= 0, got {seed}")
        if num_samples < 1:
            raise DatasetArgumentError("cannot build batches from an empty dataset")
        if train and num_samples < world_size:
            raise DatasetArgumentError(
                f"a training set of {num_samples} samples cannot be sharded over {world_size} "
                "ranks: use fewer ranks or more samples")
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.shard_size = len(range(rank, num_samples, world_size))
        if train:
            largest_shard = math.ceil(num_samples / world_size)
            self.num_batches = math.ceil(largest_shard / batch_size)
        else:
            self.num_batches = math.ceil(self.shard_size / batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def batch_sizes(self) -> List[int]:
        """Sizes of this rank's batches; they sum to ``len(epoch_order())``."""
        sizes = [self.batch_size] * (self.shard_size // self.batch_size)
        if self.shard_size % self.batch_size:
            sizes.append(self.shard_size % self.batch_size)
        if len(sizes) < self.num_batches:  # a short training shard: one step fewer than the rest
            last = sizes.pop() if sizes else 0
            if last >= 2:
                sizes += [last - last // 2, last // 2]
            else:  # batch_size 1: repeat a sample rather than desynchronise the ranks
                sizes += [1] * (self.num_batches - len(sizes))
        return sizes

    def epoch_order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (int64, CPU), batch after batch."""
        order = shard_indices(self.num_samples, self.rank, self.world_size, shuffle=self.train,
                              seed=self.seed, epoch=self.epoch)
        missing = sum(self.batch_sizes()) - len(order)
        if missing > 0:
            first = shard_indices(self.num_samples, 0, 1, shuffle=self.train, seed=self.seed,
                                  epoch=self.epoch)
            order = torch.cat([order, first[:missing]])
        return order

    def __iter__(self) -> Iterator[List[int]]:
        for batch in torch.split(self.epoch_order(), self.batch_sizes()):
            yield batch.tolist()


class ShardedLoaderMixin:
    """The loader protocol's epoch/length part, delegated to ``self.sampler`` (a :class:`ShardedBatchSampler`)."""

    sampler: ShardedBatchSampler

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (its shard)."""
        return self.sampler.shard_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)
