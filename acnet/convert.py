"""Whole-model re-parameterization: plug blocks into any model and switch a model to deploy form.

* :func:`convert_to_acnet` finds every conv-norm pair (:func:`acnet.pairs.find_conv_bn_pairs`: an
  ``nn.Conv1d/2d/3d`` whose output goes only into a BatchNorm, SyncBatchNorm or frozen BatchNorm; with
  ``bn_free=True`` also convs no norm follows) and replaces the conv by an ACB/DBB/OREPA block
  (:mod:`acnet.registry`) of the matching form (``dim``, ``norm``) and the norm by ``nn.Identity``.
* :func:`acnet_switch_to_deploy` replaces every :class:`~acnet.base.ReparamBlock` by the one
  conv with bias it equals in eval mode.
* :func:`acnet_fuse_and_load` (module :mod:`acnet.fuse_load`) loads training-time weights into the
  unmodified baseline model; :func:`acnet.conversion_report` (module :mod:`acnet.report`) says, before
  anything changes, what :func:`convert_to_acnet` would do.

The decision per conv (:func:`plan_conversion`) is made in one place, used by the conversion and the report.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .base import ReparamBlock
from .fuse_load import acnet_fuse_and_load
from .pairs import (
    CONV_TYPES,
    NORM_ACT_CLASSES,
    ConvBNPair,
    bn_tail,
    constructor_geometry,
    conv_geometry,
    find_conv_bn_pairs,
    modules_outside_blocks,
    norm_features,
    norm_kind,
)
from .registry import BLOCK_REGISTRY

__all__ = [
    "ConvBNPair",
    "ConvPlan",
    "NORM_ACT_CLASSES",
    "acnet_switch_to_deploy",
    "convert_to_acnet",
    "acnet_fuse_and_load",
    "bn_tail",
    "find_conv_bn_pairs",
    "pluggable_block_classes",
    "plan_conversion",
]

logger = logging.getLogger(__name__)

# Constructor arguments taken from the model, never from the caller's block_kwargs.
_RESERVED_BLOCK_KWARGS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
    "padding_mode", "deploy", "bn_eps", "dim", "norm",
)
_UNVERIFIED_BN = "its BN is a"
_NOT_PAIRED = "its output does not go only into one norm (BatchNorm, SyncBatchNorm, FrozenBatchNorm2d)"
_NOT_PAIRED_BN_FREE = "its output goes into a norm it does not feed alone"


# --------------------------------------------------------------------------------------------
# acnet_switch_to_deploy
# --------------------------------------------------------------------------------------------
def acnet_switch_to_deploy(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and replace every re-parameterizable block by its deploy conv.

    Each outermost :class:`ReparamBlock` is replaced in its parent, under the same attribute name,
    by ``block.make_deploy_conv()``: a plain ``nn.Conv{1,2,3}d(bias=True)`` holding the equivalent
    kernel and bias (built from the running statistics, hence eval mode first). A block with a
    non-identity ``nonlinear`` (DBB) becomes ``nn.Sequential(conv, nonlinear)``. A deploy model's module
    tree is therefore the same whatever block type trained it. A block shared by several parents stays
    shared. ``model`` itself being a block is switched in place with ``switch_to_deploy()``.
    Returns ``model``.
    """
    model.eval()
    if isinstance(model, ReparamBlock):
        model.switch_to_deploy()
        return model
    replacements: Dict[int, nn.Module] = {}
    _replace_blocks(model, replacements)
    logger.debug("acnet_switch_to_deploy: %d block(s) replaced by plain convs", len(replacements))
    return model


def _replace_blocks(module: nn.Module, replacements: Dict[int, nn.Module]) -> None:
    for name, child in list(module._modules.items()):  # not named_children(): it hides repeats
        if child is None:
            continue
        if isinstance(child, ReparamBlock):
            if id(child) not in replacements:
                replacements[id(child)] = _deploy_module(child)
            setattr(module, name, replacements[id(child)])
        else:
            _replace_blocks(child, replacements)


def _deploy_module(block: ReparamBlock) -> nn.Module:
    conv = block.make_deploy_conv()
    nonlinear = getattr(block, "nonlinear", None)
    if isinstance(nonlinear, nn.Module) and not isinstance(nonlinear, nn.Identity):
        deploy: nn.Module = nn.Sequential(conv, nonlinear)
    else:
        deploy = conv
    return deploy.train(False)


