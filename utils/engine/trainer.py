"""The training loop: DDP, bf16 autocast, channels_last, optional ``torch.compile``, per-epoch
resumable state, ``init.hdf5``/``finish.hdf5``, log.txt/TensorBoard/console progress (:mod:`utils.engine.progress`).

The engine knows no architecture by name: it gets a model, the two loaders, a recipe and the
experiment paths. Determinism (CPU, fixed seed): data order is a function of seed and epoch (the
loaders' ``set_epoch``), every RNG state is saved with each epoch's resumable state and restored on
continue, so a run killed at any moment and continued with ``-c continue`` ends bit-identical to an
uninterrupted one. Resuming happens at the last completed epoch.

BN statistics without ``--sync-bn``: DDP syncs no buffers in ``forward`` and every floating
buffer is averaged over the ranks at the end of each epoch (before evaluating and saving), so the
saved running statistics are the mean of the ranks' estimates and identical on every rank.

Host synchronisation: metrics are accumulated on the device and read every ``print_freq``
iterations and at the end of an epoch only; a non-finite loss is detected at those points.

How a run stops on an error of its own (rank 0 writes one ``ERROR: ...`` line to log.txt, the same
line the command ends with): a non-finite loss (:class:`NonFiniteLossError`), or a file it cannot
write (:class:`acnet.fileio.UnwritablePathError`: a full disk, a read-only or unwritable folder,
while saving init.hdf5, latest.pth, log.txt or finish.hdf5). Either message says what is on disk
(the last resumable state and its epoch, or that nothing resumable was saved yet) and how to go on;
a failed save leaves the previous file intact.
"""
from __future__ import annotations

import errno
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from acnet import save_hdf5
from acnet.fileio import UnwritablePathError
from data import to_device
from utils.rundir.checkpoint import ExperimentPaths, capture_rng_state, restore_rng_state, save_state
from utils.errors import ACNetError, TrainingSetupError
from utils.engine.distributed import (DistContext, all_gather_objects, all_reduce_sum, average_buffers, barrier,
                                       data_parallel)
from utils.engine.evaluation import autocast_context, evaluate
from utils.engine.metrics import MetricSums
from utils.engine.progress import EpochProgress
from utils.engine.optim import CosineWarmupSchedule, make_sgd
from utils.rundir.log import RunLog, TensorBoard

__all__ = ["TrainOptions", "TrainResult", "NonFiniteLossError", "TrainingSetupError", "RunInterrupted", "Trainer",
           "save_weights_hdf5", "cpu_state_dict"]

logger = logging.getLogger("do_acnet")


class NonFiniteLossError(ACNetError, RuntimeError):
    """The training loss became NaN or infinite; the last saved state (if any) is left untouched."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) in the training loop: ``where`` it stopped and what the resumable state holds
    (``saved``, ``None`` when this process saved none). Every file written so far is complete."""

    def __init__(self, where: str, saved: str | None):
        super().__init__(where)
        self.where = where
        self.saved = saved


@dataclass
class TrainOptions:
    amp: bool = False  # bf16 autocast
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    print_freq: int = 50  # iterations between progress reads (the only per-step host syncs)
    progress_bar: bool = True  # rank 0: a bar on a terminal, at most 10 lines per epoch elsewhere
    should_validate: Callable[[int], bool] = field(default=lambda epoch: True)  # 0-based epoch
    meta: dict[str, Any] = field(default_factory=dict)  # stored in the resumable state (arch, block, ...)
    on_state_saved: Callable[[int], None] | None = None  # rank 0, after each resumable state (its epoch count)


