"""CIFAR-10 / CIFAR-100 from the official python-format folders, read safely.

Layout (the root is the folder that *contains* the batches folder, torchvision's convention; the
batches folder itself is accepted too)::

    cifar10_data/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar100_data/cifar-100-python/{train, test, meta}

The batches are pickles. They are read with ``CifarUnpickler``, which resolves only the globals
that genuine CIFAR files reference (numpy's array reconstruction, ``numpy.ndarray``,
``numpy.dtype`` and, for files re-saved by Python 3 at protocol 2, the latin-1 byte-string
codec), so a tampered file can never run code. Everything read is validated (keys, dtype, shape,
label range); any problem ends in one ``DatasetError`` naming the file and the fix.

When the folder is missing it is downloaded with torchvision's download utility into a temporary
folder beside it and moved into place only once complete (``download=False`` disables this; a
callable replaces the downloader, e.g. in tests).
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import DatasetError
from .registry import get_dataset
from .tensor_loader import TensorImageLoader, tensor_loaders

if TYPE_CHECKING:
    from .loaders import LoaderRequest

__all__ = [
    "CifarSpec", "CIFAR_SPECS", "CifarUnpickler", "CifarSplit", "resolve_cifar_folder",
    "read_cifar_batch", "load_cifar", "download_cifar", "build_loaders",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Downloader = Callable[["CifarSpec", Path], None]


@dataclass(frozen=True)
class CifarSpec:
    """What one CIFAR variant looks like on disk and where it is published."""

    name: str                      # "cifar10"
    title: str                     # "CIFAR-10"
    folder: str                    # "cifar-10-batches-py"
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    meta_file: str
    label_key: str                 # key of the labels in a batch
    label_names_key: str           # key of the class names in the meta file
    torchvision_class: str         # name of the torchvision dataset class holding the URL and md5

    @property
    def required_files(self) -> Tuple[str, ...]:
        return self.train_files + self.test_files

    @property
    def num_classes(self) -> int:
        """The class count, as the dataset registry declares it."""
        return int(get_dataset(self.name).num_classes)

    @property
    def default_root(self) -> str:
        """``cifar10_data`` ...: the registry's default folder, relative to the working directory."""
        return str(get_dataset(self.name).default_dir)


CIFAR_SPECS: Dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10", title="CIFAR-10", folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", label_names_key="label_names",
        torchvision_class="CIFAR10"),
    "cifar100": CifarSpec(
        name="cifar100", title="CIFAR-100", folder="cifar-100-python",
        train_files=("train",), test_files=("test",), meta_file="meta",
        label_key="fine_labels", label_names_key="fine_label_names",
        torchvision_class="CIFAR100"),
}

IMAGE_SHAPE = (3, 32, 32)
IMAGE_BYTES = 3 * 32 * 32


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------
def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer() -> Callable[..., Any]:
    try:
        from numpy._core.numeric import _frombuffer  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle ``bytes`` at protocol 2 (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, "
                                     f"{encoding!r}) call")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3 pickles an empty byte string at protocol 2 (no arguments)."""
    if args:
        raise pickle.UnpicklingError("unexpected bytes(...) call with arguments")
    return b""


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global that genuine CIFAR files never contain."""


