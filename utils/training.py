"""The training mode of do_acnet.py: train (or resume, or reuse a finished run), then the post-training steps.

Files are written only once everything is validated (recipe, data, model, init weights); a finished
run (``finish.hdf5``) is reused only by a command asking for the same recipe (:mod:`utils.run`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from train_configs.recipes import Recipe, should_validate
from utils.command import Command, block_kwargs, create_loaders, model_builder
from utils.errors import UsageError
from utils.run import ExperimentPaths, check_finished_run, merge_saved_recipe

__all__ = ["run_training", "write_recipe_json", "log_rank_agreement"]

logger = logging.getLogger("do_acnet")


def write_recipe_json(path: Path, cmd: Command, recipe: Recipe, ctx, options,
                      init_weights: Optional[dict[str, Any]] = None) -> None:
    from utils.checkpoint import save_json

    # The dataset actually used comes after the recipe's fields: the recipe only names the arch's default.
    record = {"arch": cmd.arch, "block_type": cmd.block_type, **recipe.to_dict(), "dataset": cmd.dataset,
              "world_size": ctx.world_size, "batch_size_per_rank": recipe.batch_size // ctx.world_size,
              "block_kwargs": block_kwargs(cmd.block_type, recipe), "seed": cmd.seed,
              "data_dir": cmd.data.data_dir, "synthetic_num_train": cmd.data.synthetic_num_train,
              "synthetic_num_val": cmd.data.synthetic_num_val,
              "device": str(ctx.device), "amp_bf16": options.amp, "channels_last": options.channels_last,
              "compile": options.compile, "sync_bn": options.sync_bn, "torch_version": torch.__version__,
              "command_line": cmd.command_line, "init_weights": init_weights}
    save_json(record, path)


def _check_finished(paths: ExperimentPaths, cmd: Command, recipe: Recipe) -> None:
    if cmd.continuing:  # continue keeps the run's recipe: only explicit options must agree
        wanted = dict(cmd.overrides)
    else:
        # the recipe and the options of recipe.json that decide what is trained
        wanted = {**recipe.to_dict(), "dataset": cmd.dataset, "seed": cmd.seed,
                  "synthetic_num_train": cmd.data.synthetic_num_train}
    from utils.checkpoint import finished_run_record

    check_finished_run(paths, finished_run_record(paths), wanted)


def run_training(cmd: Command, ctx, run_start: float) -> None:
    """The default mode (module docstring)."""
    from acnet.fileio import ensure_writable_dir
    from utils.checkpoint import load_state, read_finished_run, seed_everything
    from utils.distributed import barrier, ranks_not_seeing
    from utils.engine import Trainer, TrainOptions
    from utils.guards import amp_cpu_warning, check_batch_fits
    from utils.posttrain import post_training
    from utils.runlog import RunLog, TensorBoard

    recipe = cmd.recipe
    on_cuda = ctx.device.type == "cuda"
    settings = cmd.train
    options = TrainOptions(
        amp=on_cuda if settings.amp is None else settings.amp,
        channels_last=on_cuda if settings.channels_last is None else settings.channels_last,
        compile=settings.compile, sync_bn=settings.sync_bn, print_freq=settings.print_freq,
        progress_bar=settings.progress, meta={"arch": cmd.arch, "block_type": cmd.block_type, "dataset": cmd.dataset})
    if options.sync_bn and not on_cuda:
        raise UsageError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on CPU")
    paths = cmd.paths()
    blind = ranks_not_seeing(paths.root)
    if blind:
        raise UsageError(f"rank(s) {blind} do not see rank 0's {paths.root}: with several nodes --output-dir must be "
                         "on a filesystem that every node mounts (every rank reads the run's files back)")
    finished = paths.finish_weights.is_file()
    state = None
    done = read_finished_run(paths) if finished else {}
    if finished:
        _check_finished(paths, cmd, recipe)
    if "recipe" in done:
        recipe = Recipe(**done["recipe"])  # the finished run's own recipe (epochs etc. for the summary)
    if cmd.continuing and not finished:
        state = load_state(paths.state)
        if state.get("meta", {}) and state["meta"] != options.meta:
            raise UsageError(f"-c continue: {paths.state} belongs to {state['meta']}, not {options.meta}")
        recipe = merge_saved_recipe(state["recipe"], cmd.overrides, paths.state)
    options.should_validate = lambda epoch: should_validate(recipe, epoch)

    train_loader, eval_loader = create_loaders(cmd, recipe, ctx)
    check_batch_fits(recipe.batch_size, train_loader.sampler.num_samples, ctx.world_size)
    build = model_builder(cmd, recipe, eval_loader.num_classes)

    seed_everything(cmd.seed)
    model = build()  # before any file is written: bad block options fail here
    init_weights = None
    if cmd.init_weights and state is None and not finished:  # a continued run has its own weights
        from utils.init_weights import load_init_weights

        init_weights = load_init_weights(model, cmd.init_weights, block_type=cmd.block_type, arch=cmd.arch,
                                         skip_classifier=cmd.init_weights_skip_classifier, logger=logger)
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
            write_recipe_json(paths.recipe, cmd, recipe, ctx, options, init_weights)
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
            start = "from scratch" if init_weights is None else f"from {cmd.init_weights} ({init_weights['form']})"
            run_log.write(f"training {cmd.arch} / {cmd.block_type} on {cmd.dataset} {start}: {recipe.epochs} "
                          f"epochs, global batch {recipe.batch_size} over {ctx.world_size} rank(s), lr {recipe.lr}, "
                          f"device {ctx.device}, amp {options.amp}, channels_last {options.channels_last}")
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
