"""``do_acnet.py -a ARCH -b BLOCK --eval-only WEIGHTS``: top-1/top-5/loss of a weights file on a dataset.

WEIGHTS is any weights file :func:`utils.engine.evaluation.load_model_for_eval` takes (ours or the
original code's, hdf5 or ``.pth``, training-time or deploy form) or a finished run's folder (its
deploy weights); a run's weights are evaluated on the run's own data unless ``--dataset`` says otherwise.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from acnet import check_finite_weights, load_state_dict_file
from utils.command import Command, create_loaders
from utils.engine.distributed import DistContext
from utils.engine.evaluation import evaluate, load_model_for_eval
from utils.modes.registry import EvalOptions
from utils.rundir.record import command_with_run_data

__all__ = ["run_eval_only"]


def run_eval_only(cmd: Command, ctx: DistContext, run_start: float) -> None:
    """The ``--eval-only WEIGHTS`` mode: top-1/top-5/loss of any weights file (or a run's) on ``cmd.dataset``."""
    options: EvalOptions = cmd.options
    cmd = command_with_run_data(cmd, options.source)  # a run's weights: its dataset unless --dataset says
    source = f"weights file {os.fspath(options.weights)!r}"
    state = load_state_dict_file(options.weights)  # unusable weights are refused before the data is touched
    check_finite_weights(state, source)
    _, eval_loader = create_loaders(cmd, cmd.recipe, ctx)
    if ctx.is_main and Path(options.source).is_dir():
        logging.getLogger("do_acnet").info("%s is a run directory: evaluating its %s", options.source,
                                           options.weights.name)
    model = load_model_for_eval(cmd.arch, cmd.block_type, state, ctx.device, num_classes=eval_loader.num_classes,
                                source=source)
    metrics = evaluate(model, eval_loader, ctx.device, amp=False)
    if ctx.is_main:
        print(f"{options.weights} on {cmd.dataset} ({metrics['num_samples']} images): top1={metrics['top1']:.4f} "
              f"top5={metrics['top5']:.4f} loss={metrics['loss']:.6f}", flush=True)
