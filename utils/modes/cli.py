"""do_acnet.py's command line: the options every mode shares, then each mode's (:mod:`utils.modes.registry`).

:func:`parse_command` turns a command line into ``(mode, command)``: the :class:`utils.modes.registry.Mode`
whose option is given (none: train; two: refused) and the typed :class:`utils.command.Command`, whose
``options`` are the mode's own. Every check that needs no data and no model runs here, so nothing is
written before they pass. Torch-free: the choices come from the registries (arch, block type, dataset),
which list names without importing torch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import constructor
import data
from acnet.registry import block_type_names
from utils.command import Command, DataOptions, TrainSettings
from utils.errors import OneLineUsageParser, UsageError
from utils.modes.registry import GROUPS, MODES, Mode, default_mode
from utils.rundir.identity import DEFAULT_SEED, RECIPE_OVERRIDES, resolve_recipe

__all__ = ["arch_names", "dataset_names", "build_parser", "select_mode", "check_args",
           "resolve_dataset", "command_from_args", "parse_command", "given_options", "ArgumentsError"]


class ArgumentsError(UsageError):
    """A command line argparse refuses, raised (not printed) by a parser made with ``raise_errors=True``."""


class _RaisingParser(OneLineUsageParser):
    def error(self, message: str):
        raise ArgumentsError(message)


def arch_names() -> list[str]:
    """The registered architecture names (``constructor``'s registry, read at each call)."""
    return constructor.list_archs()


def dataset_names() -> Sequence[str]:
    """The registered dataset names (``data``'s, read at each call)."""
    return data.dataset_names()


# ------------------------------------------------------------------------------------------ parser
def build_parser(description: Optional[str] = None, *, arch_required: bool = True,
                 raise_errors: bool = False) -> argparse.ArgumentParser:
    """The do_acnet.py parser: the run's identity, the common options, then every mode's arguments.
    ``raise_errors``: a refused command line raises :class:`ArgumentsError` instead of exiting (status 2);
    ``arch_required=False`` parses options without ``-a`` (reproduce.py's options after ``--``)."""
    parser_class = _RaisingParser if raise_errors else OneLineUsageParser
    parser = parser_class(
        prog="do_acnet.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        short_usage="do_acnet.py -a ARCH -b BLOCK [options]")  # a refusal: this hint and one error line
    archs = arch_names()
    parser.add_argument("-a", "--arch", required=arch_required, choices=archs, metavar="ARCH",
                        help="architecture: " + ", ".join(archs))
    parser.add_argument("-b", "--block-type", "--block_type", dest="block_type", default="acb",
                        choices=block_type_names(), help="conv-BN unit type (default: acb)")
    parser.add_argument("-c", "--conti-or-fs", "--conti_or_fs", dest="conti_or_fs", default="fs",
                        choices=("fs", "continue", "restart"),
                        help="fs: from scratch (default; refused on an interrupted run); continue: resume latest.pth; "
                             "restart: move an earlier run's files into <folder>/previous-<time>/, then start")
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}  # help lists them in order
    default = default_mode()
    default.add_arguments(groups)  # the default mode's options (the recipe) first
    io = groups["io"]
    io.add_argument("--dataset", choices=dataset_names(), help="default: the arch's own (cifar10 or imagenet)")
    io.add_argument("--data-dir", help="dataset root (default: cifar10_data / cifar100_data / imagenet_data)")
    io.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                    help="download CIFAR when missing (default: on)")
    io.add_argument("--synthetic-num-train", type=int, help="synthetic dataset: training images")
    io.add_argument("--synthetic-num-val", type=int, help="synthetic dataset: evaluation images")
    io.add_argument("--output-dir", default="acnet_exps", help="default: acnet_exps")
    io.add_argument("--exp-name", help="experiment folder name (default: <arch>_<block>[_<dataset>][_s<seed>]_train)")
    io.add_argument("--workers", type=int, default=4, help="data loader worker processes per rank (default 4)")
    io.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                    help="ImageNet: decode JPEGs in the loader workers (cpu, default) or per batch on the GPU (gpu)")
    run = groups["run"]
    run.add_argument("--seed", type=int, default=DEFAULT_SEED,
                     help="random seed, part of the run's identity: a seed other than 0 adds _s<seed> to the "
                          "folder name (default 0)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast (default: on with CUDA, off on CPU)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last memory format (default: on with CUDA)")
    run.add_argument("--compile", action="store_true", help="torch.compile the training step model")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (CUDA)")
    run.add_argument("--print-freq", type=int, default=50, help="iterations between progress updates")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    run.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                     help=argparse.SUPPRESS)  # passed by torch.distributed.launch
    for mode in MODES.values():
        if mode is not default:
            mode.add_arguments(groups)
    return parser


