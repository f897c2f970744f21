"""The do_acnet.py command line and its table of modes: train, eval, convert, export, qat.

A :class:`Mode` is one object: its command-line arguments (``add_arguments``), its checks on them
(``check``, raising :class:`utils.errors.UsageError`) and its run function, which takes the typed
:class:`utils.command.Command` and the process context, never the argparse Namespace. The mode of
a command is the one whose option is given (``--eval-only``, ``--convert``, ``--export-onnx``,
``--qat``); none: train. Giving two is refused. A new mode is one more :class:`Mode` in
:data:`MODES` (and its run function in its own module).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from utils.errors import OneLineUsageParser, UsageError
from utils.rundir.identity import DEFAULT_SEED, RECIPE_OVERRIDES

__all__ = ["Mode", "MODES", "DATASETS_BY_INPUT_SIZE", "build_parser", "select_mode", "check_args",
           "parse_command", "command_from_args"]

#: Which datasets an arch can train on, by its input size.
DATASETS_BY_INPUT_SIZE = {32: ("cifar10", "cifar100", "synthetic"), 224: ("imagenet", "synthetic")}
_GROUPS = {
    "recipe": "recipe overrides (defaults: train_configs/recipes.py for the arch)",
    "io": "data and outputs",
    "run": "execution",
    "tools": "standalone tools (no training)",
    "deploy": "deployment: ONNX and int8 (the 'deploy' extra; see utils/engine/deploy.py, utils/modes/qat.py)",
}
Groups = dict[str, Any]  # key of _GROUPS -> its argparse argument group


@dataclass(frozen=True)
class Mode:
    """One way do_acnet.py runs. ``option``: the flag that selects it (``None``: the default mode);
    ``main_rank_only``: only global rank 0 runs it (the others wait for nothing)."""

    name: str
    option: Optional[str]
    add_arguments: Callable[[Groups], None]
    run: Callable[..., None]  # run(command, ctx, run_start)
    check: Optional[Callable[[argparse.Namespace], None]] = None  # beyond the common checks (check_args)
    main_rank_only: bool = False

    @property
    def dest(self) -> Optional[str]:
        return None if self.option is None else self.option.lstrip("-").replace("-", "_")


# ------------------------------------------------------------------------------------------ train
def _train_arguments(groups: Groups) -> None:
    recipe = groups["recipe"]
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--batch-size", type=int, help="GLOBAL batch size, split over the ranks")
    recipe.add_argument("--lr", type=float, help="base learning rate (for the global batch; not auto-scaled)")
    recipe.add_argument("--weight-decay", type=float)
    recipe.add_argument("--warmup-epochs", type=float, help="linear warmup length (default 0, the original)")
    recipe.add_argument("--label-smoothing", type=float)
    recipe.add_argument("--val-every", type=int, help="evaluate every N epochs (and every epoch near the end)")
    recipe.add_argument("--init-weights", metavar="FILE",
                        help="start from FILE (ours or the original ACNet/DBB code's; same block type, base or deploy "
                             "weights: utils/engine/init_weights.py) instead of a fresh initialisation")
    recipe.add_argument("--init-weights-skip-classifier", action="store_true",
                        help="with --init-weights: keep a fresh classifier (e.g. another number of classes)")


def _run_train(cmd, ctx, run_start: float) -> None:
    from utils.modes.train import run_training

    run_training(cmd, ctx, run_start)


# ------------------------------------------------------------------------------------------ eval
def _eval_arguments(groups: Groups) -> None:
    groups["tools"].add_argument("--eval-only", metavar="WEIGHTS",
                                 help="evaluate WEIGHTS (hdf5 or .pth; training-time or deploy form) on --dataset")


def _check_eval(args: argparse.Namespace) -> None:
    from utils.rundir.checkpoint import weights_argument

    try:
        args.eval_weights = weights_argument(args.eval_only, "--eval-only")  # a file, or a run directory's
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _run_eval(cmd, ctx, run_start: float) -> None:
    from utils.engine.evaluation import run_eval_only

    run_eval_only(cmd, ctx)


# ------------------------------------------------------------------------------------------ convert
def _convert_arguments(groups: Groups) -> None:
    tools = groups["tools"]
    tools.add_argument("--convert", nargs=2, metavar=("SRC", "DST"),
                       help="convert training-time weights SRC into deploy weights DST (hdf5, or .pth/.pt)")
    tools.add_argument("--format", choices=("ours", "acnet", "dbb"), default="ours",
                       help="names in --convert's DST: ours (default), or the original ACNet / DBB code's deploy "
                            "names (then SRC may also be deploy weights)")


def _check_convert(args: argparse.Namespace) -> None:
    src, dst = args.convert
    if not Path(src).is_file():
        raise UsageError(f"--convert: source weights file {src!r} "
                         + ("is a directory" if Path(src).is_dir() else "does not exist"))
    if Path(dst).resolve() == Path(src).resolve():
        raise UsageError("--convert: DST must differ from SRC (the training-time weights are kept)")


def _run_convert(cmd, ctx, run_start: float) -> None:
    from utils.modes.convert import convert_file

    convert_file(cmd.arch, cmd.block_type, *cmd.convert, cmd.input_size, cmd.format)


# ------------------------------------------------------------------------------------------ export
def _export_arguments(groups: Groups) -> None:
    from utils.engine.deploy import DEFAULT_CALIB_IMAGES, QUANTIZE_CHOICES

    deploy = groups["deploy"]
    deploy.add_argument("--export-onnx", nargs=2, metavar=("WEIGHTS", "OUT"),
                        help="export WEIGHTS (any form --eval-only takes) as the checked ONNX deploy model OUT")
    deploy.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="with --export-onnx: also int8 static PTQ (OUT.int8.onnx), fp32/int8 top-1 on --dataset")
    deploy.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                        help=f"training images to calibrate int8 activations on (default {DEFAULT_CALIB_IMAGES})")
    deploy.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")


def _check_export(args: argparse.Namespace) -> None:
    weights, out = args.export_onnx
    if not Path(weights).is_file():
        raise UsageError(f"--export-onnx: weights file {weights!r} does not exist")
    if Path(out).resolve() == Path(weights).resolve():
        raise UsageError("--export-onnx: OUT must differ from WEIGHTS")
    if Path(out).is_dir():
        raise UsageError(f"--export-onnx: OUT {out!r} is a directory; give a file name such as model.onnx")


def _run_export(cmd, ctx, run_start: float) -> None:
    from utils.engine.deploy import require_deploy_extras, run_export

    require_deploy_extras()
    run_export(cmd, ctx)


# ------------------------------------------------------------------------------------------ qat
def _qat_arguments(groups: Groups) -> None:
    groups["deploy"].add_argument("--qat", action="store_true",
                                  help="fine-tune --init-weights with int8 fake quantization of the equivalent "
                                       "kernels, then export and test the int8 model (lr default: the recipe's / 100)")


def _check_qat(args: argparse.Namespace) -> None:
    if not args.init_weights:
        raise UsageError("--qat fine-tunes trained weights: give --init-weights FILE (e.g. a run's finish.hdf5)")
    if args.conti_or_fs != "fs":
        raise UsageError(f"--qat always starts from --init-weights (an earlier QAT run in its folder is moved into "
                         f"previous-<time>/); drop -c {args.conti_or_fs}")


def _run_qat(cmd, ctx, run_start: float) -> None:
    from utils.engine.deploy import require_deploy_extras
    from utils.modes.qat import run_qat

    require_deploy_extras()
    run_qat(cmd, ctx, run_start)


#: The modes, the default (train) first; ``-h`` lists their options in this order.
MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("train", None, _train_arguments, _run_train),
    Mode("eval", "--eval-only", _eval_arguments, _run_eval, _check_eval),
    Mode("convert", "--convert", _convert_arguments, _run_convert, _check_convert, main_rank_only=True),
    Mode("export", "--export-onnx", _export_arguments, _run_export, _check_export, main_rank_only=True),
    Mode("qat", "--qat", _qat_arguments, _run_qat, _check_qat),
)}


# ------------------------------------------------------------------------------------------ parser
def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The do_acnet.py parser: the run's identity, the common options, then every mode's arguments."""
    import constructor
    import data
    from acnet.registry import block_type_names

    parser = OneLineUsageParser(
        prog="do_acnet.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        short_usage="do_acnet.py -a ARCH -b BLOCK [options]")  # a refusal: this hint and one error line
    parser.add_argument("-a", "--arch", required=True, choices=constructor.list_archs(), metavar="ARCH",
                        help="architecture: " + ", ".join(constructor.list_archs()))
    parser.add_argument("-b", "--block-type", "--block_type", dest="block_type", default="acb",
                        choices=block_type_names(), help="conv-BN unit type (default: acb)")
    parser.add_argument("-c", "--conti-or-fs", "--conti_or_fs", dest="conti_or_fs", default="fs",
                        choices=("fs", "continue", "restart"),
                        help="fs: from scratch (default; refused on an interrupted run); continue: resume latest.pth; "
                             "restart: move an earlier run's files into <folder>/previous-<time>/, then start")
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}  # help lists them in order
    modes = list(MODES.values())
    modes[0].add_arguments(groups)  # the default mode's options (the recipe) first
    io = groups["io"]
    io.add_argument("--dataset", choices=data.DATASETS, help="default: the arch's own (cifar10 or imagenet)")
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
    for mode in modes[1:]:
        mode.add_arguments(groups)
    return parser


