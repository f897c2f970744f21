"""The table of do_acnet.py's modes: each mode declared once, as one :class:`Mode` (torch-free).

A mode is everything do_acnet.py needs to know about one way to run:

* ``option``: the flag that selects it (``None``: the default mode, ``train``); giving two is refused;
* ``add_arguments(groups)``: its command-line arguments, into the parser's groups (:data:`GROUPS`);
* ``check_options(args, selected)``: checks of its own options whatever mode runs (a value out of
  range, an option of this mode given to another); ``check(args)``: checks when it is the one that runs.
  Both raise :class:`utils.errors.UsageError` and never change ``args``;
* ``options(args)``: its own options, as one frozen value, which the runner reads as ``cmd.options``
  (:class:`utils.command.Command` carries the options every mode shares, never another mode's);
* ``runner``: ``"package.module:function"``, imported only when the mode runs (so the table, the parser
  and ``do_acnet.py -h`` import no torch), called as ``runner(cmd, ctx, run_start)``;
* how it runs: ``main_rank_only`` (only global rank 0 runs it), ``sweepable`` (reproduce.py may run it as
  a sweep of training runs; the others are refused after its ``--``), ``on_interrupt`` (the line for
  Ctrl-C; ``None``: where the run stopped and how to resume it).

:data:`MODES` is read at call time, so :func:`register_mode` adds a mode everywhere: a new mode is one
module (its arguments, checks, options and runner) and one ``register_mode(Mode(...))`` line
(``tests/test_new_mode.py`` does exactly that).
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from utils.errors import UsageError
from utils.rundir.identity import weights_argument

__all__ = ["Mode", "MODES", "GROUPS", "Groups", "register_mode", "unregister_mode", "get_mode", "default_mode", "mode_names",
           "TrainModeOptions", "EvalOptions", "ConvertOptions", "ExportOptions", "QatOptions",
           "DEFAULT_CALIB_IMAGES", "QUANTIZE_CHOICES"]

#: The parser's argument groups, in the order ``-h`` lists them (key -> title).
GROUPS = {
    "recipe": "recipe overrides (defaults: train_configs/recipes.py for the arch)",
    "io": "data and outputs",
    "run": "execution",
    "tools": "standalone tools (no training)",
    "deploy": "deployment: ONNX and int8 (the 'deploy' extra; see utils/engine/deploy.py, utils/modes/qat.py)",
}
Groups = dict[str, Any]  # key of GROUPS -> its argparse argument group
Runner = Callable[..., Any]  # runner(cmd, ctx, run_start)


def _no_arguments(groups: Groups) -> None:
    """A mode with no arguments of its own."""


def _no_options(args: argparse.Namespace) -> None:
    """A mode with no options of its own: ``cmd.options`` is ``None``."""


@dataclass(frozen=True)
class Mode:
    """One way do_acnet.py runs (module docstring)."""

    name: str
    option: Optional[str]
    runner: Union[str, Runner]
    add_arguments: Callable[[Groups], None] = _no_arguments
    options: Callable[[argparse.Namespace], Any] = _no_options
    check: Optional[Callable[[argparse.Namespace], None]] = None
    check_options: Optional[Callable[[argparse.Namespace, "Mode"], None]] = None
    main_rank_only: bool = False
    sweepable: bool = False
    on_interrupt: Optional[str] = None

    @property
    def dest(self) -> Optional[str]:
        """The attribute of the parsed arguments that holds ``option`` (``None`` for the default mode)."""
        return None if self.option is None else self.option.lstrip("-").replace("-", "_")

    def run_function(self) -> Runner:
        """The runner, imported now (``"package.module:function"``) or as given."""
        if callable(self.runner):
            return self.runner
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)

    def run(self, cmd: Any, ctx: Any, run_start: float) -> Any:
        return self.run_function()(cmd, ctx, run_start)


#: The registry: mode name -> :class:`Mode`, the default mode (train) first; ``-h`` lists their options
#: in this order. Read it at call time; :func:`register_mode` adds one.
MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Add ``mode`` to :data:`MODES` (the parser, do_acnet.py and reproduce.py see it from then on); a
    taken name or option, a second default mode or a runner that is not ``"package.module:function"``
    is a ``ValueError``."""
    if not isinstance(mode, Mode):
        raise TypeError(f"register_mode takes a Mode, got {type(mode).__name__}")
    if mode.name in MODES:
        raise ValueError(f"mode {mode.name!r} is already registered")
    if mode.option is not None and not mode.option.startswith("--"):
        raise ValueError(f"mode {mode.name!r}: its option must be a long option ('--name'), got {mode.option!r}")
    taken = {other.option: other.name for other in MODES.values()}
    if mode.option in taken:
        raise ValueError(f"mode {mode.name!r}: {mode.option or 'the default mode'} is mode {taken[mode.option]!r}'s")
    if not callable(mode.runner) and (not isinstance(mode.runner, str) or mode.runner.count(":") != 1):
        raise ValueError(f"mode {mode.name!r}: runner must be 'package.module:function' or a callable, "
                         f"got {mode.runner!r}")
    MODES[mode.name] = mode
    return mode


