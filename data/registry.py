"""The dataset registry: every fact about a dataset, declared once in its :class:`DatasetSpec`.

A dataset is its name, the side of its square images, its class count, its normalisation, the
folder it is read from by default, the extra keyword options its loader takes, and its loader
factory, named by a dotted path ``"package.module:function"`` that is imported on first use, so
this module (and :func:`dataset_names`, which ``do_acnet.py -h`` lists) imports no torch.
Everything else reads the registry at call time: ``data.create_loaders`` (which factory builds the
loaders, the default folder), ``do_acnet.py --dataset`` (the choices, which archs a dataset fits)
and the arch specs of ``constructor`` (an arch's input size and class count come from the
dataset it is defined for). :func:`register_dataset` at run time adds a dataset everywhere.

The factory contract: ``factory(request: data.LoaderRequest) -> (train_loader, eval_loader)``,
two loaders of the protocol in ``data.loaders`` (``data.tensor_loaders`` builds them from
uint8 image tensors), raising ``data.DatasetError`` with one line naming the problem and the fix.

Adding a dataset is one module and one line: ``data/mine.py`` with ``build_loaders(request)`` that
reads ``request.data_dir`` and returns ``data.tensor_loaders(request, (train_x, train_y), (val_x,
val_y), num_classes=...)`` (or any loaders of the protocol), and one :class:`DatasetSpec` below
(or ``register_dataset(...)`` at run time): ``DatasetSpec("mine", "data.mine:build_loaders",
input_size=32, num_classes=10, default_dir="mine_data")``. A class-folder dataset needs no module:
its spec names ``"data.imagenet:build_loaders"`` with its own mean, std and folder.
``tests/test_new_dataset.py`` registers one and trains on it.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

__all__ = ["DatasetSpec", "DATASET_REGISTRY", "register_dataset", "unregister_dataset", "get_dataset",
           "dataset_names", "datasets_for_input_size", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN",
           "IMAGENET_STD"]

Normalization = Union[float, Tuple[float, ...]]
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")

CIFAR_MEAN = CIFAR_STD = 0.5  # the original ACNet recipe: every channel normalised with mean 0.5, std 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset. ``name``: its ``--dataset`` name (lower case); ``loader``: its loader factory,
    ``"package.module:function"`` (imported when loaders are built) or the callable itself;
    ``input_size``: the side of its square images (``None``: made at any size asked, as the synthetic
    set is); ``num_classes``: its class count (``None``: chosen by the caller); ``mean`` / ``std``: the
    per-channel normalisation ``(x / 255 - mean) / std`` (a float: every channel); ``default_dir``: the
    folder it is read from when no data directory is given, relative to the working directory (``None``:
    it has no files); ``options``: the extra keyword options of ``data.create_loaders`` it takes, with
    their defaults; ``description``: one line for the help."""

    name: str
    loader: Union[str, Callable[..., Any]] = field(compare=False)
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    mean: Normalization = CIFAR_MEAN
    std: Normalization = CIFAR_STD
    default_dir: Optional[str] = None
    options: Mapping[str, int] = field(default_factory=dict, hash=False)
    description: str = ""

    def factory(self) -> Callable[..., Any]:
        """The loader factory (imports its module the first time); a bad path is a ``ValueError``."""
        if callable(self.loader):
            return self.loader
        module_name, _, attribute = self.loader.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(f"dataset {self.name!r}: its loader {self.loader!r} cannot be imported ({exc}); "
                             "register it with 'package.module:function'") from None
        if not callable(function):
            raise ValueError(f"dataset {self.name!r}: its loader {self.loader!r} is not a function")
        return function


def _check(spec: DatasetSpec) -> None:
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset takes a DatasetSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        raise ValueError(f"dataset name must be a non-empty lower-case str of letters, digits, '_', '-' "
                         f"(it names run folders), got {spec.name!r}")
    if not callable(spec.loader) and (not isinstance(spec.loader, str) or spec.loader.count(":") != 1):
        raise ValueError(f"dataset {spec.name!r}: loader must be 'package.module:function' or a callable, "
                         f"got {spec.loader!r}")
    for key in ("input_size", "num_classes"):
        value = getattr(spec, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"dataset {spec.name!r}: {key} must be a positive int or None, got {value!r}")


#: The registry: dataset name -> :class:`DatasetSpec` (read it at call time; :func:`register_dataset` adds one).
DATASET_REGISTRY: Dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("cifar10", "data.cifar:build_loaders", input_size=32, num_classes=10, default_dir="cifar10_data",
                description="CIFAR-10, the official python batches (downloaded when missing)"),
    DatasetSpec("cifar100", "data.cifar:build_loaders", input_size=32, num_classes=100, default_dir="cifar100_data",
                description="CIFAR-100, the official python batches (downloaded when missing)"),
    DatasetSpec("imagenet", "data.imagenet:build_loaders", input_size=224, num_classes=1000, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, default_dir="imagenet_data",
                description="ImageNet-style class folders <dir>/train/<class>/*, <dir>/val/<class>/*"),
    DatasetSpec("synthetic", "data.synthetic:build_loaders", options={"num_train": 1280, "num_val": 256},
                description="generated, learnable images of any size and class count (no files)"),
)}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASET_REGISTRY` (every tool sees it from then on); a taken name is a
    ``ValueError`` unless ``replace``."""
    _check(spec)
    if spec.name in DATASET_REGISTRY and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass replace=True to replace it)")
    DATASET_REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> DatasetSpec:
    """Remove ``name`` from :data:`DATASET_REGISTRY` (the inverse of :func:`register_dataset`)."""
    spec = get_dataset(name)
    del DATASET_REGISTRY[name]
    return spec


def dataset_names() -> Tuple[str, ...]:
    """The registered dataset names, in registry order (torch-free: ``do_acnet.py -h`` lists them)."""
    return tuple(DATASET_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; an unknown name is a ``ValueError`` listing the valid ones."""
    try:
        return DATASET_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_REGISTRY)}") from None


def datasets_for_input_size(input_size: int) -> Tuple[str, ...]:
    """The datasets an arch taking ``input_size`` x ``input_size`` inputs can train on: those whose
    images have that side or any side (``input_size=None``). An input size no dataset declares is not
    checked: every dataset is returned."""
    specs = list(DATASET_REGISTRY.values())
    if not any(spec.input_size == input_size for spec in specs):
        return tuple(spec.name for spec in specs)
    return tuple(spec.name for spec in specs if spec.input_size in (None, input_size))
