"""Robustness check of the ACNet paper: top-1 on the test set flipped and rotated.

Usage::

    python robustness.py RUN_OR_WEIGHTS [RUN_OR_WEIGHTS ...] [-a ARCH -b BLOCK --dataset NAME]
                         [--data-dir DIR] [--batch-size 256] [--device auto] [--format text|markdown|csv]

Each argument is a run directory (``acnet_exps/<arch>_<block>_train``: arch, block type and dataset
are read from its ``summary.json`` / directory name / ``recipe.json``, the synthetic set's seed from
``recipe.json``, weights from ``finish_deploy.hdf5``, else ``finish.hdf5``) or a weights file (hdf5 or torch checkpoint, training-time or deploy form; then
``-a``/``-b``/``--dataset`` say what it is). Every model is evaluated on its dataset's test set as
is, flipped left-right, flipped up-down, and rotated by 90 and 180 degrees; the table gives top-1
per distortion and its drop from the undistorted top-1. The ACNet paper reports that ACB models
lose less under these distortions (their kernels' strengthened skeleton is symmetric under flips).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from utils.rundir.checkpoint import ExperimentPaths
from utils.errors import USER_ERRORS, UsageError, report_error
from utils.engine.guards import amp_cpu_warning
from utils.analysis.tables import render_table
from utils.analysis.collect import run_dataset


Distortion = Callable[[torch.Tensor], torch.Tensor]


def _require_square(images: torch.Tensor) -> None:
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotating by 90 degrees needs square images, got {images.shape[-2]}x{images.shape[-1]}")


def rotate90(images: torch.Tensor) -> torch.Tensor:
    """Rotate NCHW images by 90 degrees counter-clockwise."""
    _require_square(images)
    return torch.rot90(images, 1, dims=(2, 3))


# name -> NCHW batch transform; "original" first: the others' drops are measured against it.
DISTORTIONS: Mapping[str, Distortion] = {
    "original": lambda images: images,
    "flip_left_right": lambda images: torch.flip(images, dims=(3,)),
    "flip_up_down": lambda images: torch.flip(images, dims=(2,)),
    "rotate_90": rotate90,
    "rotate_180": lambda images: torch.rot90(images, 2, dims=(2, 3)),
}


def robustness_metrics(model: torch.nn.Module, loader, device: torch.device | str,
                       distortions: Mapping[str, Distortion] = DISTORTIONS, amp: bool = False) -> dict:
    """``{distortion name: utils.engine.evaluation.evaluate(...) metrics}`` for each distortion of the inputs."""
    from utils.engine.evaluation import evaluate

    return {name: evaluate(model, loader, device, input_transform=transform, amp=amp)
            for name, transform in distortions.items()}


class RobustnessError(UsageError):
    """A problem the user can fix; reported as one line."""


@dataclass(frozen=True)
class Target:
    """What to evaluate: a weights file and how to build its model and its test set."""

    label: str
    weights: Path
    arch: str
    block_type: str
    dataset: str
    data_options: dict  # extra keyword arguments for data.create_loaders (synthetic sizes, seed, ...)
    num_classes: Optional[int]
    data_dir: Optional[str] = None  # --data-dir, else the run's own (recipe.json), else the default root


def _read_run_files(paths: ExperimentPaths) -> tuple[dict, dict]:
    """``(record, summary)`` of a run folder through :mod:`utils.rundir.record` (``{}`` when absent); a corrupt one
    is one line naming it."""
    from utils.rundir.record import RecordError, read_json_object, read_record

    try:
        return read_record(paths) or {}, read_json_object(paths.summary) or {}
    except RecordError as exc:
        raise RobustnessError(f"{exc}; or pass the weights file with -a/-b/--dataset") from None


def resolve_target(path: Path, args: argparse.Namespace) -> Target:
    """A run directory or a weights file -> Target (command-line options override the run's files).

    For a run directory the arch, block type and dataset come from ``summary.json``, else ``recipe.json``
    (the dataset, else from the directory name: ``utils.analysis.collect.run_dataset``).
    """
    if not path.exists():
        raise RobustnessError(f"no such run directory or weights file: {path}")
    recipe: dict = {}
    summary: dict = {}
    run_name = None
    if path.is_dir():
        paths = ExperimentPaths(path)
        recipe, summary = _read_run_files(paths)
        if not recipe and not summary:
            raise RobustnessError(f"{path} has no recipe.json: pass a run directory written by do_acnet.py, "
                                  f"or a weights file with -a/-b/--dataset")
        weights = paths.final_weights()
        if weights is None:
            raise RobustnessError(f"{path} has neither finish_deploy.hdf5 nor finish.hdf5: the run has not finished")
        label = path.name
        run_name = path.name
    else:
        weights, label = path, path.name

    def run_value(key):
        return summary.get(key) if summary.get(key) is not None else recipe.get(key)

    arch = args.arch or run_value("arch")
    block_type = args.block_type or run_value("block_type")
    missing = [opt for opt, value in (("-a/--arch", arch), ("-b/--block-type", block_type)) if not value]
    if missing:
        raise RobustnessError(f"{path}: say what the weights are with {' and '.join(missing)}")
    import constructor

    spec = constructor.get_arch_spec(arch)  # ValueError listing the archs for an unknown one
    dataset = args.dataset or (run_dataset(run_name, summary, recipe) if run_name else None) or spec.dataset
    num_classes = args.num_classes
    data_options = {}
    if dataset == "synthetic":  # the test set is generated: rebuild the run's own one
        data_options = {"image_size": spec.input_size, "seed": int(recipe.get("seed") or 0)}
        num_val = recipe.get("synthetic_num_val")
        if num_val is not None:
            data_options["num_val"] = int(num_val)
        num_classes = num_classes or spec.num_classes
    data_dir = args.data_dir or recipe.get("data_dir")
    return Target(label, weights, str(arch), str(block_type), str(dataset), data_options, num_classes,
                  str(data_dir) if data_dir else None)


def evaluate_target(target: Target, args: argparse.Namespace, device: torch.device) -> dict:
    """Load the test set and the model (with the test set's number of classes), then every distortion."""
    import data
    from utils.engine.evaluation import load_model_for_eval

    loader_kwargs = dict(global_batch_size=args.batch_size, device=str(device), workers=args.workers,
                         eval_batch_size=args.batch_size, download=not args.no_download)
    loader_kwargs.update(target.data_options)
    if target.num_classes is not None and target.dataset == "synthetic":
        loader_kwargs["num_classes"] = target.num_classes
    _, eval_loader = data.create_loaders(target.dataset, target.data_dir, **loader_kwargs)
    model = load_model_for_eval(target.arch, target.block_type, target.weights, device=device,
                                num_classes=target.num_classes or eval_loader.num_classes)
    return robustness_metrics(model, eval_loader, device, amp=args.amp)


def _drop(value: float, reference: float) -> str:
    return f"{value - reference:+.2f}"


def result_rows(results: Mapping[str, Mapping[str, dict]], fmt: str) -> tuple:
    """Headers and rows: wide (one top-1 and drop column pair per run) for text/markdown, long for csv."""
    labels = list(results)
    distortions = list(next(iter(results.values())))
    if fmt == "csv":
        headers = ("run", "distortion", "top1", "top5", "loss", "top1_drop", "num_samples")
        rows = []
        for label in labels:
            base = results[label]["original"]["top1"]
            for name in distortions:
                m = results[label][name]
                rows.append((label, name, f"{m['top1']:.4f}", f"{m['top5']:.4f}", f"{m['loss']:.6f}",
                             _drop(m["top1"], base), str(int(m["num_samples"]))))
        return headers, rows
    headers = ["distortion"]
    for label in labels:
        headers += [f"{label} top1", "drop"]
    rows = []
    for name in distortions:
        row = [name]
        for label in labels:
            top1 = results[label][name]["top1"]
            row += [f"{top1:.2f}", "" if name == "original" else _drop(top1, results[label]["original"]["top1"])]
        rows.append(row)
    return headers, rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Top-1 on the test set as is, flipped left-right / up-down, rotated 90 / 180 degrees.")
    parser.add_argument("targets", nargs="+", type=Path, help="run directories or weights files")
    parser.add_argument("-a", "--arch", default=None, help="architecture (for a bare weights file)")
    parser.add_argument("-b", "--block-type", default=None, help="base, acb, dbb or orepa (for a bare weights file)")
    parser.add_argument("--dataset", default=None, help="test set (default: the run's, else the arch's own)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset root (default: the run's own, else <dataset>_data)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size, if not the dataset's")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--no-download", action="store_true", help="never download a missing CIFAR set")
    parser.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    args = parser.parse_args(argv)

    try:
        if args.batch_size < 1:
            raise RobustnessError(f"--batch-size must be at least 1, got {args.batch_size}")
        try:
            device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                                  else args.device)
        except RuntimeError:
            raise RobustnessError(f"--device {args.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RobustnessError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        amp_warning = amp_cpu_warning(device.type, args.amp)
        if amp_warning:
            print(f"robustness.py: warning: {amp_warning}", file=sys.stderr)
        targets = [resolve_target(path, args) for path in args.targets]
        labels = [t.label for t in targets]
        if len(set(labels)) < len(labels):
            labels = [str(t.weights) for t in targets]
        results = {label: evaluate_target(t, args, device) for label, t in zip(labels, targets)}
    except (*USER_ERRORS, ValueError) as exc:  # ValueError: a device string torch refuses
        return report_error("robustness.py", exc)
    headers, rows = result_rows(results, args.format)
    print(render_table(headers, rows, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
