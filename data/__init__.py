"""Datasets for training and evaluation: CIFAR-10/100, ImageNet folders, synthetic, and any registered one.

``create_loaders(dataset, data_dir, global_batch_size, rank=, world_size=, device=, ...)`` returns
``(train_loader, eval_loader)`` following one loader protocol (see ``data.loaders``);
``to_device(loader, images, device, memory_format)`` turns a batch into the model's input. Problems
with the data raise ``DatasetError`` with one message naming the problem and the fix.

Datasets are declared once, in the registry ``data.registry`` (:class:`DatasetSpec`,
:func:`register_dataset`, :func:`get_dataset`, :func:`dataset_names`). Importing this package
imports no torch: the names below are loaded on first use (PEP 562), so ``data.dataset_names()``
and ``data.DATASETS`` are cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from .registry import DatasetSpec, dataset_names, get_dataset, register_dataset, unregister_dataset

__all__ = [
    "DATASETS", "DEFAULT_ROOTS", "DatasetArgumentError", "DatasetError", "DatasetSpec", "LoaderRequest",
    "ShardedBatchSampler", "TensorImageLoader", "create_loaders", "dataset_names", "get_dataset",
    "register_dataset", "shard_indices", "tensor_loaders", "to_device", "unregister_dataset",
]

#: name -> the submodule that defines it (imported, with torch, on first access).
_LAZY = {
    "DatasetArgumentError": "errors", "DatasetError": "errors",
    "DATASETS": "loaders", "DEFAULT_ROOTS": "loaders", "LoaderRequest": "loaders", "create_loaders": "loaders",
    "to_device": "loaders",
    "ShardedBatchSampler": "sharding", "shard_indices": "sharding",
    "TensorImageLoader": "tensor_loader", "tensor_loaders": "tensor_loader",
}


def __getattr__(name: str) -> Any:
    if name == "DATASETS":  # the registry's names, live (no torch)
        return dataset_names()
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        if name != "DEFAULT_ROOTS":  # DEFAULT_ROOTS is computed from the registry on every access
            globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
