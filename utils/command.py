"""What a do_acnet.py command asks for, as typed values (:class:`Command`), and the pieces every mode shares.

:func:`utils.modes.cli.parse_command` turns the command line into one :class:`Command`; the modes'
runners (:data:`utils.modes.registry.MODES`) read only that, never the argparse Namespace. A Command
carries what every mode shares (the run's identity, recipe, data and execution settings); a mode's own
options are one value in ``options``, made by its :class:`utils.modes.registry.Mode`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import constructor
import data
from acnet.registry import get_block_type
from train_configs import Recipe
from utils.errors import UsageError
from utils.rundir.identity import ExperimentPaths, experiment_name, qat_experiment_name

__all__ = ["DataOptions", "TrainSettings", "Command", "block_kwargs", "create_loaders"]


@dataclass(frozen=True)
class DataOptions:
    """Where the data comes from (``data.create_loaders``'s arguments besides the batch and the ranks)."""

    data_dir: Optional[str] = None
    download: bool = True
    synthetic_num_train: Optional[int] = None
    synthetic_num_val: Optional[int] = None
    workers: int = 4
    decode: str = "cpu"  # ImageNet JPEG decoding: in the loader workers ("cpu") or per batch on the GPU ("gpu")


@dataclass(frozen=True)
class TrainSettings:
    """How a training (or QAT) run executes; ``None`` for amp / channels_last: on with CUDA."""

    amp: Optional[bool] = None
    channels_last: Optional[bool] = None
    compile: bool = False
    sync_bn: bool = False
    print_freq: int = 50
    progress: bool = True


@dataclass(frozen=True)
class Command:
    """One do_acnet.py command: the run's identity, its recipe, how it runs, and its mode's own ``options``."""

    mode: str
    arch: str
    block_type: str
    dataset: str  # the dataset in use
    arch_dataset: str  # the dataset the arch is defined for
    input_size: int
    num_classes: int  # the arch's default (the data decides the model's)
    recipe: Recipe
    overrides: dict[str, Any]  # the recipe fields the command line set explicitly
    seed: int
    continuing: bool  # -c continue
    output_dir: Path
    exp_name: Optional[str]
    data: DataOptions
    train: TrainSettings
    device: str = "auto"
    local_rank: Optional[int] = None
    options: Any = None  # the mode's own options (``Mode.options``: e.g. ``utils.modes.registry.EvalOptions``)
    command_line: str = ""
    argv: tuple[str, ...] = ()
    restart: bool = False  # -c restart: move an earlier run aside, then train from scratch

    @property
    def train_name(self) -> str:
        """The training run's folder name (``--exp-name`` or :func:`utils.rundir.identity.experiment_name`)."""
        return self.exp_name or experiment_name(self.arch, self.block_type, self.dataset, self.arch_dataset, self.seed)

    @property
    def qat_name(self) -> str:
        return self.exp_name or qat_experiment_name(
            experiment_name(self.arch, self.block_type, self.dataset, self.arch_dataset, self.seed))

    def paths(self, name: Optional[str] = None) -> ExperimentPaths:
        return ExperimentPaths(self.output_dir / (name or self.train_name))


def block_kwargs(block_type: str, recipe: Recipe) -> dict[str, Any]:
    """Per-block options from the recipe, as the block type declares them (ACB: gamma init)."""
    return {name: getattr(recipe, name) for name in get_block_type(block_type).recipe_options}


def create_loaders(cmd: Command, recipe: Recipe, ctx):
    """``(train_loader, eval_loader)`` of the command's dataset, for this rank, loaded rank after rank."""
    # torch (the process group): a runner calls this; the command line is parsed without torch
    from utils.engine.distributed import in_turn

    if recipe.batch_size % ctx.world_size:
        raise UsageError(f"the global batch size {recipe.batch_size} is not divisible by the {ctx.world_size} "
                         "ranks; pass --batch-size as a multiple of the number of processes")
    kwargs: dict[str, Any] = {}
    if data.get_dataset(cmd.dataset).input_size is None:  # made at any size (synthetic): the arch's size and classes
        kwargs.update(image_size=cmd.input_size, num_classes=cmd.num_classes)
    if cmd.dataset == "synthetic":
        if cmd.data.synthetic_num_train is not None:
            kwargs["num_train"] = cmd.data.synthetic_num_train
        if cmd.data.synthetic_num_val is not None:
            kwargs["num_val"] = cmd.data.synthetic_num_val
    return in_turn(lambda: data.create_loaders(cmd.dataset, cmd.data.data_dir, recipe.batch_size, rank=ctx.rank,
                                               world_size=ctx.world_size, device=ctx.device,
                                               workers=cmd.data.workers, seed=cmd.seed, download=cmd.data.download,
                                               decode=cmd.data.decode, **kwargs),
                   ctx, lambda ranks: data.DatasetError(f"rank(s) {ranks} could not load the dataset (their error "
                                                        "is printed above)"))


def model_builder(cmd: Command, recipe: Recipe, num_classes: int):
    """``build(deploy=False)``: the command's arch with its block type and the recipe's block options."""
    def build(deploy: bool = False):
        return constructor.build_model(cmd.arch, cmd.block_type, deploy=deploy, num_classes=num_classes,
                                       **block_kwargs(cmd.block_type, recipe))

    return build