def unregister_mode(name: str) -> None:
    """Remove mode ``name`` from :data:`MODES` (the inverse of :func:`register_mode`)."""
    get_mode(name)
    del MODES[name]


def get_mode(name: str) -> Mode:
    """The :class:`Mode` called ``name``; an unknown name is a ``ValueError`` listing the registered ones."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mode {name!r}; registered modes: {', '.join(MODES)}") from None


def default_mode() -> Mode:
    """The mode that runs when no mode's option is given (the one whose ``option`` is ``None``: train)."""
    return next(mode for mode in MODES.values() if mode.option is None)


def mode_names() -> tuple[str, ...]:
    """The registered mode names, in table order."""
    return tuple(MODES)


# ------------------------------------------------------------------------------------------ train
@dataclass(frozen=True)
class TrainModeOptions:
    """The training mode's own options: start from ``init_weights`` (``None``: a fresh initialisation)."""

    init_weights: Optional[str] = None
    init_weights_skip_classifier: bool = False


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


def _check_train_options(args: argparse.Namespace, selected: Mode) -> None:
    if args.init_weights_skip_classifier and not args.init_weights:
        raise UsageError("--init-weights-skip-classifier applies to --init-weights FILE")
    if args.init_weights and selected.name in ("eval", "convert"):
        raise UsageError("--init-weights starts a training run; it does not apply to --eval-only / --convert")
    if args.init_weights and not Path(args.init_weights).is_file():
        raise UsageError(f"--init-weights: weights file {args.init_weights!r} does not exist")


def _train_options(args: argparse.Namespace) -> TrainModeOptions:
    return TrainModeOptions(args.init_weights, args.init_weights_skip_classifier)


# ------------------------------------------------------------------------------------------ eval
@dataclass(frozen=True)
class EvalOptions:
    """``--eval-only``: ``weights``, the weights file (a run directory's, resolved); ``source``, as given."""

    weights: Path
    source: str


def _eval_arguments(groups: Groups) -> None:
    groups["tools"].add_argument("--eval-only", metavar="WEIGHTS",
                                 help="evaluate WEIGHTS (hdf5 or .pth; training-time or deploy form) on --dataset")


def _eval_weights(args: argparse.Namespace) -> Path:
    try:
        return weights_argument(args.eval_only, "--eval-only")  # a file, or a run directory's
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_eval(args: argparse.Namespace) -> None:
    _eval_weights(args)


def _eval_options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(_eval_weights(args), args.eval_only)


# ------------------------------------------------------------------------------------------ convert
@dataclass(frozen=True)
class ConvertOptions:
    """``--convert SRC DST [--format ours|acnet|dbb]``."""

    src: str
    dst: str
    format: str = "ours"


def _convert_arguments(groups: Groups) -> None:
    tools = groups["tools"]
    tools.add_argument("--convert", nargs=2, metavar=("SRC", "DST"),
                       help="convert training-time weights SRC into deploy weights DST (hdf5, or .pth/.pt)")
    tools.add_argument("--format", choices=("ours", "acnet", "dbb"), default="ours",
                       help="names in --convert's DST: ours (default), or the original ACNet / DBB code's deploy "
                            "names (then SRC may also be deploy weights)")


def _check_convert_options(args: argparse.Namespace, selected: Mode) -> None:
    if args.format != "ours" and selected.name != "convert":
        raise UsageError("--format applies to --convert SRC DST")


