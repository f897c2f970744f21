"""Safe loading of weight files: the one place a state dict is read from disk.

``load_state_dict_file(path)`` accepts the two formats the project uses:

* the original hdf5 format (see :mod:`acnet.hdf5`), recognised by its signature, whatever the
  file name;
* a torch checkpoint (``.pth`` / ``.pt`` / anything ``torch.save`` wrote), read with
  ``torch.load(..., weights_only=True)``: unpickling may only build tensors and plain containers,
  so loading a file never runs code from it.

A checkpoint may wrap the state dict in a container (``{"state_dict": ...}``, ``{"model": ...}``,
``{"model_state_dict": ...}``, ``{"net": ...}``, as training scripts save it beside the optimizer
and the epoch); the container is unwrapped. A prefix every key shares from a wrapper module
(``module.`` from ``DataParallel``/``DistributedDataParallel``, ``_orig_mod.`` from
``torch.compile``) is stripped, so a checkpoint of a wrapped model loads into the plain model.

Every failure (missing file, corrupt file, a file that is no weights file, a pickle that would need
arbitrary code) raises :class:`WeightsError` with one message naming the file, the problem and the
fix.

``check_finite_weights(state, source)`` is the one check that weights hold no NaN / inf (what a
diverged run saves): every tool that uses weights (conversion, evaluation, export, initialisation,
fuse-and-load) calls it before computing or writing anything, and it raises
:class:`NonFiniteWeightsError` naming the first offending tensor.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from torch import Tensor, nn

from .errors import NonFiniteWeightsError, WeightsError, exception_line
from .hdf5 import load_hdf5

__all__ = [
    "WeightsError",
    "NonFiniteWeightsError",
    "load_state_dict_file",
    "check_finite_weights",
    "as_state_dict",
    "strip_wrapper_prefixes",
    "CONTAINER_KEYS",
    "WRAPPER_PREFIXES",
]

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, Tensor]

#: Keys under which training scripts commonly store the model's state dict in a checkpoint.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net")
#: Prefixes added by wrapper modules (DataParallel / DistributedDataParallel, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_state_dict_file(path: PathLike) -> StateDict:
    """Read a state dict from an hdf5 weights file or a torch checkpoint.

    Returns a new ``dict[str, Tensor]`` (CPU tensors) with any container unwrapped and any wrapper
    prefix (``module.``, ``_orig_mod.``) stripped. Raises :class:`WeightsError` when the file is
    missing, unreadable, corrupt, not a weights file, or would need arbitrary code to unpickle.
    """
    file = Path(path)
    if not file.exists():
        raise WeightsError(f"weights file not found: '{file}' (check the path)")
    if file.is_dir():
        raise WeightsError(f"'{file}' is a directory, not a weights file (give the path of an .hdf5 or .pth file)")
    if _is_hdf5(file):
        raw: Any = load_hdf5(file)
    else:
        raw = _torch_load_weights_only(file)
    state = as_state_dict(raw, source=f"'{file}'")
    if not state:
        raise WeightsError(f"'{file}' holds no tensors (an empty state dict): not the weights of a model")
    return state


def check_finite_weights(state_dict: Mapping[str, Tensor], source: str = "the given weights") -> None:
    """Raise :class:`NonFiniteWeightsError` unless every floating (or complex) tensor is finite.

    ``source`` names the weights in the message (e.g. ``"'run/finish.hdf5'"``). The message is one
    line: the first offending entry in the state dict's order, its NaN / inf counts, how many entries
    are affected, and the fix. Integer tensors (``num_batches_tracked``) cannot hold NaN and are skipped.
    """
    bad = [key for key, value in state_dict.items()
           if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())
           and not bool(torch.isfinite(value).all())]
    if not bad:
        return
    first = state_dict[bad[0]]
    nans = int(torch.isnan(first).sum())
    infs = int(torch.isinf(first).sum())
    counts = " and ".join(f"{n} {what}" for n, what in ((nans, "NaN"), (infs, "inf")) if n)
    others = f"; {len(bad) - 1} more of the {len(state_dict)} entries do too" if len(bad) > 1 else ""
    raise NonFiniteWeightsError(
        f"{source} holds non-finite weights: entry {bad[0]!r} has {counts} of its {first.numel()} values{others} "
        "(what a diverged training run saves); nothing was computed or written: use weights saved before the "
        "run diverged, or retrain with a lower learning rate")


def as_state_dict(obj: Any, source: str = "the given weights") -> StateDict:
    """Turn loaded weights into a plain ``dict[str, Tensor]``.

    Accepts a state-dict mapping, a checkpoint container holding one under a key of
    :data:`CONTAINER_KEYS`, or an ``nn.Module`` (its ``state_dict()``). Strips wrapper prefixes.
    Raises :class:`WeightsError` naming ``source`` when no state dict can be found or an entry is
    not a tensor.
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{source} holds {_with_article(type(obj).__name__)}, not a state dict (expected a mapping from "
            "parameter names to tensors, or a checkpoint dict with a 'state_dict' or 'model' entry)"
        )
    obj = _unwrap_container(obj)
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        found = ", ".join(f"{k!r} ({type(obj[k]).__name__})" for k in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        containers = ", ".join(repr(k) for k in CONTAINER_KEYS)
        raise WeightsError(
            f"{source} is not a state dict: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not "
            f"named tensors: {found}{more}. Expected a mapping from parameter names to tensors, or a "
            f"checkpoint with the model's state dict under one of {containers}"
        )
    return strip_wrapper_prefixes(dict(obj))


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Remove a wrapper prefix (:data:`WRAPPER_PREFIXES`) shared by EVERY key, repeatedly.

    ``{"module.conv.weight": w}`` becomes ``{"conv.weight": w}``; a prefix only some keys carry
    is part of their real names and is kept.
    """
    result = dict(state_dict)
    changed = True
    while result and changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in result):
                result = {k[len(prefix):]: v for k, v in result.items()}
                changed = True
    return result


def _with_article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _unwrap_container(obj: Mapping) -> Mapping:
    """Descend into ``{"state_dict": {...}}``-style containers until a mapping of tensors remains."""
    while not _looks_like_state_dict(obj):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _looks_like_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _is_hdf5(file: Path) -> bool:
    """HDF5 signature at offset 0 (or at 512, 1024, ... when the file has a user block)."""
    try:
        with open(file, "rb") as fh:
            offset = 0
            size = file.stat().st_size
            while offset + len(_HDF5_SIGNATURE) <= size:
                fh.seek(offset)
                if fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError as exc:
        raise WeightsError(f"cannot read weights file '{file}': {exc}") from None
    return False


def _torch_load_weights_only(file: Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU, every failure turned into one :class:`WeightsError`.

    Unpickling bytes of unknown origin can fail with almost any exception type (``IndexError`` for a
    text file, ``KeyError``, ``UnicodeDecodeError``, ``RuntimeError`` from the zip reader, ...); each
    becomes a :class:`WeightsError` saying what the file is instead (see :func:`_describe_content`).
    """
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a plain pickle
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe is None:  # the unpickler met bytes that are no pickle at all
            raise WeightsError(_not_weights_message(file, exc)) from None
        raise WeightsError(
            f"refusing to load '{file}': it contains Python objects other than tensors and plain "
            f"containers ({unsafe.group(1)}), and loading them could run code from the file. Save only "
            "the state dict (torch.save(model.state_dict(), path)); if you trust the file, load it "
            "yourself with torch.load(path, weights_only=False) and pass the resulting state dict"
        ) from None
    except OSError as exc:
        raise WeightsError(f"cannot read weights file '{file}': {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - see the docstring: any type, from arbitrary bytes
        raise WeightsError(_not_weights_message(file, exc)) from None


_ZIP_SIGNATURE = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled 0x1950a86a20f9469cfc6c


def _not_weights_message(file: Path, exc: BaseException) -> str:
    """One line: a damaged torch checkpoint, or what the file is instead of a weights file."""
    damaged = _damaged_checkpoint(file)
    if damaged is not None:
        return (f"'{file}' is a damaged torch checkpoint ({damaged}; torch.load: {exception_line(exc, sentence=True, limit=120)}). "
                "Re-create or re-download the file")
    return (f"'{file}' is not a weights file: neither hdf5 nor a torch checkpoint, it is "
            f"{_describe_content(file)}. Pass an .hdf5 file (do_acnet.py's finish.hdf5, acnet.save_hdf5) "
            "or a torch.save()'d state dict")


def _damaged_checkpoint(file: Path) -> str | None:
    """Why a file that starts like a torch checkpoint cannot be read, ``None`` if it is none."""
    head = _head(file)
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "legacy torch format, corrupt or truncated"
    if not head.startswith(_ZIP_SIGNATURE):
        return None
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "a truncated or corrupt zip archive"
    if _is_torchscript(names):
        return None  # intact, but a whole scripted model: described by _describe_content
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "its zip archive is intact but its content is corrupt"
    return None


def _is_torchscript(names: list) -> bool:
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def _head(file: Path, size: int = 512) -> bytes:
    try:
        with open(file, "rb") as fh:
            return fh.read(size)
    except OSError:
        return b""


def _describe_content(file: Path) -> str:
    """What a file that is no weights file looks like: empty, text, a zip or pickle of something else."""
    head = _head(file)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(_ZIP_SIGNATURE):
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
            shown = ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
            if _is_torchscript(names):
                return ("a TorchScript archive (torch.jit.save), a whole scripted model: load it with "
                        "torch.jit.load and save its state_dict()")
            if names and all(name.endswith(".npy") for name in names):
                return f"a numpy .npz archive ({shown}), not named tensors in a torch or hdf5 file"
            return f"a zip archive of other files ({shown or 'empty'})"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "a truncated or corrupt zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array, not a state dict"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file (decompress it first)"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "a UTF-16 text file"
    if file.suffix.lower() == ".onnx":
        return "an ONNX model (its initializers are no state dict; keep the training's .hdf5 or .pth)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle that is not a torch checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else None
    if text is not None and text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        first = first if len(first) <= 40 else first[:37] + "..."
        return f"a text file (beginning {first!r})"
    return f"binary data of an unknown format (first bytes {head[:8].hex(' ')})"
