"""Evaluation: top-1/top-5/loss of a model on a loader, train-vs-deploy comparison, and loading a
weights file (hdf5 or torch checkpoint, training-time or deploy form) for evaluation.

In a distributed run (process group initialised) each rank evaluates its own shard of the eval
loader and the sums are all-reduced, so every rank returns the metrics of the whole set.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import constructor
from acnet import WeightsError, load_state_dict_file
from acnet.weights import as_state_dict, check_finite_weights
from constructor.original_formats import recognise_weights
from data import to_device
from utils.engine.distributed import all_reduce_max
from utils.engine.metrics import MetricSums

__all__ = ["evaluate", "compare_models", "load_model_for_eval", "exact_math", "autocast_context"]

InputTransform = Callable[[torch.Tensor], torch.Tensor]


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``enabled`` (a no-op context otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """Disable TF32 on CUDA inside the block (restored after), so that train-form vs deploy-form
    comparisons measure the re-parameterisation, not reduced-precision matmuls."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batches(loader, device: torch.device, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in loader:
        images = to_device(loader, images, device, fmt)
        yield images, labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str, *, input_transform: InputTransform | None = None,
             amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """Mean cross-entropy ``loss``, ``top1``/``top5`` (percent) and ``num_samples`` of ``model`` on ``loader``.

    The model is put in eval mode (and its previous mode restored). ``input_transform`` maps an image
    batch to an image batch (e.g. a horizontal flip) before the forward pass.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = MetricSums(device)
    try:
        for images, labels in _batches(loader, device, channels_last):
            if input_transform is not None:
                images = input_transform(images)
            with autocast_context(device, amp):
                logits = model(images)
            logits = logits.float()
            sums.update(F.cross_entropy(logits, labels), logits, labels)
    finally:
        model.train(was_training)
    return sums.all_reduce().read()


@torch.no_grad()
def compare_models(reference: nn.Module, candidate: nn.Module, loader, device: torch.device | str, *,
                   channels_last: bool = False) -> dict[str, Any]:
    """Evaluate two models on the same batches (float32, TF32 off) in one pass.

    Returns ``{"reference": metrics, "candidate": metrics, "max_abs_logit_diff": float,
    "max_abs_logit": float}`` with the metrics of :func:`evaluate`; the logit difference
    ``max|reference - candidate|`` and the reference's scale ``max|reference|`` are maxima over the
    whole set (and all ranks).
    """
    device = torch.device(device)
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    ref_sums, cand_sums = MetricSums(device), MetricSums(device)
    max_diff = torch.zeros((), dtype=torch.float64, device=device)
    max_logit = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with exact_math():
            for images, labels in _batches(loader, device, channels_last):
                ref_logits = reference(images).float()
                cand_logits = candidate(images).float()
                ref_sums.update(F.cross_entropy(ref_logits, labels), ref_logits, labels)
                cand_sums.update(F.cross_entropy(cand_logits, labels), cand_logits, labels)
                max_diff = torch.maximum(max_diff, (ref_logits - cand_logits).abs().max().to(torch.float64))
                max_logit = torch.maximum(max_logit, ref_logits.abs().max().to(torch.float64))
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    all_reduce_max(max_diff)
    all_reduce_max(max_logit)
    return {"reference": ref_sums.all_reduce().read(), "candidate": cand_sums.all_reduce().read(),
            "max_abs_logit_diff": float(max_diff.item()), "max_abs_logit": float(max_logit.item())}


def _describe_keys(missing: list[str], unexpected: list[str], limit: int = 5) -> str:
    def show(keys: list[str]) -> str:
        more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {show(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {show(unexpected)}")
    return "; ".join(parts)


def load_weights_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one clear ``acnet.WeightsError`` on mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shapes:
        detail = _describe_keys(missing, unexpected)
        if bad_shapes:
            more = f" ... (+{len(bad_shapes) - 3} more)" if len(bad_shapes) > 3 else ""
            detail = "; ".join(filter(None, [detail, "shape mismatch " + "; ".join(bad_shapes[:3]) + more]))
        raise WeightsError(f"{what} do not match the model: {detail}")
    model.load_state_dict(state, strict=True)


def load_model_for_eval(arch: str, block_type: str, weights: str | os.PathLike | Mapping[str, torch.Tensor],
                        device: torch.device | str = "cpu", num_classes: int | None = None, *,
                        source: str | None = None, **block_kwargs: Any) -> nn.Module:
    """Build ``arch`` and load ``weights`` strictly, in whichever form they are, in eval mode on ``device``.

    ``weights``: a path (hdf5 in the original format, or a torch ``.pth``/``.pt`` checkpoint, possibly
    wrapped in ``state_dict``/``model`` and with a DDP ``module.`` prefix) or a state dict. The form is
    recognised from the names (``constructor.original_formats.recognise_weights``): the training-time
    model of ``block_type``, the deploy model (the same for every block type), or a file the original
    ACNet / DBB code wrote for this arch (training-time of the same block type, or deploy; translated
    to our names). ``num_classes=None``: the size of the weights' classifier (e.g. an ImageFolder set
    with its own class count). ``source``: how messages name in-memory ``weights`` (default "the given
    state dict"). Raises ``acnet.WeightsError`` naming the closest form and what differs,
    ``acnet.NonFiniteWeightsError`` for weights holding NaN / inf (``acnet.check_finite_weights``).
    """
    if isinstance(weights, Mapping):
        # the same unwrapping as for files: checkpoint containers, a DDP ``module.`` prefix
        source = source or "the given state dict"
        state = as_state_dict(weights, source)
    else:
        state, source = load_state_dict_file(weights), f"weights file {os.fspath(weights)!r}"
    check_finite_weights(state, source)  # before anything is computed or written (convert, export, eval)
    found = recognise_weights(arch, state, source, num_classes=num_classes, block_type=block_type)
    if found.block_type is not None and found.block_type != block_type:
        raise WeightsError(
            f"{source} holds {found.scheme.description}, not {block_type} weights: pass -b/--block-type "
            f"{found.block_type} (or convert the file to deploy weights, which fit every block type)")
    model = constructor.build_model(arch, block_type, deploy=found.block_type is None,
                                    num_classes=found.num_classes, **block_kwargs)
    load_weights_strict(model, found.state, f"The tensors of {source}")
    return model.to(device).eval()
