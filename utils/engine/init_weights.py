"""Start training from a weights file: ``do_acnet.py ... --init-weights FILE`` (fine-tuning).

:func:`load_init_weights` accepts any weights file :func:`utils.engine.evaluation.load_model_for_eval`
accepts (ours or the original ACNet / DBB code's, hdf5 or ``.pth``), recognised by its names
(``constructor.original_formats.recognise_weights``), and initialises a freshly built
training-time model of ``block_type`` from it:

* training-time weights of the same block type: loaded as they are;
* ``base`` (plain conv-BN) weights into an ``acb`` / ``dbb`` model: every block starts as exactly
  the conv-BN it replaces (``convert_to_acnet(..., keep_weights=True)`` semantics: the main
  branch holds the pair, every other branch's last BN weight is 0); a bias-free conv with no BN
  after it (WRN) starts with an identity BN on the main branch;
* deploy weights: every unit starts as its fused conv (the bias carried by the main branch's BN);
* training-time weights of another block type: refused (convert them to deploy weights first).

Every entry of the file is used and every entry of the model is set (strict), except the
classifier with ``skip_classifier=True``, which keeps its fresh initialisation (for a dataset with
another class count). The returned dict is what ``recipe.json`` records about the source.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

import constructor
from acnet import WeightsError, check_finite_weights, load_state_dict_file
from acnet.block import ConvBN, ReparamBlock
from acnet.convert import copy_pair_into_block  # the keep_weights semantics of convert_to_acnet
from constructor.builder import BiasFreeConv
from constructor.original_formats import own_schemes, recognise_weights
from utils.engine.evaluation import load_weights_strict

__all__ = ["load_init_weights"]


def load_init_weights(model: nn.Module, path: str | os.PathLike, *, block_type: str, skip_classifier: bool = False,
                      logger: Optional[logging.Logger] = None, arch: Optional[str] = None) -> Dict[str, Any]:
    """Initialise ``model`` (a training-time model of ``block_type`` built by ``constructor``) from ``path``.

    ``arch``: the model's architecture (default: found from the model's entry names). Returns
    ``{"path", "sha256", "scheme", "description", "form", "classifier"}`` for ``recipe.json``.
    Raises ``acnet.WeightsError`` (one line naming the problem and the fix) when the file cannot
    initialise the model (``acnet.NonFiniteWeightsError``: it holds NaN / inf); the model is then unchanged.
    """
    log = logger or logging.getLogger(__name__)
    arch = arch or _arch_of(model, block_type)
    source = f"--init-weights file {os.fspath(path)!r}"
    raw = load_state_dict_file(path)
    found = recognise_weights(arch, raw, source, block_type=block_type)
    classifier = _classifier_name(model)
    model_classes = model.get_submodule(classifier).out_features
    state = dict(found.state)
    if skip_classifier:
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
        classifier_note = f"replaced: fresh {model_classes}-class {classifier} (the file's has {found.num_classes})"
    elif found.num_classes != model_classes:
        raise WeightsError(
            f"{source} has a {found.num_classes}-class classifier, the model {model_classes} classes: pass "
            "--init-weights-skip-classifier to start a fresh classifier (or --dataset matching the file)")
    else:
        classifier_note = "loaded"
    check_finite_weights(state if skip_classifier else raw, source)  # the file's names, unless a part is unused

    if found.block_type == block_type:
        form = f"training-time {block_type} weights, loaded as they are"
        source_model = None
    elif found.block_type in ("base", None):
        form = ("base weights: every block starts as its conv-BN" if found.block_type == "base"
                else "deploy weights: every unit starts as its fused conv")
        source_model = constructor.build_model(arch, found.block_type or "base", deploy=found.block_type is None,
                                               num_classes=found.num_classes)
    else:
        raise WeightsError(
            f"{source} holds {found.scheme.description}, which cannot start a {block_type} model: train with "
            f"-b {found.block_type}, or convert the file to deploy weights first (do_acnet.py -a {arch} "
            f"-b {found.block_type} --convert FILE DEPLOY.hdf5), then every unit starts as its fused conv")

    if skip_classifier:  # the model's own fresh classifier stands in for the file's
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(classifier + ".")})
    if source_model is None:
        load_weights_strict(model, state, f"The tensors of {source}")
    else:
        load_weights_strict(source_model, found.state, f"The tensors of {source}")
        _start_blocks_from(model, source_model, skip=classifier if skip_classifier else None)
    record = {"path": str(Path(path).resolve()), "sha256": _sha256(Path(path)), "scheme": found.scheme.name,
              "description": found.scheme.description, "form": form, "classifier": classifier_note}
    log.info("initial weights: %s (%s); %s; classifier %s", path, found.scheme.description, form, classifier_note)
    return record


@torch.no_grad()
def _start_blocks_from(model: nn.Module, source: nn.Module, skip: Optional[str]) -> None:
    """Every unit of ``model`` starts as the same-named unit of ``source`` (base training or deploy model)."""
    source_modules = dict(source.named_modules())
    units = {name for name, m in model.named_modules() if isinstance(m, ReparamBlock)}
    for name, module in model.named_modules():
        if name in units:
            conv, bn = _as_pair(source_modules[name])
            if isinstance(module, (ConvBN, BiasFreeConv)):
                _copy_pair_into_plain(conv, bn, module)
            else:
                copy_pair_into_block(conv, bn, module)
    # everything outside the units (classifiers, standalone BNs) has the same names in both models
    outside = [k for k in model.state_dict()
               if not any(k.startswith(u + ".") for u in units) and not (skip and k.startswith(skip + "."))]
    source_state = source.state_dict()
    missing, unexpected = model.load_state_dict({k: source_state[k] for k in outside}, strict=False)
    assert not unexpected and set(missing) <= set(model.state_dict()) - set(outside), (missing, unexpected)


def _as_pair(unit: nn.Module) -> tuple:
    """``(conv, bn)`` computing the source unit: ConvBN's own pair, or a conv with an identity BN."""
    if isinstance(unit, ConvBN):
        return unit.conv, unit.bn
    conv = unit.conv if isinstance(unit, BiasFreeConv) else unit  # BiasFreeConv, or a deploy nn.Conv2d
    bn = nn.BatchNorm2d(conv.out_channels).to(conv.weight.dtype)
    bn.running_var.fill_(1.0 - bn.eps)  # bn(y) = y (to rounding): scale sqrt(var + eps) / 1
    bn.num_batches_tracked.zero_()
    return conv, bn


def _copy_pair_into_plain(conv: nn.Conv2d, bn: nn.BatchNorm2d, unit: nn.Module) -> None:
    """A ConvBN / BiasFreeConv of the model takes the source pair (a bias-free one only a bias-free conv)."""
    if isinstance(unit, ConvBN):
        unit.conv.weight.copy_(conv.weight)
        unit.bn.load_state_dict(bn.state_dict())
        if conv.bias is not None:
            unit.bn.running_mean.sub_(conv.bias)
        return
    if conv.bias is not None and bool(conv.bias.ne(0).any()):
        raise WeightsError("a deploy conv with a bias cannot start a bias-free conv of the base model "
                           "(the base WRN's stem / pre-activation convs have no bias)")
    unit.conv.weight.copy_(conv.weight)


def _classifier_name(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def _arch_of(model: nn.Module, block_type: str) -> str:
    """The registered arch whose ``block_type`` model has exactly ``model``'s entry names."""
    names = set(model.state_dict())
    for arch in constructor.list_archs():
        own = next(s for s in own_schemes(arch) if s.info["block_type"] == block_type)
        if own.matches_names(list(names)):
            return arch
    raise ValueError(f"{type(model).__name__} is no registered architecture's {block_type} model; pass arch=")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