class CifarUnpickler(pickle.Unpickler):
    """Unpickler admitting exactly the globals of the official CIFAR files and of their re-saves.

    Official files (Python 2, numpy 1.x): ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray``, ``numpy.dtype``. Re-saved by Python 3 + numpy 2 at protocol 2: also
    ``numpy._core.multiarray._reconstruct``, ``_codecs.encode`` (byte strings, latin-1) and
    ``__builtin__.bytes`` / ``builtins.bytes`` (the empty byte string); at protocol 5 numpy
    rebuilds arrays with ``numpy(._)core.numeric._frombuffer``. Anything else raises
    ``UnsafePickleError`` before it is imported.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")
        reconstruct, frombuffer = _numpy_reconstruct(), _numpy_frombuffer()
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
            ("__builtin__", "bytes"): _empty_bytes,
            ("builtins", "bytes"): _empty_bytes,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_cifar_batch(path: PathLike) -> Dict[str, Any]:
    """Unpickle one CIFAR file safely; keys are returned as ``str``.

    Raises ``DatasetError`` for a missing, truncated, corrupt or tampered file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            content = CifarUnpickler(fh).load()
    except FileNotFoundError:
        raise DatasetError(f"CIFAR file {path} does not exist") from None
    except UnsafePickleError as exc:
        raise DatasetError(
            f"refusing to load {path}: it references the Python global '{exc}', which no genuine "
            "CIFAR file contains (the file was tampered with or is not a CIFAR batch); replace "
            "it with the official file") from None
    except MemoryError:
        raise
    except Exception as exc:  # truncated or garbage pickles raise many different types
        raise DatasetError(
            f"{path} is truncated or corrupt and cannot be read "
            f"({type(exc).__name__}: {exc}); delete the dataset folder and download or "
            "extract it again") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} is not a CIFAR batch: it holds a {type(content).__name__}, "
                           "not a dict; replace it with the official file")
    return {_text(key): value for key, value in content.items()}


# --------------------------------------------------------------------------------------------
# Locating, downloading, loading
# --------------------------------------------------------------------------------------------
def resolve_cifar_folder(spec: CifarSpec, root: Optional[PathLike]) -> Path:
    """The batches folder for ``root`` (the folder containing it, or the folder itself)."""
    root = Path(spec.default_root if root is None else root).expanduser().absolute()
    if (root / spec.folder).is_dir():
        return root / spec.folder
    if root.name == spec.folder or any((root / name).is_file() for name in spec.required_files):
        return root
    return root / spec.folder


def download_cifar(spec: CifarSpec, parent: Path) -> None:
    """Download and extract the official archive so that ``parent/spec.folder`` appears whole.

    Uses torchvision's downloader (with its md5 check) into a temporary folder inside ``parent``;
    the extracted folder is renamed into place only after extraction succeeded.
    """
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    source = getattr(torchvision.datasets, spec.torchvision_class)
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.folder}.download-", dir=parent) as tmp:
        download_and_extract_archive(source.url, download_root=tmp, filename=source.filename,
                                     md5=source.tgz_md5)
        os.replace(Path(tmp) / spec.folder, parent / spec.folder)