def _check_convert(args: argparse.Namespace) -> None:
    src, dst = args.convert
    if not Path(src).is_file():
        raise UsageError(f"--convert: source weights file {src!r} "
                         + ("is a directory" if Path(src).is_dir() else "does not exist"))
    if Path(dst).resolve() == Path(src).resolve():
        raise UsageError("--convert: DST must differ from SRC (the training-time weights are kept)")


def _convert_options(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(*args.convert, format=args.format)


# ------------------------------------------------------------------------------------------ export
DEFAULT_CALIB_IMAGES = 256
QUANTIZE_CHOICES = ("int8",)


@dataclass(frozen=True)
class ExportOptions:
    """``--export-onnx WEIGHTS OUT [--quantize int8 --calib-images N] [--opset V]``."""

    weights: str
    out: str
    quantize: Optional[str] = None
    calib_images: int = DEFAULT_CALIB_IMAGES
    opset: Optional[int] = None


def _export_arguments(groups: Groups) -> None:
    deploy = groups["deploy"]
    deploy.add_argument("--export-onnx", nargs=2, metavar=("WEIGHTS", "OUT"),
                        help="export WEIGHTS (any form --eval-only takes) as the checked ONNX deploy model OUT")
    deploy.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="with --export-onnx: also int8 static PTQ (OUT.int8.onnx), fp32/int8 top-1 on --dataset")
    deploy.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                        help=f"training images to calibrate int8 activations on (default {DEFAULT_CALIB_IMAGES})")
    deploy.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")


def _check_export_options(args: argparse.Namespace, selected: Mode) -> None:
    if args.quantize and selected.name != "export":
        raise UsageError("--quantize applies to --export-onnx (--qat writes its own int8 model)")
    if args.calib_images < 1:
        raise UsageError(f"--calib-images must be >= 1, got {args.calib_images}")
    if args.opset is not None and args.opset < 18:
        raise UsageError(f"--opset must be >= 18 (the torch.export-based ONNX exporter), got {args.opset}")


def _check_export(args: argparse.Namespace) -> None:
    weights, out = args.export_onnx
    if not Path(weights).is_file():
        raise UsageError(f"--export-onnx: weights file {weights!r} does not exist")
    if Path(out).resolve() == Path(weights).resolve():
        raise UsageError("--export-onnx: OUT must differ from WEIGHTS")
    if Path(out).is_dir():
        raise UsageError(f"--export-onnx: OUT {out!r} is a directory; give a file name such as model.onnx")


def _export_options(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(*args.export_onnx, quantize=args.quantize, calib_images=args.calib_images, opset=args.opset)


# ------------------------------------------------------------------------------------------ qat
@dataclass(frozen=True)
class QatOptions:
    """``--qat``: fine-tune ``init_weights``; the int8 export's ``calib_images`` and ``opset``."""

    init_weights: str
    init_weights_skip_classifier: bool = False
    calib_images: int = DEFAULT_CALIB_IMAGES
    opset: Optional[int] = None


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


def _qat_options(args: argparse.Namespace) -> QatOptions:
    return QatOptions(args.init_weights, args.init_weights_skip_classifier, args.calib_images, args.opset)


_NOTHING_WRITTEN = "interrupted (Ctrl-C); no partial file was written"

for _mode in (
    Mode("train", None, "utils.modes.train:run_training", _train_arguments, _train_options,
         check_options=_check_train_options, sweepable=True),
    Mode("eval", "--eval-only", "utils.modes.evaluate:run_eval_only", _eval_arguments, _eval_options, _check_eval,
         on_interrupt=_NOTHING_WRITTEN),
    Mode("convert", "--convert", "utils.modes.convert:run_convert", _convert_arguments, _convert_options,
         _check_convert, _check_convert_options, main_rank_only=True, on_interrupt=_NOTHING_WRITTEN),
    Mode("export", "--export-onnx", "utils.modes.export:run_export", _export_arguments, _export_options,
         _check_export, _check_export_options, main_rank_only=True),
    Mode("qat", "--qat", "utils.modes.qat:run_qat", _qat_arguments, _qat_options, _check_qat),
):
    register_mode(_mode)
