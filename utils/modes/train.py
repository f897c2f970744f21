"""The training mode of do_acnet.py: train (or resume, or reuse a finished run), then the post-training steps.

The run holds its folder (:class:`utils.rundir.record.RunSession`: the lock, the state file) from the start;
files are written only once everything is validated (the folder's record, recipe, data, model, init
weights). The folder must hold nothing, or a run of the same identity (:func:`utils.rundir.record.record_conflicts`):
a finished run (``finish.hdf5``) is reused (post-training steps only); an interrupted one (``latest.pth``)
is resumed by ``-c continue`` and otherwise refused -- ``-c restart`` moves its files into
``previous-<time>/`` and starts over. Nothing saved is ever deleted.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from acnet.fileio import ensure_writable_dir
from train_configs.recipes import Recipe, should_validate
from utils.command import Command, block_kwargs, create_loaders, model_builder
from utils.engine.distributed import all_gather_objects, barrier, ranks_not_seeing
from utils.engine.guards import amp_cpu_warning, check_batch_fits
from utils.engine.init_weights import load_init_weights
from utils.engine.posttrain import post_training
from utils.engine.trainer import Trainer, TrainOptions, cpu_state_dict
from utils.errors import UsageError
from utils.rundir.checkpoint import load_state, read_finished_run, seed_everything
from utils.rundir.identity import ExperimentPaths, merge_saved_recipe
from utils.rundir.log import RunLog, TensorBoard
from utils.rundir.record import (STATE_FILE, RunSession, describe_conflicts, hold_run, identity, make_record,
                                 move_aside, read_json_object, read_record, recipe_fields, record_conflicts,
                                 write_record)

__all__ = ["run_training", "write_recipe_json", "log_rank_agreement"]

logger = logging.getLogger("do_acnet")


def write_recipe_json(path: Path, cmd: Command, recipe: Recipe, ctx, options,
                      init_weights: Optional[dict[str, Any]] = None) -> None:
    """The training run's record (:func:`utils.rundir.record.make_record`) with how it ran, to ``path``'s folder."""
    record = make_record(cmd, recipe, "finetune" if init_weights is not None else "train",
                         world_size=ctx.world_size, batch_size_per_rank=recipe.batch_size // ctx.world_size,
                         block_kwargs=block_kwargs(cmd.block_type, recipe),
                         device=str(ctx.device), amp_bf16=options.amp, channels_last=options.channels_last,
                         compile=options.compile, sync_bn=options.sync_bn, torch_version=torch.__version__,
                         command_line=cmd.command_line, init_weights=init_weights)
    write_record(ExperimentPaths(Path(path).parent), record)


def _wanted_identity(cmd: Command, recipe: Recipe, kind: str) -> dict[str, Any]:
    """The identity fields this command asks for: all of them, or on ``-c continue`` only those it names."""
    full = identity(make_record(cmd, recipe, kind))
    if not cmd.continuing:
        return full
    keep = ("arch", "block_type", "dataset", "seed", "synthetic_num_train", "synthetic_num_val", *cmd.overrides)
    return {key: value for key, value in full.items() if key in keep}


def _check_folder(paths: ExperimentPaths, cmd: Command, recipe: Recipe, kind: str, ctx) -> Optional[dict[str, Any]]:
    """What the folder holds must be what this command asks for (module docstring); returns its record.

    Refusals are one line and come before anything is written. ``-c restart`` first moves an earlier run aside.
    """
    if cmd.restart:
        moved = move_aside(paths.root) if ctx.is_main and paths.root.is_dir() else None
        barrier()
        if moved is not None:
            logger.warning("-c restart: the earlier run's files were moved into %s", moved)
    record = read_record(paths)  # a corrupt recipe.json / summary.json is refused, naming the file
    read_json_object(paths.summary)
    finished = paths.finish_weights.is_file()
    if record is not None:
        conflicts = record_conflicts(record, _wanted_identity(cmd, recipe, kind))
        if conflicts and finished:
            raise UsageError(f"{paths.root} holds a finished run with a different recipe: "
                             f"{describe_conflicts(conflicts)}; it would not be trained again. Use a new --exp-name, "
                             "or remove that folder to retrain it (or -c restart: its files move into previous-<time>/)")
        if conflicts:
            raise UsageError(f"{paths.root} holds another run: {describe_conflicts(conflicts)}; use a new --exp-name, "
                             "or start over with -c restart (its files move into previous-<time>/)")
    if not finished and not cmd.continuing and paths.state.is_file():
        raise UsageError(f"{paths.root} holds an interrupted run ({paths.state.name} is its last saved epoch); "
                         "resume it with -c continue, or start over with -c restart (its files move into "
                         "previous-<time>/), or use a new --exp-name")
    return record


def run_training(cmd: Command, ctx, run_start: float) -> None:
    """The default mode (module docstring): the folder is held (:mod:`utils.rundir.record`) while the run writes."""
    paths = cmd.paths()
    blind = ranks_not_seeing(paths.root)
    if blind:
        raise UsageError(f"rank(s) {blind} do not see rank 0's {paths.root}: with several nodes --output-dir must be "
                         "on a filesystem that every node mounts (every rank reads the run's files back)")
    kind = "finetune" if cmd.options.init_weights else "train"
    session = RunSession(paths, f"do_acnet.py training {cmd.arch} / {cmd.block_type}", kind=kind, main=ctx.is_main)
    with hold_run(session, ctx):
        _run_training(cmd, ctx, run_start, paths, session, kind)


def _run_training(cmd: Command, ctx, run_start: float, paths: ExperimentPaths, session, kind: str) -> None:
    recipe = cmd.recipe
    on_cuda = ctx.device.type == "cuda"
    settings = cmd.train
    options = TrainOptions(
        amp=on_cuda if settings.amp is None else settings.amp,
        channels_last=on_cuda if settings.channels_last is None else settings.channels_last,
        compile=settings.compile, sync_bn=settings.sync_bn, print_freq=settings.print_freq,
        progress_bar=settings.progress, meta={"arch": cmd.arch, "block_type": cmd.block_type, "dataset": cmd.dataset},
        on_state_saved=session.saved)
    if options.sync_bn and not on_cuda:
        raise UsageError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on CPU")
    record = _check_folder(paths, cmd, recipe, kind, ctx)
    finished = paths.finish_weights.is_file()
    state = None
    done = read_finished_run(paths) if finished else {}
    if "recipe" in done:
        recipe = Recipe(**done["recipe"])  # the finished run's own recipe (epochs etc. for the summary)
    # -c continue of a run that stopped before its first epoch was saved (it wrote its record or its state):
    # it starts again from the beginning, as nothing of it can be lost
    nothing_saved = cmd.continuing and not finished and not paths.state.is_file() and (
        record is not None or (paths.root / STATE_FILE).is_file())
    if cmd.continuing and not finished and not nothing_saved:
        state = load_state(paths.state)
        if state.get("meta", {}) and state["meta"] != options.meta:
            raise UsageError(f"-c continue: {paths.state} belongs to {state['meta']}, not {options.meta}")
        recipe = merge_saved_recipe(state["recipe"], cmd.overrides, paths.state)
    elif nothing_saved:  # the run stopped before its first epoch was saved: it starts again, with its recipe
        saved = {**cmd.recipe.to_dict(), **{key: record[key] for key in recipe_fields() if key in (record or {})}}
        recipe = merge_saved_recipe(saved, cmd.overrides, paths.recipe)
    options.should_validate = lambda epoch: should_validate(recipe, epoch)
    session.epochs = recipe.epochs

    train_loader, eval_loader = create_loaders(cmd, recipe, ctx)
    check_batch_fits(recipe.batch_size, train_loader.sampler.num_samples, ctx.world_size)
    build = model_builder(cmd, recipe, eval_loader.num_classes)

    seed_everything(cmd.seed)
    model = build()  # before any file is written: bad block options fail here
    init_weights = None
    if cmd.options.init_weights and state is None and not finished:  # a continued run has its own weights
        init_weights = load_init_weights(model, cmd.options.init_weights, block_type=cmd.block_type, arch=cmd.arch,
                                         skip_classifier=cmd.options.init_weights_skip_classifier, logger=logger)
    # Everything is validated: from here on files are written.
    run_log = RunLog(paths.log, enabled=ctx.is_main, keep_existing=state is not None or finished)
    session.begin(run_log, epoch=int(state["epoch"]) if state is not None else (recipe.epochs if finished else 0))
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
            write_recipe_json(paths.recipe, cmd, recipe, ctx, options, init_weights)
        trainer = Trainer(model, train_loader, eval_loader, recipe, ctx, paths, run_log, options)
        if state is None and ctx.is_main:
            for path in (paths.deploy_weights, paths.summary):  # of an earlier start that saved no epoch
                if path.exists():
                    path.unlink()
        if state is not None:
            run_log.truncate(int(state.get("log_lines", len(run_log))))
            trainer.load_resumable_state(state)
            run_log.write(f"continuing from {paths.state.name}: epoch {trainer.start_epoch} iter {trainer.iteration}"
                          f" (world size {ctx.world_size})")
        else:
            if nothing_saved:
                run_log.write(f"-c continue: no epoch of this run was saved ({paths.state.name} does not exist): "
                              "training from the start", logging.WARNING)
            start = "from scratch" if init_weights is None else f"from {cmd.options.init_weights} ({init_weights['form']})"
            run_log.write(f"training {cmd.arch} / {cmd.block_type} on {cmd.dataset} {start}: {recipe.epochs} "
                          f"epoch{'s' * (recipe.epochs != 1)}, global batch {recipe.batch_size} over {ctx.world_size} "
                          f"rank(s), lr {recipe.lr}, device {ctx.device}, amp {options.amp}, "
                          f"channels_last {options.channels_last}")
        amp_warning = amp_cpu_warning(ctx.device.type, options.amp)
        if amp_warning:
            run_log.write(amp_warning, logging.WARNING)
        tensorboard = TensorBoard(paths.tensorboard, enabled=ctx.is_main,
                                  resume_step=trainer.iteration)  # drop events of a killed or earlier run
        try:
            result = trainer.fit(tensorboard)
        finally:
            tensorboard.close()
        wall_before = result.wall_seconds_before
        images_per_sec = result.images_per_sec
        log_rank_agreement(trainer.model, ctx, run_log)
    barrier()
    summary_fields = {"arch": cmd.arch, "block_type": cmd.block_type, "dataset": cmd.dataset,
                      "seed": cmd.seed, "epochs": recipe.epochs, "world_size": ctx.world_size,
                      "train_images_per_sec": None if images_per_sec is None else round(images_per_sec, 2)}
    post_training(build, eval_loader, ctx, paths, run_log, summary_fields,
                  wall_seconds=lambda: wall_before + (time.perf_counter() - run_start),
                  channels_last=options.channels_last)


def log_rank_agreement(model: torch.nn.Module, ctx, run_log) -> None:
    """Check (and log) that every rank ends with the same weights; a disagreement is an error."""
    if not ctx.distributed:
        return
    digest = hashlib.sha256()
    for key, value in sorted(cpu_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    digests = all_gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the final weights (sha256 per rank: {digests})")
    run_log.write(f"weights identical on all {ctx.world_size} ranks (sha256 {digests[0][:16]})")
