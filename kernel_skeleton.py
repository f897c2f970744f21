"""Kernel-skeleton analysis of the ACNet paper: where in the KxK window do deployed kernels put weight?

Usage::

    python kernel_skeleton.py RUN_OR_FILE [RUN_OR_FILE ...] [-o skeleton.png] [--labels base acb] [-k 3]

Each argument is a deploy weights file (``finish_deploy.hdf5``, or any hdf5 or torch checkpoint
:func:`acnet.load_state_dict_file` reads) or a run directory holding one. For
every KxK conv kernel ``W`` (shape ``out x in x K x K``) of the file, the layer's magnitude matrix is
``M[i, j] = sum_{o, c} |W[o, c, i, j]|`` normalised by its maximum (so its largest entry is 1); the
file's skeleton matrix is the mean of the layers' matrices. The ACNet paper shows that ACB models
concentrate magnitude on the central cross (the "skeleton": centre row and centre column). The
script prints each matrix and the skeleton ratio ``mean(cross) / mean(rest)``; with ``-o`` it draws
the matrices side by side as heatmaps on one colour scale (matplotlib needed).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from utils.errors import USER_ERRORS, UsageError, report_error
from utils.rundir.identity import DEPLOY_WEIGHTS, FINISH_WEIGHTS

# Submodule names that only a training-time (unfused) weights file has: the branches of ACB, DBB and OREPA.
TRAINING_FORM_MARKERS = ("square_conv", "ver_conv", "hor_conv", "dbb_origin", "dbb_1x1", "dbb_1x1_kxk", "dbb_avg",
                         "weight_orepa_origin")


class SkeletonError(UsageError):
    """A problem the user can fix; the message names it and the fix."""


@dataclass(frozen=True)
class Skeleton:
    """The mean normalised magnitude matrix of the KxK kernels of one file."""

    label: str
    matrix: np.ndarray  # K x K, float64, entries in [0, 1]
    layers: tuple  # names of the kernels averaged

    @property
    def kernel_size(self) -> int:
        return self.matrix.shape[0]

    def skeleton_ratio(self) -> float:
        """Mean over the centre row and column divided by the mean over the other positions."""
        return skeleton_ratio(self.matrix)


def skeleton_mask(kernel_size: int) -> np.ndarray:
    """Boolean KxK mask of the centre row and centre column (K odd)."""
    mask = np.zeros((kernel_size, kernel_size), dtype=bool)
    mask[kernel_size // 2, :] = True
    mask[:, kernel_size // 2] = True
    return mask


def skeleton_ratio(matrix: np.ndarray) -> float:
    mask = skeleton_mask(matrix.shape[0])
    rest = matrix[~mask].mean()
    return float(matrix[mask].mean() / rest) if rest > 0 else float("inf")


def layer_magnitude(kernel: np.ndarray) -> np.ndarray:
    """``sum_{o,c} |W[o, c]|`` normalised by its maximum (all-zero kernels give all zeros)."""
    magnitude = np.abs(np.asarray(kernel, dtype=np.float64)).sum(axis=(0, 1))
    peak = magnitude.max()
    return magnitude / peak if peak > 0 else magnitude


def _check_deploy_form(arrays: Mapping[str, np.ndarray], source: str) -> None:
    names = set(arrays)
    for name in names:
        unfused = any(marker in name.split(".") for marker in TRAINING_FORM_MARKERS)
        prefix, _, leaf = name.rpartition(".")
        # a conv-BN unit's bias-free conv next to its BN (a deploy conv always has a bias; a BN
        # beside a conv WITH bias is a pre-activation unit's own BN, which stays in deploy form)
        # (only a KxK conv with 1 < K < 7 would be a block: the original ACNet's finish_deploy.hdf5
        # keeps its 1x1 and 7x7 conv-BN units unfused)
        shape = np.shape(arrays[name])
        block_sized = len(shape) == 4 and shape[2] == shape[3] and 1 < shape[2] < 7
        conv_bn_pair = (leaf == "weight" and prefix.endswith("conv") and f"{prefix}.bias" not in names
                        and f"{prefix[:-len('conv')]}bn.running_var" in names and block_sized)
        if unfused or conv_bn_pair:
            raise SkeletonError(
                f"{source} holds training-time (unfused) weights ({name}); the skeleton is defined on the "
                f"equivalent kernels: pass the run's {DEPLOY_WEIGHTS} (written by do_acnet.py), or convert "
                f"with acnet.acnet_switch_to_deploy and acnet.save_hdf5")


def compute_skeleton(arrays: Mapping[str, np.ndarray], kernel_size: Optional[int] = None,
                     label: str = "", source: str = "the weights") -> Skeleton:
    """Average the normalised magnitude matrices of all KxK kernels (K: given, else the most common K>1)."""
    _check_deploy_form(arrays, source)
    square = {name: a for name, a in arrays.items()
              if a.ndim == 4 and a.shape[2] == a.shape[3] and a.shape[2] > 1 and a.dtype.kind == "f"}
    if not square:
        raise SkeletonError(f"{source} has no square conv kernels larger than 1x1")
    sizes = Counter(a.shape[2] for a in square.values())
    if kernel_size is None:
        kernel_size = max(sizes, key=lambda k: (sizes[k], -k))
    chosen = {name: a for name, a in square.items() if a.shape[2] == kernel_size}
    if not chosen:
        available = ", ".join(f"{k}x{k} ({n} layers)" for k, n in sorted(sizes.items()))
        raise SkeletonError(f"{source} has no {kernel_size}x{kernel_size} kernels; it has {available}")
    if kernel_size % 2 == 0:
        raise SkeletonError(f"kernel size {kernel_size} is even: the centre skeleton is defined for odd K")
    matrix = np.mean([layer_magnitude(a) for a in chosen.values()], axis=0)
    return Skeleton(label=label, matrix=matrix, layers=tuple(chosen))


def resolve_weights_path(path: Path) -> Path:
    """A run directory stands for its ``finish_deploy.hdf5``."""
    if path.is_dir():
        candidate = path / DEPLOY_WEIGHTS
        if not candidate.is_file():
            raise SkeletonError(f"{path} has no {DEPLOY_WEIGHTS}: the run has not finished (or pass the file)")
        return candidate
    return path


def default_label(path: Path) -> str:
    """The run directory's name for a run's file, else the file name."""
    return path.parent.name if path.name in (DEPLOY_WEIGHTS, FINISH_WEIGHTS) and path.parent.name else path.name


def skeleton_of_file(path: Path, kernel_size: Optional[int] = None, label: Optional[str] = None) -> Skeleton:
    from acnet import load_state_dict_file

    weights = resolve_weights_path(Path(path))
    arrays = {name: tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
              for name, tensor in load_state_dict_file(weights).items()}  # WeightsError: one line
    return compute_skeleton(arrays, kernel_size, label or default_label(weights), str(weights))


def format_skeleton(skeleton: Skeleton) -> str:
    k = skeleton.kernel_size
    lines = [f"{skeleton.label}: mean normalised |W| over {len(skeleton.layers)} {k}x{k} layers, "
             f"skeleton ratio {skeleton.skeleton_ratio():.3f}"]
    lines.extend("  " + " ".join(f"{v:.3f}" for v in row) for row in skeleton.matrix)
    return "\n".join(lines)


def _import_pyplot():
    from utils.analysis.plotting import import_pyplot

    return import_pyplot("drawing", "or run without -o for the text output")


def draw_skeletons(skeletons: Sequence[Skeleton], path: Path) -> None:
    """Side-by-side KxK heatmaps on one colour scale [0, 1], values written in the cells; PNG."""
    plt = _import_pyplot()
    from acnet.fileio import atomic_path

    fig, axes = plt.subplots(1, len(skeletons), figsize=(3.4 * len(skeletons) + 0.8, 3.4), squeeze=False)
    image = None
    for ax, sk in zip(axes[0], skeletons):
        image = ax.imshow(sk.matrix, cmap="viridis", vmin=0.0, vmax=1.0)
        for (i, j), value in np.ndenumerate(sk.matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
        ax.set_title(f"{sk.label}\nskeleton ratio {sk.skeleton_ratio():.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="normalised magnitude")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Average normalised KxK kernel magnitudes of deploy weights (ACNet's skeleton figure).")
    parser.add_argument("weights", nargs="+", type=Path,
                        help=f"deploy weights files, or run directories holding {DEPLOY_WEIGHTS}")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the heatmaps to this PNG")
    parser.add_argument("--labels", nargs="+", default=None, help="one title per weights argument")
    parser.add_argument("-k", "--kernel-size", type=int, default=None,
                        help="which KxK kernels to average (default: the most common K > 1)")
    args = parser.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.weights):
            raise SkeletonError(f"--labels got {len(args.labels)} names for {len(args.weights)} weights arguments")
        if args.output is not None:
            _import_pyplot()  # fail before any output if the figure cannot be drawn
        labels = args.labels or [None] * len(args.weights)
        skeletons = [skeleton_of_file(p, args.kernel_size, label) for p, label in zip(args.weights, labels)]
        sizes = {sk.kernel_size for sk in skeletons}
        if len(sizes) > 1:
            raise SkeletonError(f"the files' most common kernel sizes differ ({sorted(sizes)}); choose one with -k")
        print("\n\n".join(format_skeleton(sk) for sk in skeletons))
        if args.output is not None:
            draw_skeletons(skeletons, args.output)
            print(f"\nfigure written to {args.output}", file=sys.stderr)
    except USER_ERRORS as exc:
        return report_error("kernel_skeleton.py", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