# --------------------------------------------------------------------------------------------
# the decision per conv
# --------------------------------------------------------------------------------------------
@dataclass
class ConvPlan:
    """What :func:`convert_to_acnet` does with one conv: ``reason is None`` means it is replaced by
    ``block_class(**options)`` and its norm (``norm_name``) by ``tail``."""

    conv_name: str
    conv: nn.Module
    norm_name: Optional[str]
    norm: Optional[nn.Module]
    form: Optional[str]  # the block's norm argument: "batch", "frozen" or "none"
    reason: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    tail: Optional[nn.Module] = None
    block_params: int = 0  # trainable + frozen parameters of the block that replaces the conv


def pluggable_block_classes() -> Dict[str, type]:
    """The block classes :func:`convert_to_acnet` plugs in, by name, read live from the registry."""
    return {name: t.block_class for name, t in BLOCK_REGISTRY.items() if not t.plain}


def block_class_for(block_type: str) -> type:
    """The class :func:`convert_to_acnet` plugs in for ``block_type`` (a non-plain registry entry)."""
    key = block_type.lower() if isinstance(block_type, str) else block_type
    pluggable = pluggable_block_classes()
    if key not in pluggable:
        raise ValueError(
            f"unknown block_type {block_type!r}; valid block types: {', '.join(map(repr, pluggable))}"
        )
    return pluggable[key]


def check_block_options(block_class: type, block_kwargs: Dict[str, Any], keep_weights: bool = False) -> None:
    """Fail once, clearly, on options the block does not take or rejects (not silently per conv)."""
    reserved = sorted(set(block_kwargs) & set(_RESERVED_BLOCK_KWARGS))
    if reserved:
        raise ValueError(
            f"convert_to_acnet: {', '.join(reserved)} cannot be given: the geometry, form and bn_eps of each "
            "block are taken from the conv-norm pair it replaces (and blocks are created in training form)"
        )
    if block_kwargs.get("nonlinear") is not None:
        raise ValueError(
            "convert_to_acnet: 'nonlinear' is not supported: the model already applies whatever "
            "follows each BN, a nonlinearity inside the block would change the function and could "
            "not be folded back into the baseline model"
        )
    block_kwargs.pop("nonlinear", None)
    options = [name for name, p in inspect.signature(block_class).parameters.items()
               if name not in _RESERVED_BLOCK_KWARGS and p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(block_kwargs) - set(options))
    if unknown:
        raise ValueError(f"convert_to_acnet: {block_class.__name__} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(options)}")
    try:
        block_class(4, 4, 3, padding=1, **block_kwargs)  # a geometry every block represents
    except ValueError as exc:
        raise ValueError(f"convert_to_acnet: invalid options for {block_class.__name__}: {exc}") from None
    if keep_weights and block_kwargs.get("use_affine", True) is False:
        raise ValueError(
            "convert_to_acnet: keep_weights=True needs affine BNs (use_affine=True) to start the side "
            "branches at zero; drop use_affine=False or keep_weights=True"
        )


def kernel_size_set(kernel_sizes: Iterable[int]) -> frozenset:
    """``kernel_sizes`` as a non-empty set of ints, or one ``ValueError``."""
    try:
        sizes = frozenset(int(k) for k in kernel_sizes)
    except (TypeError, ValueError):
        raise ValueError(f"kernel_sizes must be an iterable of ints (e.g. range(2, 7)), got {kernel_sizes!r}") from None
    if not sizes:
        raise ValueError("kernel_sizes is empty: no conv could be converted (e.g. use range(2, 7))")
    return sizes


def _accepts(block_class: type, argument: str) -> bool:
    return argument in inspect.signature(block_class).parameters


def _block_options(block_class: type, conv: nn.Module, norm: Optional[nn.Module], form: str,
                   sizes: frozenset) -> Union[Dict[str, Any], str]:
    """Constructor arguments of the block replacing ``conv`` (+ ``norm``), or the reason it cannot.

    The block is asked first (``block_class.unsupported(...)``, the block contract); a 2-D conv with a
    square geometry gets ints (today's constructor arguments), any other conv tuples of length ``dim``
    plus ``dim=`` and ``norm=`` (passed only when they differ from the defaults 2 and "batch").
    """
    geometry = conv_geometry(conv)
    if isinstance(geometry, str):
        return geometry
    dim = geometry.pop("dim")
    kernel = geometry["kernel_size"]
    if max(kernel) not in sizes:
        return f"kernel size {_show(kernel)} not in kernel_sizes {sorted(sizes)}"
    if norm is not None:
        if norm_features(norm) != geometry["out_channels"]:
            return f"its norm has {norm_features(norm)} features for {geometry['out_channels']} conv outputs"
        if form == "batch" and (not norm.track_running_stats or norm.running_mean is None):
            return "its BN has no running statistics (track_running_stats=False)"
    if not _accepts(block_class, "padding_mode"):
        if geometry["padding_mode"] != "zeros":
            return f"{block_class.__name__} supports only padding_mode='zeros', not {geometry['padding_mode']!r}"
        del geometry["padding_mode"]
    unsupported = getattr(block_class, "unsupported", None)
    if callable(unsupported):
        reason = unsupported(dim=dim, **{k: geometry[k] for k in ("kernel_size", "stride", "padding", "dilation")},
                             groups=geometry["groups"], padding_mode=geometry.get("padding_mode", "zeros"), norm=form)
        if reason:
            return reason
    elif (dim, form) != (2, "batch"):  # a block without the contract's forms (a user's older block)
        return f"{block_class.__name__} has only the 2-D BatchNorm form (no unsupported()/dim/norm)"
    if (dim != 2 or form != "batch") and not (_accepts(block_class, "dim") and _accepts(block_class, "norm")):
        return f"{block_class.__name__} takes no dim/norm arguments"
    geometry = constructor_geometry({"dim": dim, **geometry}, form)
    if form == "batch":
        geometry.update(bn_eps=norm.eps, bn_momentum=norm.momentum)
    elif form == "frozen":
        geometry["bn_eps"] = float(norm.eps)
    return geometry


