"""A run: its identity, its folder and its recipe, defined once for every tool (torch-free).

Identity: ``(arch, block type, dataset, seed)``. The folder is ``<output-dir>/<name>`` with
``name = <arch>_<block>[_<dataset>][_s<seed>]_train``: the dataset only when it is not the arch's own,
the seed only when it is not :data:`DEFAULT_SEED` (so a seed-0 run keeps the name runs always had);
a QAT run of the same identity ends in ``_qat``. :class:`ExperimentPaths` names the files in it.
do_acnet.py, show_log.py, reproduce.py, robustness.py, kernel_skeleton.py and the benchmarks read
runs through this module. Recipe resolution (:func:`resolve_recipe`) and the guard of a continued
run (:func:`merge_saved_recipe`) live here too. What a run folder holds -- its record (identity),
lock and state -- is :mod:`utils.rundir.record`'s; reading a run's resumable state (torch) is
:mod:`utils.rundir.checkpoint`'s.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

from acnet.registry import block_type_names
from constructor import get_arch_spec
from train_configs import Recipe, get_recipe
from utils.errors import UsageError

__all__ = ["DEFAULT_SEED", "RUN_FILES", "LOG", "RECIPE", "SUMMARY", "INIT_WEIGHTS", "FINISH_WEIGHTS", "DEPLOY_WEIGHTS",
           "STATE", "CONSOLE", "ExperimentPaths", "experiment_name", "RunName", "parse_run_name", "block_types",
           "qat_experiment_name", "weights_argument",
           "RECIPE_OVERRIDES", "resolve_recipe", "merge_saved_recipe"]

#: The seed of a run whose folder name carries no ``_s<seed>``.
DEFAULT_SEED = 0
#: File names of a run folder (:class:`ExperimentPaths` is the way to reach them).
LOG, RECIPE, SUMMARY = "log.txt", "recipe.json", "summary.json"
INIT_WEIGHTS, FINISH_WEIGHTS, DEPLOY_WEIGHTS, STATE = "init.hdf5", "finish.hdf5", "finish_deploy.hdf5", "latest.pth"
#: reproduce.py appends each run's console output here (its last line names a failure).
CONSOLE = "console.txt"
#: The files that make a folder a run (any one of them).
RUN_FILES = (LOG, RECIPE, SUMMARY)
#: Recipe fields a command line may override (the option ``--x-y`` sets field ``x_y``).
RECIPE_OVERRIDES = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "val_every")


@dataclass(frozen=True)
class ExperimentPaths:
    """The files of one run folder ``root`` (see docs/training.md, "What a run writes")."""

    root: Path

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def init_weights(self) -> Path:
        return self.root / INIT_WEIGHTS

    @property
    def finish_weights(self) -> Path:
        return self.root / FINISH_WEIGHTS

    @property
    def deploy_weights(self) -> Path:
        return self.root / DEPLOY_WEIGHTS

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def console(self) -> Path:
        """The console output of a run started by reproduce.py."""
        return self.root / CONSOLE

    def final_weights(self) -> Path | None:
        """The run's weights to evaluate: ``finish_deploy.hdf5``, else ``finish.hdf5``; ``None`` if neither."""
        return next((p for p in (self.deploy_weights, self.finish_weights) if p.is_file()), None)


def experiment_name(arch: str, block_type: str, dataset: str, arch_dataset: str, seed: int = DEFAULT_SEED) -> str:
    """``<arch>_<block>[_<dataset>][_s<seed>]_train`` (``arch_dataset``: the dataset the arch is defined for)."""
    suffix = "" if dataset == arch_dataset else f"_{dataset}"
    if seed != DEFAULT_SEED:
        suffix += f"_s{seed}"
    return f"{arch}_{block_type}{suffix}_train"


class RunName(NamedTuple):
    """The parts of a run directory's name; those it does not carry are None."""

    arch: Optional[str]
    block_type: Optional[str]
    dataset: Optional[str]
    seed: Optional[int]


_SEED_TOKEN = re.compile(r"s(\d+)")


def parse_run_name(name: str) -> RunName:
    """Parts of ``<arch>_<block>[_<dataset>][_s<seed>]_train`` (do_acnet.py's ``experiment_name``).

    A name without ``_s<seed>`` has seed None here (do_acnet.py then used seed 0, other code may not
    have): :func:`run_seed` reads the seed the run recorded.
    """
    stem = name[: -len("_train")] if name.endswith("_train") else name
    tokens = stem.split("_")
    for index, token in enumerate(tokens):
        if token in block_types() and index > 0:
            arch, rest, seed = "_".join(tokens[:index]), tokens[index + 1:], None
            if rest and _SEED_TOKEN.fullmatch(rest[-1]):
                seed = int(rest.pop()[1:])
            return RunName(arch, token, "_".join(rest) or None, seed)
    return RunName(None, None, None, None)


def block_types() -> tuple[str, ...]:
    """The registered block type names (``acnet.registry``, read at each call)."""
    return block_type_names()


def weights_argument(path: str | os.PathLike, option: str) -> Path:
    """The weights file a command-line ``path`` stands for: the file itself, or a run directory's
    :meth:`ExperimentPaths.final_weights`. Raises ``ValueError`` with one line otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        weights = ExperimentPaths(path).final_weights()
        if weights is None:
            raise ValueError(f"{option}: {str(path)!r} is a directory with no weights file (neither finish_deploy.hdf5 "
                             "nor finish.hdf5: not a finished run); pass a weights file or a finished run directory")
        return weights
    raise ValueError(f"{option}: weights file {str(path)!r} does not exist")


def qat_experiment_name(train_name: str) -> str:
    """The QAT run's folder beside the training run's: ``..._train`` -> ``..._qat``."""
    return (train_name[: -len("_train")] if train_name.endswith("_train") else train_name) + "_qat"


def resolve_recipe(arch: str, overrides: Mapping[str, Any]):
    """The recipe the arch names (``ArchSpec.recipe``) with ``overrides`` (``None`` values ignored); a bad
    value is a :class:`UsageError`."""
    try:
        return get_recipe(get_arch_spec(arch).recipe_name, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc).replace("bad recipe value: ", "bad value: ")) from None


def merge_saved_recipe(saved: Mapping[str, Any], overrides: Mapping[str, Any], state_path: Path):
    """On continue the run keeps its recipe; an explicit override that contradicts it is an error."""
    recipe = Recipe(**saved)
    conflicts = [f"{field}={value!r} (run has {saved[field]!r})" for field, value in overrides.items()
                 if saved.get(field) != value]
    if conflicts:
        raise UsageError(f"-c continue: {state_path} was trained with a different recipe: " + ", ".join(conflicts)
                         + "; drop these options to continue, or start over with -c restart")
    return recipe
