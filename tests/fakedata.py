"""Tiny datasets written in the exact on-disk formats users have, for tests of every part.

* ``write_fake_cifar10`` / ``write_fake_cifar100`` write ``cifar-10-batches-py/`` and
  ``cifar-100-python/`` like the official archives: pickle protocol 2, keys as (Python 2)
  byte strings, ``data`` a uint8 ``(N, 3072)`` array of row-major R, G, B planes, labels as
  lists of ints, meta files with the label names. By default the pickles are written the way
  the official files were (Python 2 ``cPickle``: byte strings as ``STRING`` opcodes, arrays
  rebuilt through ``numpy.core.multiarray._reconstruct``); ``pickle_style="numpy"`` instead
  writes them the way ``pickle.dump(obj, f, protocol=2)`` does with the current Python and
  numpy (``_codecs.encode`` for byte strings, ``numpy._core.multiarray._reconstruct``), as a
  user who re-saved the files would.
* ``write_fake_imagefolder`` writes ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` trees of
  small real JPEG files (PIL), like ``imagenet_data``.

Images are class-dependent (a per-class colour plus noise), so a model trained on them learns.
Everything is deterministic for a given ``seed``; every file goes through ``acnet.fileio``.
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from acnet.fileio import atomic_open, atomic_path

__all__ = [
    "CIFAR10_LABEL_NAMES",
    "write_fake_cifar10",
    "write_fake_cifar100",
    "write_fake_imagefolder",
    "fake_images",
]

PathLike = Union[str, Path]

CIFAR10_LABEL_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
PICKLE_STYLES = ("python2", "numpy")


# --------------------------------------------------------------------------------------------
# Pickles as Python 2 cPickle wrote them (the official CIFAR files)
# --------------------------------------------------------------------------------------------
def _reconstruct_function() -> Any:
    from numpy._core import multiarray  # numpy >= 2; `numpy.core` is a deprecated alias

    return multiarray._reconstruct


class _Python2Pickler(pickle._Pickler):
    """Protocol-2 pickler reproducing Python 2 ``cPickle`` output for the CIFAR objects.

    Byte strings (and ASCII ``str``, e.g. dtype codes) become Python 2 ``str`` (``SHORT_BINSTRING``
    / ``BINSTRING`` opcodes); uint8 arrays reduce to ``numpy.core.multiarray._reconstruct`` with the
    Python 2 numpy state tuple, and globals are written under the module names of that era.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, protocol=2)
        self._global_names = {
            _reconstruct_function(): ("numpy.core.multiarray", "_reconstruct"),
            np.ndarray: ("numpy", "ndarray"),
            np.dtype: ("numpy", "dtype"),
        }

    def _save_python2_str(self, obj: Union[bytes, str]) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str
    dispatch[str] = _save_python2_str

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype != np.uint8:
                raise pickle.PicklingError("the Python 2 style writer only handles uint8 arrays")
            state = (1, tuple(obj.shape), obj.dtype, False, np.ascontiguousarray(obj).tobytes())
            return _reconstruct_function(), (np.ndarray, (0,), b"b"), state
        if isinstance(obj, np.dtype):
            return np.dtype, ("u1", 0, 1), (3, "|", None, None, None, -1, -1, 0)
        return NotImplemented

    def save_global(self, obj: Any, name: Any = None) -> None:
        try:
            module, qualname = self._global_names[obj]
        except (KeyError, TypeError):
            raise pickle.PicklingError(f"unexpected global {obj!r} in a CIFAR pickle") from None
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)


def _write_pickle(path: Path, obj: dict, pickle_style: str) -> None:
    with atomic_open(path, "wb") as fh:
        if pickle_style == "python2":
            _Python2Pickler(fh).dump(obj)
        else:
            pickle.dump(obj, fh, protocol=2)


def _check_style(pickle_style: str) -> None:
    if pickle_style not in PICKLE_STYLES:
        raise ValueError(f"pickle_style must be one of {PICKLE_STYLES}, got {pickle_style!r}")


