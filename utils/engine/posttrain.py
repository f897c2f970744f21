"""After training: evaluate the training-time model, convert it, rebuild the deploy model from
``finish_deploy.hdf5`` alone, evaluate it, compare, and write ``summary.json``.

Every rank takes part in the evaluations (each on its shard of the eval loader); rank 0 writes the
files (``summary.json`` is merged: :func:`utils.rundir.record.merge_summary`). The comparison runs in float32 with TF32 off; deploy top-1 differing from the training-time
top-1 by more than ``TOP1_TOLERANCE`` percentage points is an error (:class:`DeployMismatchError`,
raised after ``summary.json`` is written so the numbers are on disk).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

from torch import nn

from acnet import acnet_switch_to_deploy, load_hdf5
from utils.rundir.checkpoint import ExperimentPaths
from utils.engine.distributed import DistContext, barrier
from utils.engine.trainer import save_weights_hdf5
from utils.errors import ACNetError
from utils.engine.evaluation import compare_models, load_weights_strict
from utils.rundir.record import merge_summary
from utils.rundir.log import RunLog

__all__ = ["DeployMismatchError", "TOP1_TOLERANCE", "count_parameters", "convert_weights", "relative_logit_diff",
           "describe_logit_diff", "post_training"]

TOP1_TOLERANCE = 0.01  # percentage points of top-1 (0.01% of the test set)


class DeployMismatchError(ACNetError, RuntimeError):
    """The converted model does not reproduce the training-time model's accuracy."""


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_logit_diff(max_abs_diff: float, max_abs_logit: float) -> float:
    """``max|diff| / max|logits|``: the deploy model's error relative to the logits' scale (0 when both are 0)."""
    if max_abs_logit > 0:
        return max_abs_diff / max_abs_logit
    return 0.0 if max_abs_diff == 0 else float("inf")


def describe_logit_diff(max_abs_diff: float, max_abs_logit: float) -> str:
    """``"max abs logit diff 4.77e-06 (relative 2.1e-07 of max |logit| 22.7)"``."""
    return (f"max abs logit diff {max_abs_diff:.3g} (relative {relative_logit_diff(max_abs_diff, max_abs_logit):.3g} "
            f"of max |logit| {max_abs_logit:.3g})")


def convert_weights(train_model: nn.Module) -> nn.Module:
    """A deploy-form copy of ``train_model`` (``acnet.acnet_switch_to_deploy`` on a deep copy)."""
    return acnet_switch_to_deploy(copy.deepcopy(train_model).cpu())


def post_training(build_model: Callable[..., nn.Module], eval_loader, ctx: DistContext, paths: ExperimentPaths,
                  run_log: RunLog, summary_fields: dict[str, Any], wall_seconds: Callable[[], float], *,
                  channels_last: bool = False) -> dict[str, Any]:
    """Steps 1-4 of the run's end (module docstring). ``build_model(deploy=False|True)`` builds the arch.

    ``summary_fields`` supplies ``arch, block_type, dataset, seed, epochs, world_size, train_images_per_sec``;
    ``wall_seconds()`` gives the run's wall time so far (read when the summary is written).
    """
    device = ctx.device
    train_model = build_model(deploy=False)
    load_weights_strict(train_model, load_hdf5(paths.finish_weights), f"the tensors of {paths.finish_weights}")
    if ctx.is_main:
        save_weights_hdf5(convert_weights(train_model), paths.deploy_weights)
        run_log.write(f"converted: {paths.deploy_weights.name} written")
    barrier()
    deploy_model = build_model(deploy=True)
    load_weights_strict(deploy_model, load_hdf5(paths.deploy_weights), f"the tensors of {paths.deploy_weights}")
    train_model.to(device)
    deploy_model.to(device)
    result = compare_models(train_model, deploy_model, eval_loader, device, channels_last=channels_last)
    train_m, deploy_m = result["reference"], result["candidate"]
    summary = {
        "arch": summary_fields["arch"],
        "block_type": summary_fields["block_type"],
        "dataset": summary_fields["dataset"],
        "seed": summary_fields.get("seed"),
        "epochs": summary_fields["epochs"],
        "world_size": summary_fields["world_size"],
        "train_top1": train_m["top1"],
        "train_top5": train_m["top5"],
        "deploy_top1": deploy_m["top1"],
        "deploy_top5": deploy_m["top5"],
        "max_abs_logit_diff": result["max_abs_logit_diff"],
        "max_rel_logit_diff": relative_logit_diff(result["max_abs_logit_diff"], result["max_abs_logit"]),
        "train_images_per_sec": summary_fields.get("train_images_per_sec"),
        "params_train": count_parameters(train_model),
        "params_deploy": count_parameters(deploy_model),
        "wall_seconds": round(wall_seconds(), 3),
    }
    run_log.write(f"final training-time model: acc1 {train_m['top1']:.4f} acc5 {train_m['top5']:.4f} "
                  f"loss {train_m['loss']:.6f} on {train_m['num_samples']} images")
    run_log.write(f"final deploy model ({paths.deploy_weights.name}): acc1 {deploy_m['top1']:.4f} "
                  f"acc5 {deploy_m['top5']:.4f} loss {deploy_m['loss']:.6f}; "
                  f"{describe_logit_diff(result['max_abs_logit_diff'], result['max_abs_logit'])}; "
                  f"params {summary['params_train']} -> {summary['params_deploy']}")
    mismatch = abs(train_m["top1"] - deploy_m["top1"]) > TOP1_TOLERANCE
    if ctx.is_main:
        merge_summary(paths.summary, summary)  # other modes' keys (an export's) are kept
        run_log.write(f"summary written: {paths.summary.name}")
    barrier()
    if mismatch:
        message = (f"the deploy model's top-1 ({deploy_m['top1']:.4f}) differs from the training-time model's "
                   f"({train_m['top1']:.4f}) by more than {TOP1_TOLERANCE} points "
                   f"({describe_logit_diff(result['max_abs_logit_diff'], result['max_abs_logit'])}): "
                   "the conversion is wrong for this model")
        run_log.write("ERROR: " + message, logging.ERROR)
        raise DeployMismatchError(message)
    return summary