def select_mode(args: argparse.Namespace) -> Mode:
    """The mode whose option is given (train when none is); two given is a :class:`UsageError`."""
    given = [mode for mode in MODES.values() if mode.dest is not None and getattr(args, mode.dest)]
    if len(given) > 1:
        raise UsageError(f"{given[0].option} and {given[1].option} are separate tools; give one of them")
    return given[0] if given else default_mode()


def check_args(args: argparse.Namespace) -> Mode:
    """Every check that needs no data and no model (nothing is written before they pass); returns the mode.
    The common options first, then each mode's own options (whatever mode runs), then the selected mode's."""
    positive = {"--print-freq": args.print_freq, "--synthetic-num-train": args.synthetic_num_train,
                "--synthetic-num-val": args.synthetic_num_val}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    mode = select_mode(args)
    for owner in MODES.values():
        if owner.check_options is not None:
            owner.check_options(args, mode)
    if mode.check is not None:
        mode.check(args)
    if args.exp_name is not None and (not args.exp_name or "/" in args.exp_name or args.exp_name in (".", "..")):
        raise UsageError(f"--exp-name must be a plain folder name, got {args.exp_name!r}")
    return mode


def resolve_dataset(arch: str, dataset: Optional[str], synthetic_sizes: Sequence[Optional[int]] = ()):
    """``(arch spec, dataset)``: ``dataset`` or the arch's own, checked against the arch's input size."""
    spec = constructor.get_arch_spec(arch)
    dataset = dataset or spec.dataset
    allowed = data.registry.datasets_for_input_size(spec.input_size)
    if dataset not in allowed:
        raise UsageError(f"arch {arch} takes {spec.input_size}x{spec.input_size} inputs; --dataset {dataset} "
                         f"does not fit (use one of: {', '.join(allowed)})")
    if dataset != "synthetic" and any(size is not None for size in synthetic_sizes):
        raise UsageError("--synthetic-num-train/--synthetic-num-val only apply to --dataset synthetic")
    return spec, dataset


def command_from_args(args: argparse.Namespace, mode: Mode, argv: Sequence[str] = (),
                      script: str = "do_acnet.py") -> Command:
    """The typed :class:`utils.command.Command` of checked arguments (resolves the dataset and the recipe;
    ``options``: the mode's own, ``mode.options(args)``); ``script`` and ``argv`` make its recorded command line."""
    spec, dataset = resolve_dataset(args.arch, args.dataset, (args.synthetic_num_train, args.synthetic_num_val))
    overrides = {field: getattr(args, field) for field in RECIPE_OVERRIDES if getattr(args, field) is not None}
    return Command(
        mode=mode.name, arch=args.arch, block_type=args.block_type, dataset=dataset, arch_dataset=spec.dataset,
        input_size=spec.input_size, num_classes=spec.num_classes, recipe=resolve_recipe(args.arch, overrides),
        overrides=overrides, seed=args.seed, continuing=args.conti_or_fs == "continue",
        restart=args.conti_or_fs == "restart",
        output_dir=Path(args.output_dir), exp_name=args.exp_name,
        data=DataOptions(data_dir=args.data_dir, download=args.download, synthetic_num_train=args.synthetic_num_train,
                         synthetic_num_val=args.synthetic_num_val, workers=args.workers,
                         decode=args.decode),
        train=TrainSettings(amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                            sync_bn=args.sync_bn, print_freq=args.print_freq, progress=not args.no_progress),
        device=args.device, local_rank=args.local_rank, options=mode.options(args),
        command_line=shlex.join([sys.executable, os.path.abspath(script), *argv]), argv=tuple(argv))


def parse_command(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None,
                  script: str = "do_acnet.py"):
    """``(mode, command)`` of a do_acnet.py command line; a bad one raises :class:`UsageError`
    (argparse's own errors exit with status 2 as usual)."""
    parser = parser or build_parser()
    args = parser.parse_args(list(argv))
    mode = check_args(args)
    return mode, command_from_args(args, mode, argv, script)


_NOT_GIVEN = object()


def given_options(argv: Sequence[str], dests: Sequence[str]) -> dict[str, Any]:
    """``{dest: value}`` of the do_acnet.py options among ``dests`` that ``argv`` sets, in any spelling
    (``--se=2`` is ``seed``), even to their default; ``-a`` is not required. A command line argparse
    refuses is an :class:`ArgumentsError`; ``-h`` exits as usual."""
    given = argparse.Namespace(**dict.fromkeys(dests, _NOT_GIVEN))  # argparse fills only the attributes it lacks
    parsed = build_parser(arch_required=False, raise_errors=True).parse_args(list(argv), namespace=given)
    return {dest: getattr(parsed, dest) for dest in dests if getattr(parsed, dest) is not _NOT_GIVEN}
