#!/usr/bin/env python
"""Train an ACNet/DBB/OREPA/baseline model, convert it and test the deploy weights (the original's entry point).

Train (CIFAR-10 ResNet-56 with ACBs; baseline with -b base; DBB with -b dbb; OREPA with -b orepa)::

    python do_acnet.py -a src56 -b acb
    python do_acnet.py -a cfqkbnc -b acb --dataset synthetic --epochs 3      # offline smoke run, ~5 s on CPU

Distributed (the global batch is split over the ranks; NCCL on CUDA, gloo on CPU)::

    torchrun --nproc_per_node=8 do_acnet.py -a sres18 -b acb
    python -m torch.distributed.launch --nproc_per_node=8 do_acnet.py -a sres18 -b acb
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        do_acnet.py -a sres50 -b dbb --output-dir /shared/acnet_exps     # multi-node: a shared --output-dir

Outputs go to ``<output-dir>/<arch>_<block>_train/`` (``<arch>_<block>_<dataset>_train/`` when the
dataset is not the arch's own; ``..._s<seed>_train/`` for a --seed other than 0): log.txt, recipe.json,
init.hdf5, finish.hdf5, finish_deploy.hdf5, latest.pth (resumable, every epoch), summary.json,
tensorboard/. ``-c continue`` resumes from latest.pth; when finish.hdf5 exists training is skipped and
only the post-training steps run (a command whose recipe differs from the finished run's is refused).
Ctrl-C stops with exit status 130 and the resume command.

Standalone tools (no training)::

    python do_acnet.py -a src56 -b acb --eval-only weights.hdf5        # any form: training-time or deploy, hdf5 or .pth
    python do_acnet.py -a src56 -b acb --convert finish.hdf5 deploy.hdf5
    python do_acnet.py -a src56 -b acb --export-onnx finish.hdf5 src56.onnx [--quantize int8]   # ONNX (+ int8 PTQ)
    python do_acnet.py -a src56 -b acb --qat --init-weights finish.hdf5 --epochs 5                # int8 QAT
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

import constructor
import data
from acnet.registry import block_type_names, get_block_type
from train_configs import get_recipe
from train_configs.recipes import Recipe, should_validate
from utils.checkpoint import weights_argument
from utils.deploy import DEFAULT_CALIB_IMAGES, QUANTIZE_CHOICES, check_deploy_args

logger = logging.getLogger("do_acnet")

#: Which datasets an arch can train on, by its input size.
_DATASETS_BY_INPUT_SIZE = {32: ("cifar10", "cifar100", "synthetic"), 224: ("imagenet", "synthetic")}
#: Recipe fields that command-line options override.
_OVERRIDES = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
              "warmup_epochs": "warmup_epochs", "label_smoothing": "label_smoothing", "val_every": "val_every"}


#: The seed of a run whose folder name carries no ``_s<seed>``.
DEFAULT_SEED = 0


class UsageError(Exception):
    """A command line that cannot run; reported argparse-style (exit status 2), nothing written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="do_acnet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-a", "--arch", required=True, choices=constructor.list_archs(), metavar="ARCH",
                        help="architecture: " + ", ".join(constructor.list_archs()))
    parser.add_argument("-b", "--block-type", "--block_type", dest="block_type", default="acb",
                        choices=block_type_names(), help="conv-BN unit type (default: acb)")
    parser.add_argument("-c", "--conti-or-fs", "--conti_or_fs", dest="conti_or_fs", default="fs",
                        choices=("fs", "continue"), help="fs: from scratch (default); continue: resume latest.pth")
    recipe = parser.add_argument_group("recipe overrides (defaults: train_configs/recipes.py for the arch)")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--batch-size", type=int, help="GLOBAL batch size, split over the ranks")
    recipe.add_argument("--lr", type=float, help="base learning rate (for the global batch; not auto-scaled)")
    recipe.add_argument("--weight-decay", type=float)
    recipe.add_argument("--warmup-epochs", type=float, help="linear warmup length (default 0, the original)")
    recipe.add_argument("--label-smoothing", type=float)
    recipe.add_argument("--val-every", type=int, help="evaluate every N epochs (and every epoch near the end)")
    recipe.add_argument("--init-weights", metavar="FILE",
                        help="start from FILE (ours or the original ACNet/DBB code's; same block type, base or deploy "
                             "weights: utils/init_weights.py) instead of a fresh initialisation")
    recipe.add_argument("--init-weights-skip-classifier", action="store_true",
                        help="with --init-weights: keep a fresh classifier (e.g. another number of classes)")
    io = parser.add_argument_group("data and outputs")
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
    run = parser.add_argument_group("execution")
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
    tools = parser.add_argument_group("standalone tools (no training)")
    tools.add_argument("--eval-only", metavar="WEIGHTS",
                       help="evaluate WEIGHTS (hdf5 or .pth; training-time or deploy form) on --dataset")
    tools.add_argument("--convert", nargs=2, metavar=("SRC", "DST"),
                       help="convert training-time weights SRC into deploy weights DST (hdf5, or .pth/.pt)")
    tools.add_argument("--format", choices=("ours", "acnet", "dbb"), default="ours",
                       help="names in --convert's DST: ours (default), or the original ACNet / DBB code's deploy "
                            "names (then SRC may also be deploy weights)")
    deploy = parser.add_argument_group("deployment: ONNX and int8 (the 'deploy' extra; see utils/deploy.py, utils/qat.py)")
    deploy.add_argument("--export-onnx", nargs=2, metavar=("WEIGHTS", "OUT"),
                        help="export WEIGHTS (any form --eval-only takes) as the checked ONNX deploy model OUT")
    deploy.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="with --export-onnx: also int8 static PTQ (OUT.int8.onnx), fp32/int8 top-1 on --dataset")
    deploy.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                        help=f"training images to calibrate int8 activations on (default {DEFAULT_CALIB_IMAGES})")
    deploy.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    deploy.add_argument("--qat", action="store_true",
                        help="fine-tune --init-weights with int8 fake quantization of the equivalent kernels, "
                             "then export and test the int8 model (lr default: the recipe's / 100)")
    return parser