def _show(size: Tuple[int, ...]) -> str:
    return str(size[0]) if len(set(size)) == 1 and len(size) == 2 else "x".join(map(str, size))


def _build_for_inspection(block_class: type, options: Dict[str, Any]) -> nn.Module:
    """The block, built on the meta device (no memory) when its constructor allows, else on the CPU."""
    try:
        with torch.device("meta"):
            return block_class(**options)
    except ValueError:
        raise
    except Exception:  # an initialiser that reads tensor values cannot run on meta tensors
        return block_class(**options)


def plan_conversion(model: nn.Module, block_class: type, sizes: frozenset, *, bn_free: bool = False,
                    block_kwargs: Optional[Dict[str, Any]] = None) -> List[ConvPlan]:
    """One :class:`ConvPlan` per conv of ``model`` outside re-param blocks, in registration order.

    Read only: nothing in ``model`` changes (blocks are built, on the meta device, only to check that
    the options fit the geometry).
    """
    block_kwargs = dict(block_kwargs or {})
    pairs = {p.conv_name: p for p in find_conv_bn_pairs(model, bn_free=bn_free)}
    plans = []
    for name, conv in modules_outside_blocks(model):
        if not isinstance(conv, CONV_TYPES):
            continue
        pair = pairs.get(name)
        if pair is None:
            geometry = conv_geometry(conv)  # a conv subclass with its own forward: say so first
            reason = geometry if isinstance(geometry, str) else _NOT_PAIRED_BN_FREE if bn_free else _NOT_PAIRED
            plans.append(ConvPlan(name, conv, None, None, None, reason))
            continue
        norm = model.get_submodule(pair.bn_name) if pair.bn_name is not None else None
        plan = ConvPlan(name, conv, pair.bn_name, norm, norm_kind(norm) or "none")
        plans.append(plan)
        tail: Union[nn.Module, str] = nn.Identity() if norm is None else bn_tail(norm)
        if isinstance(tail, str):
            plan.reason = tail
            continue
        options = _block_options(block_class, conv, norm, plan.form, sizes)
        if isinstance(options, str):
            plan.reason = options
            continue
        try:
            block = _build_for_inspection(block_class, {**options, **block_kwargs})
        except ValueError as exc:
            plan.reason = f"{block_class.__name__} cannot represent it: {exc}"
            continue
        plan.options, plan.tail = {**options, **block_kwargs}, tail
        plan.block_params = sum(p.numel() for p in block.parameters())
    return plans


