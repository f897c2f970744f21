"""Inspect an hdf5 weights file: per-array statistics, then parameter totals (as the original).

Usage::

    python display_hdf5.py FILE.hdf5 [--filter SUBSTRING] [--near-zero 1e-5]

The file holds one flat dataset per state-dict entry, named by the entry's key with ``/`` replaced
by ``+`` (the original ACNet format, written by ``acnet.save_hdf5``); arrays nested in groups are
read too. Names are shown as state-dict keys (``+`` and group separators become ``.``). For each
array: name, shape, dtype, mean, std and the counts of positive, negative, zero and near-zero
(``|x| <= eps``) entries. Totals: conv kernel (4-D), matrix (2-D) and vector (1-D) parameters; BN
running mean / running var / gamma / beta; biases. A missing, non-hdf5 or corrupt file ends in one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import h5py
import numpy as np

from utils.errors import USER_ERRORS, UsageError, report_error

HDF5_SEPARATOR = "+"


class Hdf5InspectError(UsageError):
    """A file that cannot be inspected; the message names the problem and the fix."""


def state_dict_name(dataset_path: str) -> str:
    """``layer1+0+conv.weight`` or a group path ``layer1/0/conv.weight`` -> ``layer1.0.conv.weight``."""
    return dataset_path.strip("/").replace("/", ".").replace(HDF5_SEPARATOR, ".")


@dataclass(frozen=True)
class ArrayStats:
    """Statistics of one array (``mean``/``std`` are None for an empty or non-numeric array)."""

    name: str
    shape: tuple
    dtype: str
    mean: Optional[float]
    std: Optional[float]
    positive: int
    negative: int
    zero: int
    near_zero: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def array_stats(name: str, array: np.ndarray, near_zero_eps: float, dtype_label: Optional[str] = None) -> ArrayStats:
    """Mean, std and sign counts of ``array`` (computed in float64)."""
    dtype_label = dtype_label or str(array.dtype)
    if array.dtype.kind not in "biuf":
        return ArrayStats(name, array.shape, dtype_label, None, None, 0, 0, 0, 0)
    values = np.asarray(array, dtype=np.float64)
    if values.size == 0:
        return ArrayStats(name, array.shape, dtype_label, None, None, 0, 0, 0, 0)
    return ArrayStats(
        name=name, shape=array.shape, dtype=dtype_label,
        mean=float(values.mean()), std=float(values.std()),
        positive=int(np.count_nonzero(values > 0)), negative=int(np.count_nonzero(values < 0)),
        zero=int(np.count_nonzero(values == 0)), near_zero=int(np.count_nonzero(np.abs(values) <= near_zero_eps)),
    )


def _walk(group, prefix: str = "") -> Iterator[tuple]:
    """``(path, dataset)`` for every dataset under ``group``, in the file's own order (creation order
    when the file tracks it, as ``acnet.save_hdf5`` does; else alphabetical)."""
    for key in group.keys():
        obj = group[key]
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, path)
        elif isinstance(obj, h5py.Dataset):
            yield path, obj


def iter_arrays(path: Path) -> Iterator[tuple]:
    """Yield ``(state_dict_name, numpy array, dtype label)`` for every dataset of the file, in file order.

    The dtype label is the array's dtype, plus the torch dtype when the file stored a dtype numpy
    lacks (``bfloat16`` as ``float32`` with a ``torch_dtype`` attribute). Raises Hdf5InspectError
    for a missing, non-hdf5 or corrupt file.
    """
    if not path.exists():
        raise Hdf5InspectError(f"no such file: {path}")
    if path.is_dir():
        raise Hdf5InspectError(f"{path} is a directory; pass a weights file such as {path / 'finish.hdf5'}")
    try:
        is_hdf5 = h5py.is_hdf5(str(path))
    except OSError as exc:
        raise Hdf5InspectError(f"cannot read {path}: {exc}") from None
    if not is_hdf5:
        raise Hdf5InspectError(f"{path} is not an HDF5 file (for a torch checkpoint .pth/.pt use "
                               f"acnet.load_state_dict_file; weights from do_acnet.py are *.hdf5)")
    try:
        with h5py.File(str(path), "r") as handle:
            for key, dataset in _walk(handle):
                array = dataset[()]
                array = np.asarray(array)
                label = str(array.dtype)
                torch_dtype = dataset.attrs.get("torch_dtype")
                if torch_dtype is not None:
                    torch_dtype = torch_dtype.decode() if isinstance(torch_dtype, bytes) else str(torch_dtype)
                    label = f"{label} ({torch_dtype})"
                yield state_dict_name(key), array, label
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for damaged files (OSError, KeyError, ...)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Hdf5InspectError(f"{path} is corrupt or truncated ({detail}); re-create it, e.g. from the run's "
                               f"checkpoint") from None


@dataclass
class Totals:
    """Parameter counts by kind, as the original prints them."""

    arrays: int = 0
    conv_kernel: int = 0
    matrix: int = 0
    vector: int = 0
    other: int = 0
    bn_mean: int = 0
    bn_var: int = 0
    bn_gamma: int = 0
    bn_beta: int = 0
    bias: int = 0

    @property
    def total(self) -> int:
        return self.conv_kernel + self.matrix + self.vector

    @property
    def parameters(self) -> int:
        """Learnable parameters: the total without BN running statistics (torch's parameter count)."""
        return self.total - self.bn_mean - self.bn_var


BN_SUFFIXES = {
    "running_mean": "bn_mean", "moving_mean": "bn_mean",
    "running_var": "bn_var", "moving_var": "bn_var", "moving_variance": "bn_var",
    "gamma": "bn_gamma", "beta": "bn_beta",
}


def _prefix_and_leaf(name: str) -> tuple:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def role_of(name: str, all_names: set) -> Optional[str]:
    """``bn_mean``/``bn_var``/``bn_gamma``/``bn_beta``/``bias`` or None (a kernel or anything else).

    A ``weight``/``bias`` is a BN's gamma/beta when the same module has running statistics
    (``<prefix>.running_var`` or ``moving_variance``), or, failing that, when its module name
    contains ``bn`` (the original's rule, for files saved without statistics).
    """
    prefix, leaf = _prefix_and_leaf(name)
    if leaf in BN_SUFFIXES:
        return BN_SUFFIXES[leaf]
    if leaf in ("weight", "bias"):
        module_is_bn = any(f"{prefix}.{stat}" in all_names for stat in
                           ("running_var", "running_mean", "moving_variance", "moving_mean")) \
            or "bn" in prefix.rpartition(".")[2].lower()
        if module_is_bn:
            return "bn_gamma" if leaf == "weight" else "bn_beta"
        if leaf == "bias":
            return "bias"
    return None


def totals_of(stats: Sequence[ArrayStats]) -> Totals:
    """Count parameters by dimensionality and by role (see ``role_of``)."""
    totals = Totals(arrays=len(stats))
    names = {s.name for s in stats}
    for s in stats:
        if s.name.endswith("num_batches_tracked"):
            totals.other += s.size
            continue
        kind = {4: "conv_kernel", 2: "matrix", 1: "vector"}.get(len(s.shape), "other")
        setattr(totals, kind, getattr(totals, kind) + s.size)
        role = role_of(s.name, names)
        if role is not None:
            setattr(totals, role, getattr(totals, role) + s.size)
    return totals


def _fmt_stat(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.6g}"


def format_report(stats: Sequence[ArrayStats], totals: Totals, near_zero_eps: float,
                  filter_text: Optional[str] = None) -> str:
    """The array table followed by the totals lines."""
    headers = ("name", "shape", "dtype", "mean", "std", "positive", "negative", "zero", f"near_zero(<={near_zero_eps:g})")
    rows = [(s.name, "x".join(map(str, s.shape)) or "scalar", s.dtype, _fmt_stat(s.mean), _fmt_stat(s.std),
             str(s.positive), str(s.negative), str(s.zero), str(s.near_zero)) for s in stats]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = set(range(3, len(headers)))

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    scope = f" matching {filter_text!r}" if filter_text else ""
    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    out.append("")
    out.append(f"totals over {totals.arrays} arrays{scope}:")
    out.append(f"  conv kernel {totals.conv_kernel}, matrix {totals.matrix}, vector {totals.vector}, "
               f"total {totals.total}" + (f" (+{totals.other} in scalars/other arrays)" if totals.other else ""))
    out.append(f"  BN mean {totals.bn_mean}, var {totals.bn_var}, gamma {totals.bn_gamma}, "
               f"beta {totals.bn_beta}; bias {totals.bias}")
    out.append(f"  kernel params (conv + matrix) {totals.conv_kernel + totals.matrix}; "
               f"parameters (total without BN mean/var) {totals.parameters}")
    return "\n".join(out)


def inspect_file(path: Path, filter_text: Optional[str] = None, near_zero_eps: float = 1e-5) -> str:
    """The full report for one file (raises Hdf5InspectError)."""
    stats = [array_stats(name, array, near_zero_eps, dtype) for name, array, dtype in iter_arrays(path)
             if not filter_text or filter_text in name]
    return format_report(stats, totals_of(stats), near_zero_eps, filter_text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Per-array statistics and parameter totals of an hdf5 weights file.")
    parser.add_argument("file", type=Path, help="weights file, e.g. acnet_exps/<run>/finish.hdf5")
    parser.add_argument("--filter", metavar="SUBSTRING", default=None,
                        help="only arrays whose state-dict name contains SUBSTRING (totals follow the filter)")
    parser.add_argument("--near-zero", type=float, default=1e-5, metavar="EPS",
                        help="count |x| <= EPS as near-zero (default: 1e-5)")
    args = parser.parse_args(argv)
    try:
        if args.near_zero < 0:
            raise Hdf5InspectError(f"--near-zero must be >= 0, got {args.near_zero}")
        report = inspect_file(args.file, args.filter, args.near_zero)
    except USER_ERRORS as exc:
        return report_error("display_hdf5.py", exc)
    try:
        print(report)
        sys.stdout.flush()
    except BrokenPipeError:  # output piped into head & co.: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