@dataclass
class TrainResult:
    epochs_run: int  # in this process
    iteration: int
    train_images: int  # over all ranks and all processes of this run (resumes included)
    train_seconds: float
    wall_seconds_before: float  # wall time of earlier processes of this run (resumes)
    last_val: dict[str, float] | None

    @property
    def images_per_sec(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds > 0 else None


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of ``model.state_dict()`` (no ``module.`` prefix from DDP)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights_hdf5(model: nn.Module, path) -> None:
    """Weights in the original hdf5 format (``acnet.save_hdf5``; written atomically)."""
    save_hdf5(cpu_state_dict(model), path)


class Trainer:
    """Trains ``model`` in place on ``train_loader`` following ``recipe``; see the module docstring."""

    def __init__(self, model: nn.Module, train_loader, eval_loader, recipe, ctx: DistContext,
                 paths: ExperimentPaths, run_log: RunLog, options: TrainOptions):
        self.ctx = ctx
        self.device = ctx.device
        self.recipe = recipe
        self.paths = paths
        self.run_log = run_log
        self.options = options
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.iters_per_epoch = len(train_loader)
        if self.iters_per_epoch == 0:
            raise TrainingSetupError("the training loader yields no batch on this rank: the dataset is smaller "
                                     "than the per-rank batch size; lower --batch-size")
        memory_format = torch.channels_last if options.channels_last else torch.preserve_format
        model = model.to(self.device, memory_format=memory_format)
        if options.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model  # the plain module: what is evaluated and saved
        self.optimizer = make_sgd(model, recipe.lr, recipe.weight_decay, momentum=recipe.momentum,
                                  nesterov=recipe.nesterov, bias_lr_factor=recipe.bias_lr_factor,
                                  weight_decay_bias=recipe.weight_decay_bias)
        total = recipe.epochs * self.iters_per_epoch
        warmup = int(round(recipe.warmup_epochs * self.iters_per_epoch))
        self.schedule = CosineWarmupSchedule(self.optimizer, total, min(warmup, total - 1))
        self.start_epoch = 0
        self.iteration = 0
        self.train_images = 0
        self.train_seconds = 0.0
        self.wall_seconds_before = 0.0
        self.last_saved_epoch = 0
        self.last_saved_iteration = 0
        self.current_epoch = 0
        self._step_model: nn.Module | None = None

    # ----------------------------------------------------------------------------------- state
    def load_resumable_state(self, state: dict[str, Any]) -> None:
        """Restore weights, optimizer momentum, schedule, counters and (same world size) RNG states."""
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.start_epoch = self.last_saved_epoch = int(state["epoch"])
        self.iteration = self.last_saved_iteration = int(state["iteration"])
        self.train_images = int(state.get("train_images", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        rng_states = state["rng"]
        if len(rng_states) == self.ctx.world_size:
            restore_rng_state(rng_states[self.ctx.rank], self.device)
        else:
            self.run_log.write(f"note: the state was saved by {len(rng_states)} rank(s), this run has "
                               f"{self.ctx.world_size}: RNG streams restart from the seed", logging.WARNING)

    def _save_resumable_state(self, next_epoch: int, wall_seconds: float) -> None:
        rng_states = all_gather_objects(capture_rng_state(self.device))  # collective: every rank
        if self.ctx.is_main:
            save_state({
                "model": cpu_state_dict(self.model),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "epoch": next_epoch,
                "iteration": self.iteration,
                "rng": rng_states,
                "recipe": self.recipe.to_dict(),
                "world_size": self.ctx.world_size,
                "train_images": self.train_images,
                "train_seconds": self.train_seconds,
                "wall_seconds": wall_seconds,
                "log_lines": len(self.run_log) + 1,  # + the "saved" line below
                "meta": dict(self.options.meta),
            }, self.paths.state)
        self.last_saved_epoch, self.last_saved_iteration = next_epoch, self.iteration  # on disk (rank 0)
        if self.ctx.is_main:
            if self.options.on_state_saved is not None:  # before the log line: the state never lags the log
                self.options.on_state_saved(next_epoch)
            self.run_log.write(f"epoch {next_epoch} iter {self.iteration} saved resumable state {self.paths.state.name}")
        barrier()

    # ----------------------------------------------------------------------------------- training
    def _build_step_model(self) -> nn.Module:
        model: nn.Module = self.model
        if self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = data_parallel(model, device_ids)
        if self.options.compile:
            model = torch.compile(model)
        return model

    def saved_on_disk(self) -> str:
        """What this run has on disk to go on from, in words (for the messages of a run that stops)."""
        state = self.paths.state
        if self.last_saved_epoch and state.is_file():
            return (f"the last resumable state, {state.name} after epoch {self.last_saved_epoch} (iteration "
                    f"{self.last_saved_iteration}), is intact")
        if self.paths.init_weights.is_file():
            return f"nothing resumable was saved yet (only {self.paths.init_weights.name}, the initial weights)"
        return "nothing was saved yet"

    def _cannot_write(self, error: UnwritablePathError) -> UnwritablePathError:
        """``error`` with the run's way on: free space / fix the folder, then continue or run again."""
        folder = f"'{error.path.parent}'"
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            place = f"free space on {folder}"
        elif error.errno == errno.EROFS:
            place = f"make the file system of {folder} writable"
        else:
            place = f"make {folder} writable"
        on_disk = self.saved_on_disk()
        again = "run again with -c continue" if "intact" in on_disk else "run the command again"
        error.fix = f"{place} and {again}: {on_disk}"
        return error

    def _check_finite(self, bad: torch.Tensor, epoch: int) -> None:
        flag = bad.to(torch.int32)
        all_reduce_sum(flag)
        if flag.item():
            on_disk = self.saved_on_disk()
            also = ", but continuing it with the same recipe diverges again" if "intact" in on_disk else ""
            error = NonFiniteLossError(
                f"the training loss became non-finite (NaN or inf) in epoch {epoch + 1} (by iteration "
                f"{self.iteration}); training stopped; {on_disk}{also}. Start again (e.g. with a new --exp-name) "
                "with a lower learning rate (--lr), warmup (--warmup-epochs) or --no-amp.")
            self.run_log.write_error(error)  # the log says how the run ended (show_log)
            raise error

    def fit(self, tensorboard: TensorBoard) -> TrainResult:
        """Run epochs ``start_epoch .. recipe.epochs-1``; write ``init.hdf5`` (fresh run), the state every
        epoch, and ``finish.hdf5`` at the end (rank 0)."""
        process_start = time.perf_counter()
        recipe, ctx = self.recipe, self.ctx
        self.epochs_done = 0
        self.current_epoch = self.start_epoch
        try:
            if self.start_epoch == 0 and self.iteration == 0 and ctx.is_main:
                save_weights_hdf5(self.model, self.paths.init_weights)
            barrier()
            self._step_model = self._build_step_model()
            criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
            last_val = self._run_epochs(criterion, tensorboard, process_start)
            if ctx.is_main:
                save_weights_hdf5(self.model, self.paths.finish_weights)
                self.run_log.write(f"training done: {self.paths.finish_weights.name} written")
        except KeyboardInterrupt:
            saved = (f"the state after epoch {self.last_saved_epoch} (iteration {self.last_saved_iteration})"
                     if self.last_saved_epoch else None)
            where = f"in epoch {self.current_epoch + 1}/{recipe.epochs} at iteration {self.iteration}"
            # the log says how the run ended (show_log); a resume cuts this line off again
            self.run_log.write(f"interrupted {where}", logging.WARNING)
            raise RunInterrupted(where, saved) from None
        except UnwritablePathError as exc:  # a full disk, a read-only folder: one line, here and in log.txt
            error = self._cannot_write(exc)
            self.run_log.write_error(error)
            raise error from None
        barrier()
        return TrainResult(epochs_run=self.epochs_done, iteration=self.iteration, train_images=self.train_images,
                           train_seconds=self.train_seconds, wall_seconds_before=self.wall_seconds_before,
                           last_val=last_val)

    def _run_epochs(self, criterion: nn.Module, tensorboard: TensorBoard,
                    process_start: float) -> dict[str, float] | None:
        """The epochs of :meth:`fit`; returns the last validation metrics (``None`` if none ran)."""
        recipe, last_val = self.recipe, None
        for epoch in range(self.start_epoch, recipe.epochs):
            self.current_epoch = epoch
            epoch_metrics, epoch_seconds, epoch_images = self._train_one_epoch(epoch, criterion, tensorboard)
            if not self.options.sync_bn:
                average_buffers(self.model)
            lr = self.schedule.get_last_lr()[0]
            self.run_log.write(
                f"epoch {epoch + 1} iter {self.iteration} train_loss={epoch_metrics['loss']:.6f} "
                f"train_acc1={epoch_metrics['top1']:.4f} train_acc5={epoch_metrics['top5']:.4f} lr={lr:.6g} "
                f"images_per_sec={epoch_images / max(epoch_seconds, 1e-9):.1f} epoch_seconds={epoch_seconds:.1f}")
            if self.options.should_validate(epoch):
                last_val = evaluate(self.model, self.eval_loader, self.device, amp=self.options.amp,
                                    channels_last=self.options.channels_last)
                self.run_log.write_eval(epoch + 1, self.iteration, last_val)
                tensorboard.scalars({"val/top1": last_val["top1"], "val/top5": last_val["top5"],
                                     "val/loss": last_val["loss"]}, self.iteration)
            self.epochs_done += 1
            wall = self.wall_seconds_before + (time.perf_counter() - process_start)
            self._save_resumable_state(epoch + 1, wall)
        return last_val

    def _train_one_epoch(self, epoch: int, criterion: nn.Module, tensorboard: TensorBoard):
        ctx, device, opts = self.ctx, self.device, self.options
        model = self._step_model
        model.train()
        self.train_loader.set_epoch(epoch)
        memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
        epoch_sums, window_sums = MetricSums(device), MetricSums(device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        bar = EpochProgress(self.iters_per_epoch, f"epoch {epoch + 1}/{self.recipe.epochs}",
                            enabled=ctx.is_main and opts.progress_bar)
        start = time.perf_counter()
        window = {"start": start, "images": 0, "steps": 0}
        images_seen = 0

        def flush() -> None:
            """Read the window's metrics (one host sync), check the loss, report progress."""
            self._check_finite(bad, epoch)
            now = time.perf_counter()
            values = window_sums.read()
            rate = window["images"] / max(now - window["start"], 1e-9)
            lr = self.schedule.get_last_lr()[0]
            bar.metrics(loss=f"{values['loss']:.4f}", top1=f"{values['top1']:.2f}", lr=f"{lr:.4g}",
                        img_s=f"{rate:.0f}")
            tensorboard.scalars({"train/loss": values["loss"], "train/top1": values["top1"],
                                 "train/top5": values["top5"], "train/lr": lr, "train/images_per_sec": rate},
                                self.iteration)
            epoch_sums.sums += window_sums.sums
            window_sums.reset()
            window.update(start=now, images=0, steps=0)

        try:  # the bar is closed on Ctrl-C too, so it does not stay on the terminal
            for images, labels in self.train_loader:
                images = to_device(self.train_loader, images, device, memory_format)  # uint8 ImageNet: normalised here
                labels = labels.to(device, non_blocking=True)
                with autocast_context(device, opts.amp):
                    logits = model(images)
                loss = criterion(logits.float(), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.schedule.step()
                self.iteration += 1
                bad |= ~torch.isfinite(loss.detach())
                window_sums.update(loss, logits, labels)
                batch_images = labels.shape[0] * ctx.world_size
                images_seen += batch_images
                window["images"] += batch_images
                window["steps"] += 1
                if window["steps"] == opts.print_freq:
                    flush()
                bar.step()
            if window["steps"]:
                flush()
            bar.finish()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        self.train_images += images_seen
        self.train_seconds += seconds
        return epoch_sums.all_reduce().read(), seconds, images_seen
