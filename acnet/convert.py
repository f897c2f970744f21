"""Whole-model re-parameterization: plug blocks into any model and switch a model to deploy form.

* :func:`convert_to_acnet` replaces every conv (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) a
  block has a form for by an ACB/DBB/OREPA block (:mod:`acnet.registry`), the form chosen per conv from
  what it feeds (:func:`acnet.pairs.find_conv_bn_pairs`): a BatchNorm / SyncBatchNorm -> ``norm="batch"``
  (the block takes the BN, a :class:`FoldedNorm` keeps its place), a frozen BatchNorm ->
  ``norm="frozen"``, anything else (GroupNorm, LayerNorm, an activation, nothing) -> the BN-free form
  ``norm="none"`` with a bias exactly when the conv had one.
* :func:`acnet_switch_to_deploy` replaces every :class:`~acnet.block.ReparamBlock` by the one conv it
  equals in eval mode, and every :class:`FoldedNorm` by the stock norm it stands for, set to add the
  fused bias: the deployed model has the stock model's module tree (conv + BN where it had conv + BN).
* :func:`acnet_fuse_and_load` (module :mod:`acnet.fuse_load`) loads training-time weights into the
  unmodified baseline model; :func:`acnet.conversion_report` (module :mod:`acnet.report`) says, before
  anything changes, what :func:`convert_to_acnet` would do.

The decision per conv (:func:`plan_conversion`) is made in one place, used by the conversion and the report.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .block import GEOMETRY_ARGUMENTS, ReparamBlock, block_option_names, takes_arguments
from .fuse_load import acnet_fuse_and_load
from .fuse_load import pass_through_norm_state
from .pairs import (
    ANY_CONV_TYPES,
    NORM_ACT_CLASSES,
    ConvBNPair,
    Refusal,
    RefusalKind,
    bn_tail,
    constructor_geometry,
    conv_geometry,
    find_conv_bn_pairs,
    geometry_rule_arguments,
    modules_outside_blocks,
    norm_features,
    norm_kind,
)
from .registry import BLOCK_REGISTRY

__all__ = [
    "ConvBNPair",
    "ConvPlan",
    "Refusal",
    "RefusalKind",
    "FoldedNorm",
    "FoldedNormAct",
    "FORM_NAMES",
    "NORM_ACT_CLASSES",
    "acnet_switch_to_deploy",
    "convert_to_acnet",
    "acnet_fuse_and_load",
    "bn_tail",
    "copy_pair_into_block",
    "find_conv_bn_pairs",
    "pluggable_block_classes",
    "plan_conversion",
]

logger = logging.getLogger(__name__)

# Constructor arguments taken from the model, never from the caller's block_kwargs.
_RESERVED_BLOCK_KWARGS = GEOMETRY_ARGUMENTS | {"bn_eps"}
_NOT_PAIRED = Refusal(RefusalKind.NOT_PAIRED,
                      "bn_free=False converts only convs whose output goes only into one norm (BatchNorm, "
                      "SyncBatchNorm, FrozenBatchNorm2d)")
_NO_STAND_IN = Refusal(RefusalKind.NO_STAND_IN,
                       "its parameters are read directly in forward (or, a transposed conv, it is called with "
                       "output_size): no block can stand in for it")
_ALREADY_A_BLOCK = Refusal(RefusalKind.ALREADY_A_BLOCK, "already a re-param block")
#: How the report and the docs name each block form.
FORM_NAMES: Dict[str, str] = {"batch": "BN", "frozen": "frozen", "none": "BN-free"}


# --------------------------------------------------------------------------------------------
# the place of a norm a block took
# --------------------------------------------------------------------------------------------
class _FoldedSlot:
    """Mixin of :class:`FoldedNorm` / :class:`FoldedNormAct`: what the stock norm was (a copy on the meta
    device: its class and configuration, no memory), whether the stock conv had a bias, and the block
    that took the norm (plain attributes, not sub-modules: the state dict does not change)."""

    def _remember(self, norm: nn.Module, block: Optional[nn.Module], conv_bias: bool) -> None:
        stock = copy.deepcopy(norm).to("meta")
        for name in list(getattr(self, "_modules", {})):  # the tail's children stay live, not copied
            if name in stock._modules:
                stock._modules[name] = None
        self.__dict__["stock_norm"] = stock
        self.__dict__["block"] = block
        self.__dict__["conv_bias"] = bool(conv_bias)

    def restore(self, shift: Tensor) -> Tuple[nn.Module, float]:
        """``(norm, f)``: the stock norm (on ``shift``'s device and dtype, the tail's live children) with
        ``norm(f * y) = y + shift`` in eval mode; ``f = 1`` for an affine norm (weight 1, bias ``shift``,
        running_mean 0, running_var ``1 - eps``), ~1 for a non-affine one
        (:func:`acnet.fuse_load.pass_through_norm_state`)."""
        norm = copy.deepcopy(self.stock_norm).to_empty(device=shift.device)
        norm = norm.to(dtype=shift.dtype)
        entries, factor = pass_through_norm_state("", norm, shift)
        with torch.no_grad():
            for name, value in entries.items():
                tensor = getattr(norm, name)
                if name == "num_batches_tracked":
                    tensor.zero_()
                else:
                    tensor.copy_(value)
        for name, child in self._modules.items():
            setattr(norm, name, child)
        return norm.train(False), factor

    def extra_repr(self) -> str:
        return f"stock={type(self.stock_norm).__name__}: folded into the block before it"


class FoldedNorm(_FoldedSlot, nn.Identity):
    """The place of a BatchNorm / frozen BatchNorm that a block took (an identity while training);
    :func:`acnet_switch_to_deploy` puts the stock norm back here, set to add the block's fused bias."""

    def __init__(self, norm: nn.Module, block: Optional[nn.Module] = None, conv_bias: bool = False) -> None:
        nn.Identity.__init__(self)
        self._remember(norm, block, conv_bias)