@dataclass
class CifarSplit:
    """One split in memory: uint8 images ``(N, 3, 32, 32)``, int64 labels ``(N,)``, names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    folder: Path


def _missing_message(spec: CifarSpec, folder: Path, missing: List[str], reason: str) -> str:
    url = f"https://www.cs.toronto.edu/~kriz/{spec.folder.replace('-batches-py', '-python')}"
    return (
        f"{spec.title} not found: looked in {folder} for {', '.join(spec.required_files)} "
        f"(missing: {', '.join(missing)}). {reason} To provide the data, download {url}.tar.gz "
        f"and extract it into {folder.parent} (giving {folder}), or link an existing copy: "
        f"`ln -s /path/to/{spec.default_root} {spec.default_root}` in the working directory, "
        "or pass its location as the data directory (`--data-dir` on the command line).")


def _ensure_files(spec: CifarSpec, folder: Path, download: Union[bool, Downloader]) -> None:
    missing = [name for name in spec.required_files if not (folder / name).is_file()]
    if not missing:
        return
    if folder.exists():
        raise DatasetError(_missing_message(
            spec, folder, missing, "The folder exists but is incomplete; restore the missing "
            "files or delete the folder so that it can be downloaded again."))
    if download is False:
        raise DatasetError(_missing_message(spec, folder, missing, "Downloading is disabled."))
    downloader: Downloader = download if callable(download) else download_cifar
    logger.info("%s not found in %s: downloading it", spec.title, folder)
    try:
        downloader(spec, folder.parent)
    except Exception as exc:
        raise DatasetError(_missing_message(
            spec, folder, missing,
            f"Downloading it failed ({type(exc).__name__}: {exc}).")) from None
    still_missing = [name for name in spec.required_files if not (folder / name).is_file()]
    if still_missing:
        raise DatasetError(_missing_message(
            spec, folder, still_missing, "The download did not produce these files."))


def _batch_arrays(spec: CifarSpec, path: Path) -> Tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_batch(path)
    data, labels = batch.get("data"), batch.get(spec.label_key)
    if data is None or labels is None:
        raise DatasetError(
            f"{path} is not a {spec.title} batch: it lacks the '{spec.label_key}' or 'data' "
            f"entry (has {sorted(batch)}); replace it with the official file")
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != IMAGE_BYTES):
        shape = getattr(data, "shape", None)
        raise DatasetError(
            f"{path}: 'data' must be a uint8 array of shape (N, {IMAGE_BYTES}), got "
            f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}; the file is corrupt")
    try:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: '{spec.label_key}' is not a list of integers; "
                           "the file is corrupt") from None
    if len(label_array) != len(data):
        raise DatasetError(f"{path}: {len(label_array)} labels for {len(data)} images; "
                           "the file is corrupt")
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= spec.num_classes):
        raise DatasetError(f"{path}: labels outside [0, {spec.num_classes}); the file is corrupt "
                           f"or belongs to another dataset")
    return data, label_array


def _class_names(spec: CifarSpec, folder: Path) -> List[str]:
    path = folder / spec.meta_file
    if not path.is_file():
        return [str(i) for i in range(spec.num_classes)]
    names = read_cifar_batch(path).get(spec.label_names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DatasetError(f"{path}: '{spec.label_names_key}' must list {spec.num_classes} class "
                           "names; the file is corrupt")
    return [_text(name) for name in names]


def load_cifar(name: str, root: Optional[PathLike] = None, *, train: bool,
               download: Union[bool, Downloader] = True) -> CifarSplit:
    """Read the train or test split of ``name`` (``"cifar10"`` / ``"cifar100"``) from ``root``.

    Images come out as uint8 ``(N, 3, 32, 32)`` (each 3072-byte row holds the R, G and B planes,
    row-major), labels as int64.
    """
    spec = CIFAR_SPECS[name]
    folder = resolve_cifar_folder(spec, root)
    not_a_folder = next((path for path in (folder.parent, folder) if path.is_file()), None)
    if not_a_folder is not None:
        raise DatasetError(f"the {spec.title} data directory {not_a_folder} is a file, not a "
                           f"directory; pass the folder that contains {spec.folder}/")
    _ensure_files(spec, folder, download)
    files = spec.train_files if train else spec.test_files
    arrays = [_batch_arrays(spec, folder / file) for file in files]
    data = np.concatenate([a[0] for a in arrays])
    labels = np.concatenate([a[1] for a in arrays])
    if len(data) == 0:
        raise DatasetError(f"{folder}: the {spec.title} {'train' if train else 'test'} files "
                           "hold no images; the files are corrupt")
    images = torch.from_numpy(data.reshape(len(data), *IMAGE_SHAPE))
    logger.info("%s %s: %d images from %s", spec.title, "train" if train else "test",
                len(images), folder)
    return CifarSplit(images=images, labels=torch.from_numpy(labels),
                      classes=_class_names(spec, folder), folder=folder)


def build_loaders(request: "LoaderRequest") -> Tuple[TensorImageLoader, TensorImageLoader]:
    """The loader factory of ``cifar10`` / ``cifar100`` (``data.registry``): both splits held on the
    device as uint8, random crops with padding 4 and flips, normalised with the spec's mean / std."""
    spec = CIFAR_SPECS[request.spec.name]
    request.check_fixed("image_size", IMAGE_SHAPE[-1])
    request.check_fixed("num_classes", spec.num_classes)
    loaded = [load_cifar(spec.name, request.data_dir, train=train, download=request.download)
              for train in (True, False)]
    train, val = ((split.images, split.labels) for split in loaded)
    return tensor_loaders(request, train, val, num_classes=spec.num_classes,
                          classes=loaded[0].classes, padding=4)