def select_mode(args: argparse.Namespace) -> Mode:
    """The mode whose option is given (train when none is); two given is a :class:`UsageError`."""
    given = [mode for mode in MODES.values() if mode.dest is not None and getattr(args, mode.dest)]
    if len(given) > 1:
        raise UsageError(f"{given[0].option} and {given[1].option} are separate tools; give one of them")
    return given[0] if given else MODES["train"]


def check_args(args: argparse.Namespace) -> Mode:
    """Every check that needs no data and no model (nothing is written before they pass); returns the mode."""
    positive = {"--print-freq": args.print_freq, "--synthetic-num-train": args.synthetic_num_train,
                "--synthetic-num-val": args.synthetic_num_val}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    mode = select_mode(args)
    if args.init_weights_skip_classifier and not args.init_weights:
        raise UsageError("--init-weights-skip-classifier applies to --init-weights FILE")
    if args.init_weights and mode.name in ("eval", "convert"):
        raise UsageError("--init-weights starts a training run; it does not apply to --eval-only / --convert")
    if args.init_weights and not Path(args.init_weights).is_file():
        raise UsageError(f"--init-weights: weights file {args.init_weights!r} does not exist")
    if args.format != "ours" and mode.name != "convert":
        raise UsageError("--format applies to --convert SRC DST")
    if args.quantize and mode.name != "export":
        raise UsageError("--quantize applies to --export-onnx (--qat writes its own int8 model)")
    if args.calib_images < 1:
        raise UsageError(f"--calib-images must be >= 1, got {args.calib_images}")
    if args.opset is not None and args.opset < 18:
        raise UsageError(f"--opset must be >= 18 (the torch.export-based ONNX exporter), got {args.opset}")
    if mode.check is not None:
        mode.check(args)
    if args.exp_name is not None and (not args.exp_name or "/" in args.exp_name or args.exp_name in (".", "..")):
        raise UsageError(f"--exp-name must be a plain folder name, got {args.exp_name!r}")
    return mode