class FoldedNormAct(_FoldedSlot, nn.Sequential):
    """The place of a norm + activation (timm's ``BatchNormAct2d``) that a block took: its post-norm
    children under their own names (same state-dict keys); deploy puts the stock class back."""

    def __init__(self, norm: nn.Module, tail: nn.Sequential, block: Optional[nn.Module] = None,
                 conv_bias: bool = False) -> None:
        nn.Sequential.__init__(self, OrderedDict(tail.named_children()))
        self._remember(norm, block, conv_bias)


# --------------------------------------------------------------------------------------------
# acnet_switch_to_deploy
# --------------------------------------------------------------------------------------------
def acnet_switch_to_deploy(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and give it back the stock model's structure, holding the fused weights.

    Each outermost :class:`ReparamBlock` is replaced in its parent, under the same attribute name, by
    ``block.make_deploy_conv()``: a plain ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` holding the
    equivalent kernel and bias (built from the running statistics, hence eval mode first). Where the
    block took a norm (a :class:`FoldedNorm` / :class:`FoldedNormAct` holds its place), the stock norm
    comes back there, set to the identity plus the fused bias (``running_mean = 0``, ``running_var =
    1 - eps``, ``weight = 1``, ``bias = b``), and the conv keeps the stock conv's bias setting (``bias=None``
    for a bias-free conv): conv + BN again, as a host's own fuse (timm ``reparameterize_model``,
    ultralytics ``fuse()``) expects it. A block with a non-identity ``nonlinear`` (DBB) becomes
    ``nn.Sequential(conv, nonlinear)``. A block shared by several parents stays shared. ``model`` itself
    being a block is switched in place with ``switch_to_deploy()``. Returns ``model``.
    """
    model.eval()
    if isinstance(model, ReparamBlock):
        model.switch_to_deploy()
        return model
    slots: Dict[int, _FoldedSlot] = {}
    seen: set = set()
    _find_slots(model, slots, seen)
    slots = {block_id: slot for block_id, slot in slots.items() if block_id in seen}  # its block is in the model
    replacements: Dict[int, nn.Module] = {}
    _replace_blocks(model, replacements, slots)
    logger.debug("acnet_switch_to_deploy: %d block(s) replaced by plain convs", len(replacements))
    return model


def _find_slots(module: nn.Module, slots: Dict[int, "_FoldedSlot"], seen: set) -> None:
    for child in module._modules.values():
        if child is None or id(child) in seen:
            continue
        seen.add(id(child))
        if isinstance(child, _FoldedSlot) and child.block is not None:
            slots[id(child.block)] = child
        if not isinstance(child, ReparamBlock):
            _find_slots(child, slots, seen)


def _replace_blocks(module: nn.Module, replacements: Dict[int, nn.Module], slots: Dict[int, "_FoldedSlot"]) -> None:
    for name, child in list(module._modules.items()):  # not named_children(): it hides repeats
        if child is None:
            continue
        if isinstance(child, ReparamBlock):
            if id(child) not in replacements:
                slot = slots.get(id(child))
                replacements[id(child)], norm = _deploy_module(child, slot)
                if slot is not None:
                    replacements[id(slot)] = norm
            setattr(module, name, replacements[id(child)])
        elif isinstance(child, _FoldedSlot) and child.block is not None and id(child.block) in slots:
            if id(child) not in replacements:  # its block comes later in registration order
                _replace_blocks_of(child.block, replacements, slots)
            if id(child) in replacements:
                setattr(module, name, replacements[id(child)])
        else:
            _replace_blocks(child, replacements, slots)


def _replace_blocks_of(block: ReparamBlock, replacements: Dict[int, nn.Module], slots: Dict[int, "_FoldedSlot"]) -> None:
    slot = slots[id(block)]
    replacements[id(block)], replacements[id(slot)] = _deploy_module(block, slot)


def _deploy_module(block: ReparamBlock, slot: Optional["_FoldedSlot"] = None) -> Tuple[nn.Module, Optional[nn.Module]]:
    """``(the block's deploy module, the stock norm for its slot or None)``."""
    conv = block.make_deploy_conv()
    norm = None
    if slot is not None and conv.bias is not None:
        with torch.no_grad():
            shift = conv.bias.detach().clone()
            norm, factor = slot.restore(shift)
            if factor != 1.0:
                conv.weight.mul_(factor)
            if slot.conv_bias:
                conv.bias.zero_()
        if not slot.conv_bias:
            conv.bias = None  # the stock conv was bias-free: the shift lives in the norm
    nonlinear = getattr(block, "nonlinear", None)
    if isinstance(nonlinear, nn.Module) and not isinstance(nonlinear, nn.Identity):
        deploy: nn.Module = nn.Sequential(conv, nonlinear)
    else:
        deploy = conv
    return deploy.train(False), norm


# --------------------------------------------------------------------------------------------
# the decision per conv
# --------------------------------------------------------------------------------------------
@dataclass
class ConvPlan:
    """What :func:`convert_to_acnet` does with one conv: ``reason is None`` means it is replaced by
    ``block_class(**options)`` and its norm (``norm_name``) by ``tail``; else the :class:`Refusal` (its
    kind, and the text the report prints)."""

    conv_name: str
    conv: nn.Module
    norm_name: Optional[str]
    norm: Optional[nn.Module]
    form: Optional[str]  # the block's norm argument: "batch", "frozen" or "none"
    reason: Optional[Refusal] = None
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
    options = block_option_names(block_class, excluding=_RESERVED_BLOCK_KWARGS)
    unknown = sorted(set(block_kwargs) - set(options))
    if unknown:
        raise ValueError(f"convert_to_acnet: {block_class.__name__} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(options)}")
    kernel = 3  # a geometry every block represents, or the smallest odd one it does (dilated: from 5)
    unsupported = getattr(block_class, "unsupported", None)
    for size in (3, 5, 7) if callable(unsupported) else ():
        try:
            if unsupported(dim=2, kernel_size=(size, size), stride=(1, 1), padding=(size // 2,) * 2, dilation=(1, 1),
                           groups=1, padding_mode="zeros", norm="batch") is None:
                kernel = size
                break
        except TypeError:
            break
    try:
        block_class(4, 4, kernel, padding=kernel // 2, **block_kwargs)
    except ValueError as exc:
        raise ValueError(f"convert_to_acnet: invalid options for {block_class.__name__}: {exc}") from None
    if keep_weights and block_kwargs.get("use_affine", True) is False:
        raise ValueError(
            "convert_to_acnet: keep_weights=True needs affine BNs (use_affine=True) to start the side "
            "branches at zero; drop use_affine=False or keep_weights=True"
        )


def kernel_size_set(kernel_sizes: Optional[Iterable[int]]) -> Optional[frozenset]:
    """``kernel_sizes`` as a non-empty set of ints (``None``: every size, left to the block), or one ``ValueError``."""
    if kernel_sizes is None:
        return None
    try:
        sizes = frozenset(int(k) for k in kernel_sizes)
    except (TypeError, ValueError):
        raise ValueError(f"kernel_sizes must be an iterable of ints (e.g. range(2, 7)), got {kernel_sizes!r}") from None
    if not sizes:
        raise ValueError("kernel_sizes is empty: no conv could be converted (e.g. use range(2, 7))")
    return sizes


def _block_options(block_class: type, conv: nn.Module, norm: Optional[nn.Module], form: str,
                   sizes: Optional[frozenset], bn_free: Optional[bool]) -> Union[Dict[str, Any], Refusal]:
    """Constructor arguments of the block replacing ``conv`` (+ ``norm``) in ``form``, or the reason it cannot.

    The block is asked (``block_class.unsupported(...)``, the block contract) after the forms its
    constructor takes (``transposed``, ``bias``, ``padding_mode``, ``dim`` / ``norm``); a 2-D conv with a
    square geometry gets ints (today's constructor arguments), any other conv tuples of length ``dim``
    plus ``dim=`` and ``norm=`` (passed only when they differ from the defaults 2 and "batch");
    ``transposed=True`` / ``output_padding`` for a transposed conv; the BN-free form ``bias=False`` for a
    bias-free conv (so that it folds back into the stock conv).
    """
    geometry = conv_geometry(conv)
    if isinstance(geometry, Refusal):
        return geometry
    name = block_class.__name__
    kernel = geometry["kernel_size"]
    if sizes is not None and max(kernel) not in sizes:
        return Refusal(RefusalKind.KERNEL_SIZE, f"kernel size {_show(kernel)} not in kernel_sizes {sorted(sizes)}")
    transposed = bool(geometry.get("transposed"))
    if transposed and not takes_arguments(block_class, "transposed", "output_padding"):
        return Refusal(RefusalKind.NO_FORM, f"{name} has no transposed form (no transposed/output_padding arguments)")
    if norm is not None:
        if norm_features(norm) != geometry["out_channels"]:
            return Refusal(RefusalKind.NORM_MISMATCH, f"its norm has {norm_features(norm)} features for "
                                                      f"{geometry['out_channels']} conv outputs")
        if form == "batch" and (not norm.track_running_stats or norm.running_mean is None):
            return Refusal(RefusalKind.NORM_MISMATCH, "its BN has no running statistics (track_running_stats=False)")
    bias = True
    if form == "none" and conv.bias is None:
        if takes_arguments(block_class, "bias"):
            bias = False
        elif bn_free is not True:
            return Refusal(RefusalKind.NO_FORM,
                           f"{name} has no bias-free BN-free form (no bias argument): its fused bias could not "
                           "fold back into this bias-free conv (bn_free=True converts it anyway, for "
                           "acnet_switch_to_deploy)")
    if not takes_arguments(block_class, "padding_mode"):
        if geometry["padding_mode"] != "zeros":
            return Refusal(RefusalKind.NO_FORM,
                           f"{name} supports only padding_mode='zeros', not {geometry['padding_mode']!r}")
        del geometry["padding_mode"]
    reason = block_class.unsupported(**geometry_rule_arguments(geometry, form, bias))
    if reason:
        return Refusal(RefusalKind.NO_FORM, reason)
    if (geometry["dim"] != 2 or form != "batch") and not takes_arguments(block_class, "dim", "norm"):
        return Refusal(RefusalKind.NO_FORM, f"{name} takes no dim/norm arguments")
    options = constructor_geometry(geometry, form)
    if not bias:
        options["bias"] = False
    if form == "batch":
        options.update(bn_eps=norm.eps, bn_momentum=norm.momentum)
    elif form == "frozen":
        options["bn_eps"] = float(norm.eps)
    return options


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


def plan_conversion(model: nn.Module, block_class: type, sizes: Optional[frozenset], *,
                    bn_free: Optional[bool] = None, block_kwargs: Optional[Dict[str, Any]] = None) -> List[ConvPlan]:
    """One :class:`ConvPlan` per conv (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) of ``model``
    outside re-param blocks, in registration order.

    The form per conv: a conv paired with a norm (:func:`find_conv_bn_pairs`) gets the norm's form
    (``"batch"`` / ``"frozen"``); if that form is refused for the norm's sake (a BN subclass acnet cannot
    verify, a BN without running statistics) or the conv has no pair, the BN-free form ``"none"`` (the
    conv alone, whatever follows stays) -- unless ``bn_free=False``. ``sizes=None``: every kernel size
    the block has a form for. Read only: nothing in ``model`` changes (blocks are built, on the meta
    device, only to check that the options fit the geometry).
    """
    block_kwargs = dict(block_kwargs or {})
    pairs = {p.conv_name: p for p in find_conv_bn_pairs(model, bn_free=bn_free is not False)}
    plans = []
    for name, conv in modules_outside_blocks(model):
        if not isinstance(conv, ANY_CONV_TYPES):
            continue
        pair = pairs.get(name)
        if pair is None:
            geometry = conv_geometry(conv)  # a conv subclass with its own forward: say so first
            reason = geometry if isinstance(geometry, Refusal) else _NOT_PAIRED if bn_free is False else _NO_STAND_IN
            plans.append(ConvPlan(name, conv, None, None, None, reason))
            continue
        norm = model.get_submodule(pair.bn_name) if pair.bn_name is not None else None
        candidates = [(pair.bn_name, norm, norm_kind(norm))] if norm is not None else []
        if norm is None or bn_free is not False:
            candidates.append((None, None, "none"))
        first_reason: Optional[Refusal] = None
        plan = None
        for norm_name, candidate_norm, form in candidates:
            plan = ConvPlan(name, conv, norm_name, candidate_norm, form)
            reason = _plan_block(plan, block_class, sizes, bn_free, block_kwargs)
            if reason is None:
                break
            first_reason = first_reason or reason
        else:
            plan = ConvPlan(name, conv, pair.bn_name, norm, None, first_reason)
        plans.append(plan)
    return plans


def _plan_block(plan: ConvPlan, block_class: type, sizes: Optional[frozenset], bn_free: Optional[bool],
                block_kwargs: Dict[str, Any]) -> Optional[Refusal]:
    """Fill ``plan``'s options, tail and block size; the reason when the block cannot take it in ``plan.form``."""
    tail: Union[nn.Module, Refusal] = nn.Identity() if plan.norm is None else bn_tail(plan.norm)
    if isinstance(tail, Refusal):
        return tail
    options = _block_options(block_class, plan.conv, plan.norm, plan.form, sizes, bn_free)
    if isinstance(options, Refusal):
        return options
    try:
        block = _build_for_inspection(block_class, {**options, **block_kwargs})
    except ValueError as exc:
        return Refusal(RefusalKind.BLOCK_REFUSES, f"{block_class.__name__} cannot represent it: {exc}")
    plan.options, plan.tail = {**options, **block_kwargs}, tail
    plan.block_params = sum(p.numel() for p in block.parameters())
    return None


# --------------------------------------------------------------------------------------------
# convert_to_acnet
# --------------------------------------------------------------------------------------------
def convert_to_acnet(
    model: nn.Module,
    block_type: str = "acb",
    kernel_sizes: Optional[Iterable[int]] = None,
    *,
    keep_weights: bool = False,
    bn_free: Optional[bool] = None,
    **block_kwargs: Any,
) -> nn.Module:
    """Replace every conv of ``model`` that a ``block_type`` block has a form for by that block, in place.

    With no option, each ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d`` gets the form that fits what
    it feeds (:func:`find_conv_bn_pairs`):

    * only a ``BatchNorm{1,2,3}d`` / ``SyncBatchNorm`` -> ``norm="batch"``: the block takes the conv and
      the BN, a :class:`FoldedNorm` keeps the BN's place (for a BN subclass that also applies an
      activation, timm's ``BatchNormAct2d``, a :class:`FoldedNormAct` applies it; other BN subclasses
      cannot be verified and their conv takes the BN-free form);
    * only a torchvision ``FrozenBatchNorm2d`` -> ``norm="frozen"`` (no batch statistics anywhere);
    * anything else -- GroupNorm, LayerNorm, InstanceNorm (they cannot absorb a conv), an activation,
      an add, nothing -> ``norm="none"``: the block replaces the conv alone (a bias exactly when the conv
      has one, so it folds back into the stock conv).

    A conv converts when the block has a form for its geometry (``block_class.unsupported``: e.g. ACB
    needs two axes of size > 1, so 1x1 and 1-D convs stay; transposed convs where the maths allows),
    its padding is symmetric (``'same'``/``'valid'`` resolved) and a batch norm tracks running
    statistics over the conv's outputs. Other convs are left as they are (logged at debug level;
    :func:`acnet.conversion_report` lists every conv with its form or reason and the option that would
    change it); a ``UserWarning`` counts the reasons when no conv is replaced.

    Overrides: ``kernel_sizes`` (default ``None``: every size the block has a form for) restricts the
    convs by their largest kernel side, e.g. ``range(2, 7)`` keeps 1x1 and 7x7 convs (the papers'
    rule); ``bn_free=False`` converts only conv + norm pairs (the form choice of earlier versions'
    defaults); ``bn_free=True`` also converts a bias-free conv with a block that has no bias-free form.

    The conv is replaced by ``block_class(in, out, K, stride, padding, dilation, groups,
    [padding_mode,] [dim=, norm=, bias=False, transposed=True, output_padding=,] bn_eps=norm.eps,
    bn_momentum=norm.momentum, **block_kwargs)`` on the conv's device and dtype (frozen if the conv was
    frozen). ``block_kwargs`` are the block's own options (``gamma_init``, ``use_affine``,
    ``reduce_gamma``, ``internal_channels_1x1_3x3``, ``bn_momentum``, ...); the geometry, form and
    ``bn_eps`` always come from the model, and ``nonlinear`` is refused (it would change the function,
    and the result could no longer be folded back into the stock model).

    ``keep_weights=False`` (training from scratch, as in the papers): blocks are freshly
    initialised by their own rules. ``keep_weights=True`` (fine-tuning a trained model): each block
    starts as exactly the conv (+ norm) it replaces -- ``block.load_main_branch(conv.weight, conv.bias,
    norm)``: the main branch takes the pretrained conv and norm, every other branch contributes zero --
    so the eval-mode outputs do not change.

    Returns ``model`` (converted in place; the model then trains as usual). The trained model folds
    back into the stock class with :func:`acnet_fuse_and_load`, or deploys with
    :func:`acnet_switch_to_deploy` (the stock module tree again).
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
            _set_submodule(model, plan.norm_name, _folded(plan, block))
        converted += 1
    present = sum(1 for _, m in modules_outside_blocks(model) if isinstance(m, ReparamBlock)) - converted
    if present:
        kept[_ALREADY_A_BLOCK] = present
    logger.info("convert_to_acnet: %d conv(s) replaced by %s, %d conv(s) / block(s) left as they are",
                converted, block_class.__name__, sum(kept.values()))
    if converted == 0:
        reasons = ("; ".join(f"{n} conv(s): {reason}" for reason, n in kept.most_common())
                   or "the model has no nn.Conv1d/2d/3d / nn.ConvTranspose1d/2d/3d")
        warnings.warn(f"convert_to_acnet: no conv of {type(model).__name__} was replaced by {block_class.__name__} "
                      f"({reasons}); acnet.conversion_report(model, {block_type!r}) lists every conv "
                      "with its reason and the option that would convert it", stacklevel=2)
    return model


def _folded(plan: ConvPlan, block: nn.Module) -> nn.Module:
    """What takes the place of the norm a block took: a :class:`FoldedNorm`, or a :class:`FoldedNormAct`
    holding the norm's post-norm children."""
    conv_bias = plan.conv.bias is not None
    if isinstance(plan.tail, nn.Sequential):
        return FoldedNormAct(plan.norm, plan.tail, block, conv_bias)
    return FoldedNorm(plan.norm, block, conv_bias)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


@torch.no_grad()
def copy_pair_into_block(conv: nn.Module, bn: Optional[nn.Module], block: ReparamBlock) -> None:
    """``block`` computes ``bn(conv(x))`` in eval mode (``bn=None``: ``conv(x)``): the keep_weights step of
    :func:`convert_to_acnet` (``block.load_main_branch``), for a caller that holds the pair as modules."""
    block.load_main_branch(conv.weight, conv.bias, bn)