# ------------------------------------------------------------------------------------------ checks
def resolve_dataset(args: argparse.Namespace) -> tuple[Any, str]:
    spec = constructor.get_arch_spec(args.arch)
    dataset = args.dataset or spec.dataset
    allowed = _DATASETS_BY_INPUT_SIZE.get(spec.input_size, data.DATASETS)
    if dataset not in allowed:
        raise UsageError(f"arch {args.arch} takes {spec.input_size}x{spec.input_size} inputs; --dataset {dataset} "
                         f"does not fit (use one of: {', '.join(allowed)})")
    if dataset != "synthetic" and (args.synthetic_num_train is not None or args.synthetic_num_val is not None):
        raise UsageError("--synthetic-num-train/--synthetic-num-val only apply to --dataset synthetic")
    return spec, dataset


def check_args(args: argparse.Namespace) -> None:
    positive = {"--print-freq": args.print_freq, "--synthetic-num-train": args.synthetic_num_train,
                "--synthetic-num-val": args.synthetic_num_val}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.eval_only and args.convert:
        raise UsageError("--eval-only and --convert are separate tools; give one of them")
    if args.init_weights_skip_classifier and not args.init_weights:
        raise UsageError("--init-weights-skip-classifier applies to --init-weights FILE")
    if args.init_weights and (args.eval_only or args.convert):
        raise UsageError("--init-weights starts a training run; it does not apply to --eval-only / --convert")
    if args.init_weights and not Path(args.init_weights).is_file():
        raise UsageError(f"--init-weights: weights file {args.init_weights!r} does not exist")
    if args.format != "ours" and not args.convert:
        raise UsageError("--format applies to --convert SRC DST")
    if args.eval_only:
        args.eval_weights = weights_argument(args.eval_only, "--eval-only")  # a file, or a run directory's
    if args.convert:
        src, dst = args.convert
        if not Path(src).is_file():
            raise UsageError(f"--convert: source weights file {src!r} "
                             + ("is a directory" if Path(src).is_dir() else "does not exist"))
        if Path(dst).resolve() == Path(src).resolve():
            raise UsageError("--convert: DST must differ from SRC (the training-time weights are kept)")
    check_deploy_args(args, UsageError)
    if args.exp_name is not None and (not args.exp_name or "/" in args.exp_name or args.exp_name in (".", "..")):
        raise UsageError(f"--exp-name must be a plain folder name, got {args.exp_name!r}")


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, attr) for attr, field in _OVERRIDES.items() if getattr(args, attr) is not None}