def resolve_dataset(arch: str, dataset: Optional[str], synthetic_sizes: Sequence[Optional[int]] = ()):
    """``(arch spec, dataset)``: ``dataset`` or the arch's own, checked against the arch's input size."""
    import constructor
    import data

    spec = constructor.get_arch_spec(arch)
    dataset = dataset or spec.dataset
    allowed = DATASETS_BY_INPUT_SIZE.get(spec.input_size, data.DATASETS)
    if dataset not in allowed:
        raise UsageError(f"arch {arch} takes {spec.input_size}x{spec.input_size} inputs; --dataset {dataset} "
                         f"does not fit (use one of: {', '.join(allowed)})")
    if dataset != "synthetic" and any(size is not None for size in synthetic_sizes):
        raise UsageError("--synthetic-num-train/--synthetic-num-val only apply to --dataset synthetic")
    return spec, dataset


def command_from_args(args: argparse.Namespace, mode: Mode, argv: Sequence[str] = (), script: str = "do_acnet.py") -> Any:
    """The typed :class:`utils.command.Command` of checked arguments (resolves the dataset and the recipe);
    ``script`` and ``argv`` make its recorded command line."""
    from utils.command import Command, DataOptions, TrainSettings
    from utils.rundir.identity import resolve_recipe

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
        device=args.device, local_rank=args.local_rank, init_weights=args.init_weights,
        init_weights_skip_classifier=args.init_weights_skip_classifier,
        eval_weights=getattr(args, "eval_weights", None), eval_source=args.eval_only,
        convert=tuple(args.convert) if args.convert else None, format=args.format,
        export_onnx=tuple(args.export_onnx) if args.export_onnx else None, quantize=args.quantize,
        calib_images=args.calib_images, opset=args.opset,
        command_line=shlex.join([sys.executable, os.path.abspath(script), *argv]), argv=tuple(argv))


def parse_command(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None,
                  script: str = "do_acnet.py"):
    """``(mode, command)`` of a do_acnet.py command line; a bad one raises :class:`UsageError`
    (argparse's own errors exit with status 2 as usual)."""
    parser = parser or build_parser()
    args = parser.parse_args(list(argv))
    mode = check_args(args)
    return mode, command_from_args(args, mode, argv, script)