# --------------------------------------------------------------------------------------------
# Image content
# --------------------------------------------------------------------------------------------
def fake_images(labels: np.ndarray, height: int, width: int, num_classes: int,
                rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(N, 3, H, W)`` images: a per-class colour (fixed by ``num_classes``) plus noise."""
    palette = np.random.default_rng(num_classes).integers(40, 216, size=(num_classes, 3))
    noise = rng.normal(0.0, 24.0, size=(len(labels), 3, height, width))
    images = palette[labels][:, :, None, None] + noise
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _balanced_labels(count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(count) % num_classes).astype(np.int64)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------
def write_fake_cifar10(root: PathLike, num_train: int = 50, num_test: int = 20, seed: int = 0,
                       *, pickle_style: str = "python2") -> Path:
    """Write ``root/cifar-10-batches-py/`` and return that folder.

    Files as in the official archive: ``data_batch_1`` .. ``data_batch_5`` (``num_train`` images
    split as evenly as possible), ``test_batch``, ``batches.meta``, ``readme.html``. Each batch is a
    dict ``{b"batch_label", b"labels", b"data", b"filenames"}``.
    """
    _check_style(pickle_style)
    if num_train < 1 or num_test < 1:
        raise ValueError("num_train and num_test must be >= 1")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = _balanced_labels(num_train, 10, rng)
    train_images = fake_images(train_labels, 32, 32, 10, rng)
    parts = np.array_split(np.arange(num_train), 5)
    for number, part in enumerate(parts, start=1):
        _write_pickle(folder / f"data_batch_{number}", {
            b"batch_label": f"training batch {number} of 5".encode("ascii"),
            b"labels": [int(v) for v in train_labels[part]],
            b"data": train_images[part].reshape(len(part), 3072),
            b"filenames": [_cifar_filename(train_labels[i], i) for i in part],
        }, pickle_style)
    test_labels = _balanced_labels(num_test, 10, rng)
    test_images = fake_images(test_labels, 32, 32, 10, rng)
    _write_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in test_labels],
        b"data": test_images.reshape(num_test, 3072),
        b"filenames": [_cifar_filename(test_labels[i], i) for i in range(num_test)],
    }, pickle_style)
    _write_pickle(folder / "batches.meta", {
        b"num_cases_per_batch": 10000,
        b"label_names": [name.encode("ascii") for name in CIFAR10_LABEL_NAMES],
        b"num_vis": 3072,
    }, pickle_style)
    with atomic_open(folder / "readme.html", "w") as fh:
        fh.write("<meta HTTP-EQUIV=\"REFRESH\" content=\"0; "
                 "url=http://www.cs.toronto.edu/~kriz/cifar.html\">\n")
    return folder


def write_fake_cifar100(root: PathLike, num_train: int = 200, num_test: int = 100, seed: int = 0,
                        *, pickle_style: str = "python2") -> Path:
    """Write ``root/cifar-100-python/`` (``train``, ``test``, ``meta``) and return that folder.

    ``train`` / ``test`` are dicts ``{b"filenames", b"batch_label", b"fine_labels",
    b"coarse_labels", b"data"}``; ``meta`` holds ``b"fine_label_names"`` and
    ``b"coarse_label_names"``. Fine label ``f`` belongs to coarse label ``f // 5``.
    """
    _check_style(pickle_style)
    if num_train < 1 or num_test < 1:
        raise ValueError("num_train and num_test must be >= 1")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        fine = _balanced_labels(count, 100, rng)
        images = fake_images(fine, 32, 32, 100, rng)
        _write_pickle(folder / split, {
            b"filenames": [_cifar_filename(fine[i], i) for i in range(count)],
            b"batch_label": (b"training batch 1 of 1" if split == "train"
                             else b"testing batch 1 of 1"),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": images.reshape(count, 3072),
        }, pickle_style)
    _write_pickle(folder / "meta", {
        b"fine_label_names": [f"fine_class_{i:02d}".encode("ascii") for i in range(100)],
        b"coarse_label_names": [f"coarse_class_{i:02d}".encode("ascii") for i in range(20)],
    }, pickle_style)
    return folder


def _cifar_filename(label: int, index: int) -> bytes:
    return f"class{int(label)}_s_{index:06d}.png".encode("ascii")


# --------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)
# --------------------------------------------------------------------------------------------
def write_fake_imagefolder(root: PathLike, num_classes: int = 3, per_class_train: int = 4,
                           per_class_val: int = 2, size: Union[int, Sequence[int]] = (40, 48),
                           seed: int = 0) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; return ``root``.

    Class folders are named like ImageNet wnids (``n00000000``, ``n00000001``, ...); ``size`` is
    ``(height, width)`` or one int. Every file is a real JPEG written by PIL.
    """
    if num_classes < 1 or per_class_train < 0 or per_class_val < 0:
        raise ValueError("num_classes must be >= 1 and the per-class counts >= 0")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        labels = np.repeat(np.arange(num_classes), per_class)
        images = fake_images(labels, height, width, num_classes, rng)
        for index, (label, image) in enumerate(zip(labels, images)):
            path = root / split / f"n{label:08d}" / f"{split}_{index:05d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(image.transpose(1, 2, 0)).save(tmp, format="JPEG", quality=90)
        if per_class == 0:
            for label in range(num_classes):
                (root / split / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
    return root
