"""Datasets for training and evaluation: CIFAR-10/100, ImageNet folders, synthetic.

``create_loaders(dataset, data_dir, global_batch_size, rank=, world_size=, device=, ...)`` returns
``(train_loader, eval_loader)`` following one loader protocol (see ``data.loaders``);
``to_device(loader, images, device, memory_format)`` turns a batch into the model's input. Problems
with the data raise ``DatasetError`` with one message naming the problem and the fix.
"""
from .errors import DatasetArgumentError, DatasetError
from .loaders import DATASETS, DEFAULT_ROOTS, create_loaders, to_device
from .sharding import ShardedBatchSampler, shard_indices
from .tensor_loader import TensorImageLoader

__all__ = [
    "DATASETS", "DEFAULT_ROOTS", "DatasetArgumentError", "DatasetError", "ShardedBatchSampler",
    "TensorImageLoader", "create_loaders", "shard_indices", "to_device",
]
