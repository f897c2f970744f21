"""Quantization-aware fine-tuning on the equivalent kernel (``do_acnet.py ... --qat --init-weights W --epochs E``).

1. The training-time model of ``-a/-b`` is loaded from ``--init-weights`` (``utils.engine.init_weights``) and
   wrapped by ``acnet.quant.prepare_qat``: every conv unit computes ``conv(fq_u8(x), fq_s8(K_eq)) + b_eq``
   with its BN statistics frozen, so the fine-tuned block is exactly the conv it converts to.
2. It is fine-tuned by the usual engine (``utils.engine.trainer.Trainer``: log.txt, evaluations, TensorBoard)
   with the recipe (``--lr`` defaults to the recipe's / 100 and no warmup: a fine-tune, not a new run).
3. ``acnet.quant.convert_qat`` -> ``finish_deploy.hdf5`` (the arch's plain deploy model; every conv kernel
   is ``int8 * s_w``), ``model.onnx`` (``acnet.export_onnx``, checked) and ``model.int8.onnx``
   (onnxruntime QDQ: Conv/Gemm inputs quantized with the QAT model's own uint8 scales and zero points,
   weights per channel (their max-abs scale is the QAT scale), int32 biases).
4. QAT (PyTorch), fp32 deploy and int8 (onnxruntime) top-1/top-5 on the eval set go to the log and
   ``summary.json`` (``qat_top1``, ``fp32_top1``, ``int8_top1``, ...). The int8 top-1 must equal the QAT
   model's within one eval image, else :class:`utils.engine.posttrain.DeployMismatchError` (after the summary).

Outputs go to ``<output-dir>/<arch>_<block>[_<dataset>]_qat/`` (``--exp-name`` to choose).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch

from acnet.export import export_onnx
from acnet.quant import activation_qparams, convert_qat, prepare_qat
from utils.command import Command, create_loaders, model_builder
from utils.engine.deploy import (calibration_batches, evaluate_onnx, example_batch, int8_path, quantize_int8,
                                 require_deploy_extras)
from utils.engine.distributed import DistContext, barrier
from utils.engine.evaluation import evaluate, load_weights_strict
from utils.engine.init_weights import load_init_weights
from utils.engine.posttrain import DeployMismatchError, count_parameters
from utils.engine.trainer import Trainer, TrainOptions, save_weights_hdf5
from utils.modes.registry import QatOptions
from utils.rundir.checkpoint import seed_everything
from utils.rundir.log import RunLog, TensorBoard
from utils.rundir.record import (RunSession, command_with_run_data, hold_run, make_record, merge_summary, move_aside,
                                 write_record)

__all__ = ["QAT_LR_FACTOR", "qat_recipe", "run_qat"]

logger = logging.getLogger("do_acnet")

QAT_LR_FACTOR = 0.01  # default fine-tuning lr: the recipe's x this


def qat_recipe(recipe, lr_given: bool):
    """The recipe of the fine-tune: ``lr`` x :data:`QAT_LR_FACTOR` unless ``--lr`` was given; no warmup."""
    changes: dict[str, Any] = {"warmup_epochs": 0.0}
    if not lr_given:
        changes["lr"] = recipe.lr * QAT_LR_FACTOR
    return dataclasses.replace(recipe, **changes)


def run_qat(cmd: Command, ctx: DistContext, run_start: float) -> dict[str, Any]:
    """The ``--qat`` mode (module docstring): fine-tune ``cmd.options.init_weights``, convert, export, test the int8 model.

    The data is the init weights' run's (its record), unless the command line names it. The QAT folder is
    held (:class:`utils.rundir.record.RunSession`: lock, state, kind ``qat``); an earlier QAT run in it is moved
    into ``previous-<time>/`` once everything is validated.
    """
    require_deploy_extras()
    cmd = command_with_run_data(cmd, cmd.options.init_weights)
    paths = cmd.paths(cmd.qat_name)
    session = RunSession(paths, f"do_acnet.py --qat {cmd.arch} / {cmd.block_type}", kind="qat", main=ctx.is_main)
    with hold_run(session, ctx):
        return _run_qat(cmd, ctx, run_start, session)


def _run_qat(cmd: Command, ctx, run_start: float, session) -> dict[str, Any]:
    qat_options: QatOptions = cmd.options
    recipe = qat_recipe(cmd.recipe, lr_given="lr" in cmd.overrides)
    train_loader, eval_loader = create_loaders(cmd, recipe, ctx)
    build = model_builder(cmd, recipe, eval_loader.num_classes)
    paths = session.paths
    seed_everything(cmd.seed)
    model = build()
    info = load_init_weights(model, qat_options.init_weights, block_type=cmd.block_type, arch=cmd.arch,
                             skip_classifier=qat_options.init_weights_skip_classifier)
    prepare_qat(model)
    options = TrainOptions(print_freq=cmd.train.print_freq, progress_bar=cmd.train.progress,
                           meta={"arch": cmd.arch, "block_type": cmd.block_type, "dataset": cmd.dataset, "qat": True},
                           on_state_saved=session.saved)
    options.should_validate = lambda epoch: epoch == recipe.epochs - 1
    session.epochs = recipe.epochs
    if ctx.is_main:
        moved = move_aside(paths.root)
        if moved is not None:
            logger.warning("an earlier QAT run in %s was moved into %s", paths.root, moved)
    barrier()
    run_log = RunLog(paths.log, enabled=ctx.is_main)
    session.begin(run_log, epoch=0)
    if ctx.is_main:
        write_record(paths, make_record(cmd, recipe, "qat", qat=True, init_weights=info,
                                        torch_version=torch.__version__, command_line=cmd.command_line))
    run_log.write(f"QAT of {cmd.arch} / {cmd.block_type} on {cmd.dataset} from {info['path']} ({info['form']}, "
                  f"{info['description']}): {recipe.epochs} epoch{'s' * (recipe.epochs != 1)}, lr {recipe.lr:g}, "
                  "int8 fake quantization of every equivalent kernel (per output channel) and conv input (per tensor), "
                  "BN statistics frozen")
    trainer = Trainer(model, train_loader, eval_loader, recipe, ctx, paths, run_log, options)
    tensorboard = TensorBoard(paths.tensorboard, enabled=ctx.is_main, resume_step=0)
    try:
        result = trainer.fit(tensorboard)
    finally:
        tensorboard.close()
    barrier()
    model = trainer.model.cpu()
    qat_metrics = evaluate(model, eval_loader, "cpu")
    deploy = convert_qat(model)
    check = build(deploy=True)  # the converted weights are the arch's plain deploy model
    load_weights_strict(check, deploy.state_dict(), "the converted QAT weights")
    fp32_metrics = evaluate(deploy, eval_loader, "cpu")
    summary: dict[str, Any] = {"arch": cmd.arch, "block_type": cmd.block_type, "dataset": cmd.dataset,
                               "epochs": recipe.epochs, "qat": True, "init_weights": info["path"],
                               "qat_top1": qat_metrics["top1"], "qat_top5": qat_metrics["top5"],
                               "fp32_top1": fp32_metrics["top1"], "fp32_top5": fp32_metrics["top5"]}
    mismatch = ""
    if ctx.is_main:
        save_weights_hdf5(deploy, paths.deploy_weights)
        onnx_path = paths.root / "model.onnx"
        exported = export_onnx(deploy, example_batch(cmd.input_size), onnx_path, opset=qat_options.opset)
        run_log.write(f"ONNX export {exported.summary()}")
        calibration = calibration_batches(train_loader, qat_options.calib_images)
        int8 = quantize_int8(onnx_path, int8_path(onnx_path), calibration, input_qparams=activation_qparams(model))
        int8_metrics = evaluate_onnx(int8, eval_loader)
        images = int(int8_metrics["num_samples"])
        summary.update(int8_top1=int8_metrics["top1"], int8_top5=int8_metrics["top5"], eval_images=images,
                       onnx_path=os.fspath(onnx_path), int8_path=os.fspath(int8), onnx_opset=exported.opset,
                       onnx_rel_diff=exported.rel_diff, params_deploy=count_parameters(deploy),
                       train_images_per_sec=None if result.images_per_sec is None else round(result.images_per_sec, 2),
                       wall_seconds=round(time.perf_counter() - run_start, 3))
        run_log.write(f"QAT model acc1 {qat_metrics['top1']:.4f} acc5 {qat_metrics['top5']:.4f}; converted fp32 "
                      f"({paths.deploy_weights.name}) acc1 {fp32_metrics['top1']:.4f}; int8 ({int8.name}, "
                      f"onnxruntime) acc1 {int8_metrics['top1']:.4f} acc5 {int8_metrics['top5']:.4f} on {images} images")
        merge_summary(paths.summary, summary)
        run_log.write(f"summary written: {paths.summary.name}")
        one_image = 100.0 / max(images, 1)
        if abs(int8_metrics["top1"] - qat_metrics["top1"]) > one_image + 1e-9:
            mismatch = (f"the int8 model's top-1 ({int8_metrics['top1']:.4f}) differs from the QAT model's "
                        f"({qat_metrics['top1']:.4f}) by more than one eval image ({one_image:.4f} points)")
            run_log.write("ERROR: " + mismatch, logging.ERROR)
    barrier()
    if mismatch:
        raise DeployMismatchError(mismatch)
    return summary