# --------------------------------------------------------------------------------------------
# convert_to_acnet
# --------------------------------------------------------------------------------------------
def convert_to_acnet(
    model: nn.Module,
    block_type: str = "acb",
    kernel_sizes: Iterable[int] = range(2, 7),
    *,
    keep_weights: bool = False,
    bn_free: bool = False,
    **block_kwargs: Any,
) -> nn.Module:
    """Replace each eligible conv-norm pair of ``model`` by a training-time block, in place.

    A pair (see :func:`find_conv_bn_pairs`) is an ``nn.Conv1d/2d/3d`` followed only by a
    ``BatchNorm{1,2,3}d`` / ``SyncBatchNorm`` (block form ``norm="batch"``), a torchvision
    ``FrozenBatchNorm2d`` (``norm="frozen"``: no batch statistics anywhere, the pretrained pair is the
    main branch) or, with ``bn_free=True``, nothing (``norm="none"``: a BN-free block with biases). It is
    eligible when its largest kernel side is in ``kernel_sizes`` (default ``2..6``: 7x7 stems and 1x1 convs
    stay), the padding is symmetric (``'same'``/``'valid'`` resolved), the norm tracks running statistics
    over the conv's output channels, and the block accepts that geometry (``block_class.unsupported``:
    e.g. ACB needs odd kernel sides, ACB refuses 1-D convs). Other convs are left as they are (logged at
    debug level with the reason; :func:`acnet.conversion_report` lists every conv with its reason);
    a ``UserWarning`` counts the reasons when no conv is replaced, and names refused BN subclasses.

    The conv is replaced by ``block_class(in, out, K, stride, padding, dilation, groups,
    [padding_mode,] [dim=, norm=,] bn_eps=norm.eps, bn_momentum=norm.momentum, **block_kwargs)`` on the
    conv's device and dtype (frozen if the conv was frozen), the norm by ``nn.Identity`` -- or, for a BN
    subclass that also applies an activation (timm's ``BatchNormAct2d``), by what it applies after
    normalising (:func:`bn_tail`; other BN subclasses are refused). ``block_kwargs`` are the block's own
    options (``gamma_init``, ``use_affine``, ``reduce_gamma``, ``internal_channels_1x1_3x3``,
    ``bn_momentum``, ...); the geometry, form and ``bn_eps`` always come from the model, and
    ``nonlinear`` is refused (it would change the function, and the result could no longer be folded
    back into the baseline model).

    ``keep_weights=False`` (training from scratch, as in the papers): blocks are freshly
    initialised by their own rules. ``keep_weights=True`` (fine-tuning a trained model): each block
    starts as exactly the conv (+ norm) it replaces -- ``block.load_main_branch(conv.weight, conv.bias,
    norm)``: the main branch takes the pretrained conv and norm, every other branch contributes zero --
    so the eval-mode outputs do not change.

    Returns ``model`` (converted in place; the model then trains as usual).
    """
    block_class = block_class_for(block_type)
    sizes = kernel_size_set(kernel_sizes)
    check_block_options(block_class, block_kwargs, keep_weights)
    if keep_weights and not callable(getattr(block_class, "load_main_branch", None)):
        raise ValueError(f"convert_to_acnet: keep_weights=True needs {block_class.__name__}.load_main_branch "
                         "(the block contract); train from scratch (keep_weights=False) or add it")

    plans = plan_conversion(model, block_class, sizes, bn_free=bn_free, block_kwargs=block_kwargs)
    converted, kept = 0, Counter()
    for plan in plans:
        if plan.reason is not None:
            logger.debug("convert_to_acnet: keeping %s as it is: %s", plan.conv_name, plan.reason)
            kept[plan.reason] += 1
            continue
        conv = plan.conv
        block = block_class(**plan.options).to(device=conv.weight.device, dtype=conv.weight.dtype)
        if keep_weights:
            with torch.no_grad():
                block.load_main_branch(conv.weight, conv.bias, plan.norm)
        if not conv.weight.requires_grad:
            block.requires_grad_(False)
        block.train(conv.training)
        _set_submodule(model, plan.conv_name, block)
        if plan.norm_name is not None:
            _set_submodule(model, plan.norm_name, plan.tail)
        converted += 1
    present = sum(1 for _, m in modules_outside_blocks(model) if isinstance(m, ReparamBlock)) - converted
    if present:
        kept["already a re-param block"] = present
    logger.info("convert_to_acnet: %d conv(s) replaced by %s, %d conv(s) / block(s) left as they are",
                converted, block_class.__name__, sum(kept.values()))
    refused_bns = {reason: n for reason, n in kept.items() if reason.startswith(_UNVERIFIED_BN)}
    if converted == 0:
        reasons = ("; ".join(f"{n} conv(s): {reason}" for reason, n in kept.most_common())
                   or "the model has no nn.Conv1d/2d/3d")
        hint = "" if bn_free else "; convs no norm follows convert with bn_free=True"
        warnings.warn(f"convert_to_acnet: no conv of {type(model).__name__} was replaced by {block_class.__name__} "
                      f"({reasons}){hint}; acnet.conversion_report(model, {block_type!r}) lists every conv "
                      "with its reason", stacklevel=2)
    elif refused_bns:
        warnings.warn("convert_to_acnet: " + "; ".join(f"{n} conv(s) kept: {r}" for r, n in refused_bns.items()),
                      stacklevel=2)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


@torch.no_grad()
def _copy_pair_into_block(conv: nn.Module, bn: Optional[nn.Module], block: ReparamBlock) -> None:
    """``block`` computes ``bn(conv(x))`` in eval mode: the keep_weights step of :func:`convert_to_acnet`
    (``block.load_main_branch``), under the name ``utils/init_weights.py`` imports."""
    block.load_main_branch(conv.weight, conv.bias, bn)