def make_recipe(args: argparse.Namespace) -> Recipe:
    try:
        return get_recipe(args.arch, **recipe_overrides(args))
    except ValueError as exc:
        raise UsageError(str(exc).replace("bad recipe value: ", "bad value: ")) from None


def experiment_name(args: argparse.Namespace, spec, dataset: str) -> str:
    """``<arch>_<block>[_<dataset>][_s<seed>]_train``: the dataset when it is not the arch's own, the
    seed when it is not the default 0 (so a run of seed 0 keeps the name it always had)."""
    if args.exp_name:
        return args.exp_name
    suffix = "" if dataset == spec.dataset else f"_{dataset}"
    if args.seed != DEFAULT_SEED:
        suffix += f"_s{args.seed}"
    return f"{args.arch}_{args.block_type}{suffix}_train"


def block_kwargs(block_type: str, recipe: Recipe) -> dict[str, Any]:
    """Per-block options from the recipe, as the block registry names them (ACB: gamma init)."""
    return {name: getattr(recipe, name) for name in get_block_type(block_type).recipe_options}


def fail(message: str, rank: int, world_size: int, status: int = 1) -> NoReturn:
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    print(f"do_acnet.py: error: {prefix}{message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


# ------------------------------------------------------------------------------------------ pieces
def create_loaders(args: argparse.Namespace, spec, dataset: str, recipe: Recipe, ctx):
    if recipe.batch_size % ctx.world_size:
        raise UsageError(f"the global batch size {recipe.batch_size} is not divisible by the {ctx.world_size} "
                         "ranks; pass --batch-size as a multiple of the number of processes")
    kwargs: dict[str, Any] = {}
    if dataset == "synthetic":
        kwargs.update(image_size=spec.input_size, num_classes=spec.num_classes)
        if args.synthetic_num_train is not None:
            kwargs["num_train"] = args.synthetic_num_train
        if args.synthetic_num_val is not None:
            kwargs["num_val"] = args.synthetic_num_val
    from utils.distributed import in_turn

    return in_turn(lambda: data.create_loaders(dataset, args.data_dir, recipe.batch_size, rank=ctx.rank,
                                               world_size=ctx.world_size, device=ctx.device, workers=args.workers,
                                               seed=args.seed, download=args.download, decode=args.decode, **kwargs),
                   ctx, lambda ranks: data.DatasetError(f"rank(s) {ranks} could not load the dataset (their error "
                                                        "is printed above)"))


def write_recipe_json(path: Path, args: argparse.Namespace, recipe: Recipe, dataset: str, ctx, options,
                      init_weights: dict[str, Any] | None = None) -> None:
    from utils.checkpoint import save_json

    # The dataset actually used comes after the recipe's fields: the recipe only names the arch's default.
    record = {"arch": args.arch, "block_type": args.block_type, **recipe.to_dict(), "dataset": dataset,
              "world_size": ctx.world_size, "batch_size_per_rank": recipe.batch_size // ctx.world_size,
              "block_kwargs": block_kwargs(args.block_type, recipe), "seed": args.seed,
              "data_dir": args.data_dir, "synthetic_num_train": args.synthetic_num_train,
              "synthetic_num_val": args.synthetic_num_val,
              "device": str(ctx.device), "amp_bf16": options.amp, "channels_last": options.channels_last,
              "compile": options.compile, "sync_bn": options.sync_bn, "torch_version": torch.__version__,
              "command_line": args.command_line, "init_weights": init_weights}
    save_json(record, path)


def merge_saved_recipe(saved: dict[str, Any], args: argparse.Namespace, state_path: Path) -> Recipe:
    """On continue the run keeps its recipe; an explicit override that contradicts it is an error."""
    recipe = Recipe(**saved)
    conflicts = [f"{field}={value!r} (run has {saved[field]!r})" for field, value in recipe_overrides(args).items()
                 if saved.get(field) != value]
    if conflicts:
        raise UsageError(f"-c continue: {state_path} was trained with a different recipe: " + ", ".join(conflicts)
                         + "; drop these options to continue, or start again with -c fs")
    return recipe


# ------------------------------------------------------------------------------------------ modes
def run_eval_only(args, spec, dataset, recipe, ctx) -> None:
    from utils.evaluation import evaluate, load_model_for_eval

    _, eval_loader = create_loaders(args, spec, dataset, recipe, ctx)
    if ctx.is_main and Path(args.eval_only).is_dir():
        logger.info("%s is a run directory: evaluating its %s", args.eval_only, args.eval_weights.name)
    model = load_model_for_eval(args.arch, args.block_type, args.eval_weights, ctx.device,
                                num_classes=eval_loader.num_classes)
    metrics = evaluate(model, eval_loader, ctx.device, amp=False)
    if ctx.is_main:
        print(f"{args.eval_weights} on {dataset} ({metrics['num_samples']} images): top1={metrics['top1']:.4f} "
              f"top5={metrics['top5']:.4f} loss={metrics['loss']:.6f}", flush=True)


def run_convert(args, spec) -> None:
    from utils.conversion import convert_file

    convert_file(args.arch, args.block_type, *args.convert, spec.input_size, args.format, UsageError)


def run_export_onnx(args, spec, dataset, recipe, ctx) -> None:
    from utils.deploy import require_deploy_extras, run_export

    require_deploy_extras()
    run_export(args, spec, lambda: create_loaders(args, spec, dataset, recipe, ctx))


def run_qat_mode(args, spec, dataset, recipe, ctx, run_start: float) -> None:
    from utils.deploy import require_deploy_extras
    from utils.qat import qat_experiment_name, qat_recipe, run_qat

    require_deploy_extras()
    recipe = qat_recipe(recipe, lr_given=args.lr is not None)
    loaders = create_loaders(args, spec, dataset, recipe, ctx)

    def build(deploy: bool = False) -> torch.nn.Module:
        return constructor.build_model(args.arch, args.block_type, deploy=deploy,
                                       num_classes=loaders[1].num_classes, **block_kwargs(args.block_type, recipe))

    name = args.exp_name or qat_experiment_name(experiment_name(args, spec, dataset))
    run_qat(args, spec, dataset, recipe, ctx, loaders, build, name, run_start)


def run_training(args, spec, dataset, recipe, ctx, run_start: float) -> None:
    from acnet.fileio import ensure_writable_dir
    from utils.checkpoint import ExperimentPaths, load_state, seed_everything
    from utils.distributed import barrier, ranks_not_seeing
    from utils.engine import Trainer, TrainingSetupError, TrainOptions
    from utils.guards import amp_cpu_warning, check_batch_fits
    from utils.posttrain import post_training
    from utils.runlog import RunLog, TensorBoard

    on_cuda = ctx.device.type == "cuda"
    options = TrainOptions(
        amp=on_cuda if args.amp is None else args.amp,
        channels_last=on_cuda if args.channels_last is None else args.channels_last,
        compile=args.compile, sync_bn=args.sync_bn, print_freq=args.print_freq, progress_bar=not args.no_progress,
        meta={"arch": args.arch, "block_type": args.block_type, "dataset": dataset})
    if options.sync_bn and not on_cuda:
        raise UsageError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on CPU")
    paths = ExperimentPaths(Path(args.output_dir) / experiment_name(args, spec, dataset))
    blind = ranks_not_seeing(paths.root)
    if blind:
        raise UsageError(f"rank(s) {blind} do not see rank 0's {paths.root}: with several nodes --output-dir must be "
                         "on a filesystem that every node mounts (every rank reads the run's files back)")
    finished = paths.finish_weights.is_file()
    state = None
    done = read_finished_run(paths) if finished else {}
    if finished:
        check_finished_run(paths, recipe, args, dataset)
    if "recipe" in done:
        recipe = Recipe(**done["recipe"])  # the finished run's own recipe (epochs etc. for the summary)
    if args.conti_or_fs == "continue" and not finished:
        state = load_state(paths.state)
        if state.get("meta", {}) and state["meta"] != options.meta:
            raise UsageError(f"-c continue: {paths.state} belongs to {state['meta']}, not {options.meta}")
        recipe = merge_saved_recipe(state["recipe"], args, paths.state)
    options.should_validate = lambda epoch: should_validate(recipe, epoch)

    train_loader, eval_loader = create_loaders(args, spec, dataset, recipe, ctx)
    check_batch_fits(recipe.batch_size, train_loader.sampler.num_samples, ctx.world_size, TrainingSetupError)
    num_classes = eval_loader.num_classes

    def build(deploy: bool = False) -> torch.nn.Module:
        return constructor.build_model(args.arch, args.block_type, deploy=deploy, num_classes=num_classes,
                                       **block_kwargs(args.block_type, recipe))

    seed_everything(args.seed)
    model = build()  # before any file is written: bad block options fail here
    init_weights = None
    if args.init_weights and state is None and not finished:  # a continued run has its own weights
        from utils.init_weights import load_init_weights

        init_weights = load_init_weights(model, args.init_weights, block_type=args.block_type, arch=args.arch,
                                         skip_classifier=args.init_weights_skip_classifier, logger=logger)
    # Everything is validated: from here on files are written.
    run_log = RunLog(paths.log, enabled=ctx.is_main, keep_existing=state is not None or finished)
    wall_before = 0.0
    images_per_sec = None
    if ctx.is_main:
        ensure_writable_dir(paths.root)
    if finished:
        run_log.write(f"{paths.finish_weights.name} exists: training skipped, running the post-training steps")
        wall_before = float(done.get("wall_seconds", 0.0))
        seconds = float(done.get("train_seconds", 0.0))
        images_per_sec = done.get("train_images", 0) / seconds if seconds > 0 else None
    else:
        if ctx.is_main:
            write_recipe_json(paths.recipe, args, recipe, dataset, ctx, options, init_weights)
        trainer = Trainer(model, train_loader, eval_loader, recipe, ctx, paths, run_log, options)
        if state is None and ctx.is_main:
            stale = [p for p in (paths.state, paths.deploy_weights, paths.summary) if p.exists()]
            for path in stale:  # -c fs in a used folder: a later "continue" must not pick up the old run
                path.unlink()
            if stale:
                run_log.write(f"-c fs: removed {', '.join(p.name for p in stale)} of an earlier run", logging.WARNING)
        if state is not None:
            run_log.truncate(int(state.get("log_lines", len(run_log))))
            trainer.load_resumable_state(state)
            run_log.write(f"continuing from {paths.state.name}: epoch {trainer.start_epoch} iter {trainer.iteration}"
                          f" (world size {ctx.world_size})")
        else:
            start = "from scratch" if init_weights is None else f"from {args.init_weights} ({init_weights['form']})"
            run_log.write(f"training {args.arch} / {args.block_type} on {dataset} {start}: {recipe.epochs} "
                          f"epochs, global batch {recipe.batch_size} over {ctx.world_size} rank(s), lr {recipe.lr}, "
                          f"device {ctx.device}, amp {options.amp}, channels_last {options.channels_last}")
        amp_warning = amp_cpu_warning(ctx.device.type, options.amp)
        if amp_warning:
            run_log.write(amp_warning, logging.WARNING)
        tensorboard = TensorBoard(paths.tensorboard, enabled=ctx.is_main,
                                  purge_step=trainer.iteration)  # drop events of a killed or earlier run
        try:
            result = trainer.fit(tensorboard)
        finally:
            tensorboard.close()
        wall_before = result.wall_seconds_before
        images_per_sec = result.images_per_sec
        log_rank_agreement(trainer.model, ctx, run_log)
    barrier()
    summary_fields = {"arch": args.arch, "block_type": args.block_type, "dataset": dataset,
                      "seed": args.seed, "epochs": recipe.epochs, "world_size": ctx.world_size,
                      "train_images_per_sec": None if images_per_sec is None else round(images_per_sec, 2)}
    post_training(build, eval_loader, ctx, paths, run_log, summary_fields,
                  wall_seconds=lambda: wall_before + (time.perf_counter() - run_start),
                  channels_last=options.channels_last)


def check_finished_run(paths, recipe: Recipe, args: argparse.Namespace, dataset: str) -> None:
    """A finished run is only reused (training skipped) by a command asking for the same recipe."""
    from utils.guards import RUN_FIELDS, finished_run_conflicts, finished_run_record

    if args.conti_or_fs == "continue":  # continue keeps the run's recipe: only explicit options must agree
        wanted = recipe_overrides(args)
    else:
        wanted = {**recipe.to_dict(), "dataset": dataset, **{field: getattr(args, field) for field in RUN_FIELDS}}
    conflicts = finished_run_conflicts(finished_run_record(paths), wanted)
    if conflicts:
        raise UsageError(f"{paths.root} holds a finished run with a different recipe: {', '.join(conflicts)}; it "
                         "would not be trained again. Use a new --exp-name, or remove that folder to retrain it")


def read_finished_run(paths) -> dict[str, Any]:
    """The last resumable state of a finished run (its recipe and timing), ``{}`` if unavailable."""
    from utils.checkpoint import CheckpointError, load_state

    if not paths.state.is_file():
        return {}
    try:
        state = load_state(paths.state)
        Recipe(**state["recipe"])
        return state
    except (CheckpointError, TypeError):
        logger.warning("could not read %s: the summary keeps this command's recipe and no timing", paths.state)
        return {}


def log_rank_agreement(model: torch.nn.Module, ctx, run_log) -> None:
    """Check (and log) that every rank ends with the same weights; a disagreement is an error."""
    if not ctx.distributed:
        return
    import hashlib

    from utils.distributed import all_gather_objects
    from utils.engine import cpu_state_dict

    digest = hashlib.sha256()
    for key, value in sorted(cpu_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    digests = all_gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the final weights (sha256 per rank: {digests})")
    run_log.write(f"weights identical on all {ctx.world_size} ranks (sha256 {digests[0][:16]})")


def interrupted(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    """The one line for Ctrl-C: where it stopped and how to go on (see utils.guards.interrupted_message)."""
    from utils.guards import interrupted_message

    if args.eval_only or args.convert:
        return "interrupted (Ctrl-C); no partial file was written"
    spec, dataset = resolve_dataset(args)
    run_dir = Path(args.output_dir) / experiment_name(args, spec, dataset)
    return interrupted_message(args.argv, run_dir, getattr(exc, "where", None), getattr(exc, "saved", None))


def main(argv: list[str] | None = None) -> None:
    run_start = time.perf_counter()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.command_line = shlex.join([sys.executable, os.path.abspath(__file__), *argv])
    args.argv = argv
    from acnet import WeightsError
    from acnet.fileio import UnwritablePathError
    from acnet.export import ExportError, MissingExtraError
    from utils.checkpoint import CheckpointError
    from utils.distributed import cleanup, init_distributed
    from utils.engine import NonFiniteLossError, TrainingSetupError
    from utils.posttrain import DeployMismatchError

    try:
        check_args(args)
        spec, dataset = resolve_dataset(args)
        recipe = make_recipe(args)
        ctx = init_distributed(args.device, args.local_rank)
    except (UsageError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    try:
        if args.convert:
            if ctx.is_main:
                run_convert(args, spec)
        elif args.export_onnx:
            if ctx.is_main:
                run_export_onnx(args, spec, dataset, recipe, ctx)
        elif args.eval_only:
            run_eval_only(args, spec, dataset, recipe, ctx)
        elif args.qat:
            run_qat_mode(args, spec, dataset, recipe, ctx, run_start)
        else:
            run_training(args, spec, dataset, recipe, ctx, run_start)
    except (UsageError, TrainingSetupError) as exc:
        if ctx.is_main:
            parser.print_usage(sys.stderr)
        fail(str(exc), ctx.rank, ctx.world_size, status=2)
    except (data.DatasetError, WeightsError, CheckpointError, NonFiniteLossError, DeployMismatchError,
            UnwritablePathError, ExportError, MissingExtraError) as exc:
        fail(str(exc), ctx.rank, ctx.world_size)
    except KeyboardInterrupt as exc:  # Ctrl-C: every file written is complete (atomic writes)
        fail(interrupted(args, exc), ctx.rank, ctx.world_size, status=130)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
