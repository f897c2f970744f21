"""``do_acnet.py -a ARCH -b BLOCK --export-onnx WEIGHTS OUT.onnx [--quantize int8 --calib-images N]``.

WEIGHTS (any form ``--eval-only`` takes) becomes the checked ONNX deploy model OUT
(:func:`utils.engine.deploy.export_weights`); ``--quantize int8`` adds OUT.int8.onnx (static PTQ,
:func:`utils.engine.deploy.quantize_int8`) and the fp32 / int8 top-1 on the eval set. The figures go
to the log and into the run's ``summary.json`` when WEIGHTS is in a run folder (its lock held while
writing there), else into ``OUT.summary.json``.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

from acnet.export import DEFAULT_RTOL
from utils.command import Command, create_loaders
from utils.engine.deploy import (calibration_batches, evaluate_onnx, export_weights, int8_path, quantize_int8,
                                 require_deploy_extras)
from utils.engine.distributed import DistContext
from utils.engine.evaluation import evaluate
from utils.modes.registry import ExportOptions
from utils.rundir.identity import ExperimentPaths
from utils.rundir.log import RunLog
from utils.rundir.record import RunSession, command_with_run_data, merge_summary

__all__ = ["run_export", "summary_target"]


def summary_target(weights: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Optional[Path]]:
    """``(summary.json, log.txt or None)``: the run folder of ``weights`` when it has a summary, else beside ``out``."""
    run = ExperimentPaths(Path(weights).parent)
    if run.summary.is_file():
        return run.summary, run.log
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".summary.json"), None


def run_export(cmd: Command, ctx: DistContext, run_start: float) -> dict[str, Any]:
    """The ``--export-onnx WEIGHTS OUT [--quantize int8]`` mode (module docstring); prints the figures.

    The data is loaded only for ``--quantize``: the run's own (its record) when WEIGHTS is in a run folder,
    unless ``--dataset`` says otherwise.
    """
    require_deploy_extras()
    weights, out = cmd.options.weights, cmd.options.out
    summary, log = summary_target(weights, out)
    if cmd.options.quantize:
        cmd = command_with_run_data(cmd, weights)  # calibrate and test on the run's own data
    # writing into a run folder (its log.txt and summary.json): hold its lock, as every writer there does
    held = RunSession(ExperimentPaths(summary.parent), "do_acnet.py --export-onnx") if log is not None else nullcontext()
    with held:
        return _export(cmd, ctx, weights, out, summary, log)


def _export(cmd: Command, ctx: DistContext, weights, out, summary: Path, log: Optional[Path]) -> dict[str, Any]:
    options: ExportOptions = cmd.options
    run_log = RunLog(log, enabled=True, keep_existing=True) if log is not None else None

    def report(message: str) -> None:  # to the run's log.txt (echoed by the logger) or to stdout
        if run_log is not None:
            run_log.write(message)
        else:
            print(message, flush=True)

    deploy, result = export_weights(cmd.arch, cmd.block_type, weights, out, input_size=cmd.input_size,
                                    opset=options.opset)
    report(f"exported {weights} -> {result.path} (opset {result.opset}, dynamic batch, "
           f"{sum(result.op_counts.values())} nodes: " + ", ".join(f"{op} {n}" for op, n in result.op_counts.items())
           + ")")
    report(f"onnx.checker (full check): passed; onnxruntime vs PyTorch deploy model on a fixed batch of "
           f"{result.batch_size}: max abs diff {result.max_abs_diff:.3g}, relative {result.rel_diff:.3g} "
           f"(limit {DEFAULT_RTOL:g})")
    fields: dict[str, Any] = {"onnx_path": os.fspath(result.path), "onnx_opset": result.opset,
                              "onnx_rel_diff": result.rel_diff, "onnx_max_abs_diff": result.max_abs_diff}
    if options.quantize == "int8":
        train_loader, eval_loader = create_loaders(cmd, cmd.recipe, ctx)
        calibration = calibration_batches(train_loader, options.calib_images)
        int8 = quantize_int8(result.path, int8_path(out), calibration)
        torch_metrics = evaluate(deploy, eval_loader, "cpu")
        fp32 = evaluate_onnx(result.path, eval_loader)
        int8_metrics = evaluate_onnx(int8, eval_loader)
        images = sum(b.shape[0] for b in calibration)
        fields.update(int8_path=os.fspath(int8), calib_images=images, eval_images=int(fp32["num_samples"]),
                      torch_top1=torch_metrics["top1"], fp32_top1=fp32["top1"], fp32_top5=fp32["top5"],
                      int8_top1=int8_metrics["top1"], int8_top5=int8_metrics["top5"])
        report(f"int8 PTQ ({images} calibration images) -> {int8}: on {int(fp32['num_samples'])} eval images "
               f"fp32 acc1 {fp32['top1']:.4f} acc5 {fp32['top5']:.4f}, int8 acc1 {int8_metrics['top1']:.4f} "
               f"acc5 {int8_metrics['top5']:.4f} (PyTorch deploy acc1 {torch_metrics['top1']:.4f})")
    merge_summary(summary, fields)
    report(f"summary written: {summary}")
    return fields
