"""State dicts <-> hdf5 files in the original ACNet format: the one place that format is handled.

Format (as the original ``save_hdf5`` / ``read_hdf5`` write and read it): one dataset per
state-dict entry, named by the entry's key with ``/`` replaced by ``+`` (h5py would otherwise
read ``/`` as a group separator), holding the value as a numpy array (a scalar dataset for 0-d
entries such as ``num_batches_tracked``). Files written by the original code load unchanged.

Two compatible additions: datasets keep the state dict's order (``track_order``), and a tensor
whose dtype numpy cannot hold (``bfloat16``, the float8 types) is stored as ``float32`` with a
``torch_dtype`` attribute, so it loads back with its own dtype. Readers of the original format
ignore both.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

from .fileio import atomic_path
from .errors import WeightsError

__all__ = ["save_hdf5", "load_hdf5", "KEY_SEPARATOR_REPLACEMENT"]

PathLike = Union[str, "os.PathLike[str]"]

#: Character standing for ``/`` in dataset names (the original's convention).
KEY_SEPARATOR_REPLACEMENT = "+"
_DTYPE_ATTR = "torch_dtype"
# torch dtypes numpy has no equivalent of: stored as float32, restored from the attribute.
_STORED_AS_FLOAT32 = {
    str(dt): dt
    for dt in (torch.bfloat16, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
    if dt is not None
}


def save_hdf5(state_dict: Union[Mapping[str, Any], nn.Module], path: PathLike) -> None:
    """Write ``state_dict`` (or a module's state dict) to ``path`` in the original hdf5 format.

    Values may be tensors (any device; detached and copied to the CPU), numpy arrays or Python
    numbers. The file is written atomically: on any error ``path`` keeps its previous content
    and no partial file is left. Raises ``TypeError`` for a value that is not array-like.
    """
    h5py = _import_h5py()
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    arrays = {str(key): _to_numpy(str(key), value) for key, value in state_dict.items()}
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w", track_order=True)
        try:
            for key, (array, torch_dtype) in arrays.items():
                dataset = f.create_dataset(key.replace("/", KEY_SEPARATOR_REPLACEMENT), data=array)
                if torch_dtype is not None:
                    dataset.attrs[_DTYPE_ATTR] = torch_dtype
        except BaseException as exc:
            # closing after a failed write fails again (a RuntimeError that hides the first error)
            with contextlib.suppress(Exception):
                f.close()
            raise _os_error_of(exc) from None
        try:
            f.close()  # flushes: a full disk may show only here
        except Exception as exc:  # noqa: BLE001 - h5py reports a failed flush as RuntimeError
            raise _os_error_of(exc) from None


def load_hdf5(path: PathLike) -> Dict[str, Tensor]:
    """Read an hdf5 weights file into ``dict[str, Tensor]`` (CPU), ``+`` in names turned back into ``/``.

    Datasets inside groups (not written by this project or the original, but valid hdf5) are read
    under their full path. Raises :class:`acnet.WeightsError` when the file is missing, not hdf5,
    corrupt, or holds a value that is not numeric.
    """
    h5py = _import_h5py()
    file = Path(path)
    if not file.exists():
        raise WeightsError(f"hdf5 weights file not found: '{file}' (check the path)")
    if file.is_dir():
        raise WeightsError(f"'{file}' is a directory, not an hdf5 weights file")
    result: Dict[str, Tensor] = {}
    try:
        with h5py.File(file, "r") as f:
            _read_group(h5py, f, "", result)
    except WeightsError as exc:  # a dataset that holds no numbers
        raise WeightsError(f"'{file}' is not a weights file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for damaged files (OSError, KeyError, ...)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"'{file}' is not a readable hdf5 weights file (corrupt, truncated or another format): "
            f"{detail}. Re-create it, e.g. with acnet.save_hdf5(model.state_dict(), path)"
        ) from None
    return result


def _read_group(h5py: Any, group: Any, prefix: str, result: Dict[str, Tensor]) -> None:
    """Read every dataset under ``group`` in its stored order (creation order when tracked)."""
    for name, node in group.items():
        full_name = prefix + name
        if isinstance(node, h5py.Group):
            _read_group(h5py, node, full_name + "/", result)
        else:
            key = full_name.replace(KEY_SEPARATOR_REPLACEMENT, "/")
            result[key] = _to_tensor(key, node[()], node.attrs.get(_DTYPE_ATTR))


def _os_error_of(exc: BaseException) -> BaseException:
    """The ``OSError`` behind an h5py error: h5py names the errno of a failed write only in its text
    (``errno = 28``), on a ``RuntimeError`` when closing; other exceptions are returned as they are."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    match = re.search(r"errno = (\d+)", str(exc)) if isinstance(exc, Exception) else None
    if match and int(match.group(1)):
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return exc


def _to_numpy(key: str, value: Any) -> "tuple[np.ndarray, str | None]":
    """Array to store for one entry, plus the torch dtype name when it must be restored on load."""
    if isinstance(value, Tensor):
        tensor = value.detach().cpu()
        if str(tensor.dtype) in _STORED_AS_FLOAT32:
            return tensor.float().numpy(), str(tensor.dtype)
        return tensor.numpy(), None
    if isinstance(value, (np.ndarray, np.generic, bool, int, float, complex)):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"save_hdf5: entry {key!r} has non-numeric dtype {array.dtype}")
        return array, None
    raise TypeError(
        f"save_hdf5: entry {key!r} is a {type(value).__name__}; values must be tensors, numpy arrays "
        "or numbers"
    )


def _to_tensor(key: str, value: Any, torch_dtype: Any) -> Tensor:
    array = np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise WeightsError(f"its hdf5 dataset {key!r} holds non-numeric data ({array.dtype})")
    tensor = torch.from_numpy(np.array(array, copy=True))
    if torch_dtype is not None:
        name = torch_dtype.decode() if isinstance(torch_dtype, bytes) else str(torch_dtype)
        if name in _STORED_AS_FLOAT32:
            tensor = tensor.to(_STORED_AS_FLOAT32[name])
    return tensor


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a declared dependency
        raise ImportError("reading or writing hdf5 weights needs h5py: pip install h5py") from None
    return h5py
