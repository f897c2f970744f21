"""Whole-model re-parameterization: plug blocks into any model, switch a model to deploy form, and
fold training-time weights back into the unmodified baseline architecture.

Three operations, all working on arbitrary ``nn.Module`` trees:

* :func:`convert_to_acnet` finds every conv-BN pair (a KxK ``nn.Conv2d`` whose output goes only
  into a ``BatchNorm2d``) and replaces the conv by an ACB/DBB/OREPA block (:mod:`acnet.registry`)
  and the BN by ``nn.Identity``.
* :func:`acnet_switch_to_deploy` replaces every :class:`~acnet.base.ReparamBlock` by the one
  ``nn.Conv2d(bias=True)`` it equals in eval mode.
* :func:`acnet_fuse_and_load` loads training-time weights into the baseline model (the class the
  training model was converted from, e.g. a fresh ``torchvision.models.resnet18()``): each block's
  equivalent kernel goes into the baseline conv, its bias into the BN that follows it.

Pairs are found by dataflow (``torch.fx``, blocks kept opaque) when the model traces; otherwise by
the registration order of siblings (a conv registered immediately before a BN, as in torchvision's
``conv1``/``bn1`` and ``Sequential(conv, bn, relu)``). The same rule runs in conversion and in
fuse-and-load, so both see the same pairs.
"""
from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .base import ReparamBlock
from .registry import BLOCK_REGISTRY, get_block_type
from .weights import PathLike, WeightsError, as_state_dict, load_state_dict_file

__all__ = [
    "BLOCK_CLASSES",
    "ConvBNPair",
    "acnet_switch_to_deploy",
    "convert_to_acnet",
    "acnet_fuse_and_load",
    "find_conv_bn_pairs",
]

logger = logging.getLogger(__name__)

#: Block types :func:`convert_to_acnet` plugs in, by name (from :mod:`acnet.registry`).
BLOCK_CLASSES: Dict[str, type] = {name: t.block_class for name, t in BLOCK_REGISTRY.items() if not t.plain}

BatchNormTypes = (nn.BatchNorm2d, nn.SyncBatchNorm)
#: BatchNorm2d subclasses whose forward is verified to be ``tail(batch_norm(x))`` (the parent's
#: batch-norm, then the named children in this order), by exact class: the block takes the conv and the
#: BN, ``nn.Sequential`` of these children (same names, so same state-dict keys) takes the BN's place.
#: timm's BatchNormAct2d (timm >= 0.9, checked on 1.0): F.batch_norm as nn.BatchNorm2d, then drop, act.
NORM_ACT_CLASSES: Dict[str, Tuple[str, ...]] = {
    "timm.layers.norm_act.BatchNormAct2d": ("drop", "act"),
}
# Constructor arguments taken from the model, never from the caller's block_kwargs.
_RESERVED_BLOCK_KWARGS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
    "padding_mode", "deploy", "bn_eps",
)


@dataclass(frozen=True)
class ConvBNPair:
    """A conv whose output feeds only a BN: qualified module names in the model."""

    conv_name: str
    bn_name: str


# --------------------------------------------------------------------------------------------
# acnet_switch_to_deploy
# --------------------------------------------------------------------------------------------
def acnet_switch_to_deploy(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and replace every re-parameterizable block by its deploy conv.

    Each outermost :class:`ReparamBlock` is replaced in its parent, under the same attribute name,
    by ``block.make_deploy_conv()``: a plain ``nn.Conv2d(bias=True)`` holding the equivalent kernel
    and bias (built from the running statistics, hence eval mode first). A block with a non-identity
    ``nonlinear`` (DBB) becomes ``nn.Sequential(conv, nonlinear)``. A deploy model's module tree is
    therefore the same whatever block type trained it. A block shared by several parents stays
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
# finding conv-BN pairs
# --------------------------------------------------------------------------------------------
def find_conv_bn_pairs(model: nn.Module) -> List[ConvBNPair]:
    """Every ``nn.Conv2d`` whose output goes only into one ``BatchNorm2d``, outside re-param blocks.

    By dataflow when ``torch.fx`` can trace the model: every call of the conv must feed exactly
    one node, a call of the same BN, whose only input it is; the BN must be called on nothing else,
    and neither module's parameters may be read directly in ``forward``. When tracing fails
    (data-dependent control flow), by registration order: a conv child registered immediately
    before a BN child of the same parent. Pairs are returned in module-registration order.
    """
    try:
        pairs = _pairs_by_dataflow(model)
        method = "dataflow (torch.fx)"
    except Exception as exc:  # any tracing failure means: fall back to registration order
        logger.debug("find_conv_bn_pairs: torch.fx cannot trace %s (%s: %s); using registration order",
                     type(model).__name__, type(exc).__name__, exc)
        pairs = _pairs_by_registration(model)
        method = "registration order"
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    pairs.sort(key=lambda p: order.get(p.conv_name, len(order)))
    logger.debug("find_conv_bn_pairs: %d conv-BN pair(s) found by %s", len(pairs), method)
    return pairs


class _BlockOpaqueTracer(torch.fx.Tracer):
    """fx tracer that keeps re-param blocks, BN subclasses (e.g. timm's BatchNormAct2d) and torch.nn
    layers as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (ReparamBlock, *BatchNormTypes)) or super().is_leaf_module(m, module_qualified_name)


def _pairs_by_dataflow(model: nn.Module) -> List[ConvBNPair]:
    graph = _BlockOpaqueTracer().trace(model)
    modules = dict(model.named_modules())
    conv_sites: Dict[str, List[torch.fx.Node]] = {}
    bn_sites: Dict[str, List[torch.fx.Node]] = {}
    attr_reads: List[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            module = modules.get(node.target)
            if isinstance(module, nn.Conv2d):
                conv_sites.setdefault(node.target, []).append(node)
            elif isinstance(module, BatchNormTypes):
                bn_sites.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            attr_reads.append(str(node.target))

    def read_directly(name: str) -> bool:
        return any(t == name or t.startswith(name + ".") for t in attr_reads)

    pairs = []
    for conv_name, sites in conv_sites.items():
        bn_names = set()
        for site in sites:
            users = list(site.users)
            if len(users) != 1:
                break
            user = users[0]
            if not (user.op == "call_module" and user.target in bn_sites and user.args[:1] == (site,)
                    and len(user.args) == 1 and not user.kwargs):
                break
            bn_names.add(user.target)
        else:
            if len(bn_names) != 1:
                continue
            bn_name = bn_names.pop()
            bn_fed_by_conv_only = all(
                n.args and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_module"
                and n.args[0].target == conv_name for n in bn_sites[bn_name]
            )
            if bn_fed_by_conv_only and not read_directly(conv_name) and not read_directly(bn_name):
                pairs.append(ConvBNPair(conv_name, bn_name))
    return pairs


def _pairs_by_registration(model: nn.Module) -> List[ConvBNPair]:
    pairs = []

    def visit(module: nn.Module, prefix: str) -> None:
        children = list(module.named_children())
        for (name, child), (next_name, next_child) in zip(children, children[1:]):
            if isinstance(child, nn.Conv2d) and isinstance(next_child, BatchNormTypes):
                pairs.append(ConvBNPair(prefix + name, prefix + next_name))
        for name, child in children:
            if not isinstance(child, ReparamBlock):
                visit(child, prefix + name + ".")

    if not isinstance(model, ReparamBlock):
        visit(model, "")
    return pairs


# --------------------------------------------------------------------------------------------
# convert_to_acnet
# --------------------------------------------------------------------------------------------
def convert_to_acnet(
    model: nn.Module,
    block_type: str = "acb",
    kernel_sizes: Iterable[int] = range(2, 7),
    *,
    keep_weights: bool = False,
    **block_kwargs: Any,
) -> nn.Module:
    """Replace each eligible conv-BN pair of ``model`` by a training-time block, in place.

    A pair (see :func:`find_conv_bn_pairs`) is eligible when the conv is a plain ``nn.Conv2d``
    with a square ``K x K`` kernel, ``K in kernel_sizes`` (default ``2..6``: the 7x7 ImageNet
    stem and 1x1 convs stay), square stride and dilation, symmetric padding (``'same'``/``'valid'``
    resolved), a ``padding_mode`` the block supports, and the BN tracks running statistics over
    the conv's output channels; and when the block accepts that geometry (e.g. ACB needs an odd
    ``K >= 3``). Other convs are left as they are (logged at debug level with the reason); a
    ``UserWarning`` counts the reasons when no conv is replaced, and names refused BN subclasses.

    The conv is replaced by ``BLOCK_CLASSES[block_type](in, out, K, stride, padding, dilation,
    groups, [padding_mode,] bn_eps=bn.eps, bn_momentum=bn.momentum, **block_kwargs)`` on the conv's
    device and dtype (frozen if the conv was frozen), the BN by ``nn.Identity`` -- or, for a BN
    subclass that also applies an activation (timm's ``BatchNormAct2d``), by what it applies after
    normalising (:func:`bn_tail`; other BN subclasses are refused). ``block_kwargs``
    are the block's own options (``gamma_init``, ``use_affine``, ``reduce_gamma``,
    ``internal_channels_1x1_3x3``, ``bn_momentum``, ...); the geometry and ``bn_eps`` always come
    from the model, and ``nonlinear`` is refused (it would change the function, and the result
    could no longer be folded back into the baseline model).

    ``keep_weights=False`` (training from scratch, as in the papers): blocks are freshly
    initialised by their own rules. ``keep_weights=True`` (fine-tuning a trained model): each block
    starts as exactly the pair it replaces -- ``single_init()`` (other branches at zero), the main
    KxK branch takes the conv kernel and the BN's affine parameters and running statistics, a conv
    bias ``c`` folded as ``running_mean - c`` -- so the eval-mode outputs do not change.

    Returns ``model`` (converted in place; the model then trains as usual).
    """
    block_class = _block_class(block_type)
    sizes = _kernel_size_set(kernel_sizes)
    reserved = sorted(set(block_kwargs) & set(_RESERVED_BLOCK_KWARGS))
    if reserved:
        raise ValueError(
            f"convert_to_acnet: {', '.join(reserved)} cannot be given: the geometry and bn_eps of each "
            "block are taken from the conv-BN pair it replaces (and blocks are created in training form)"
        )
    if block_kwargs.get("nonlinear") is not None:
        raise ValueError(
            "convert_to_acnet: 'nonlinear' is not supported: the model already applies whatever "
            "follows each BN, a nonlinearity inside the block would change the function and could "
            "not be folded back into the baseline model"
        )
    block_kwargs.pop("nonlinear", None)
    _check_block_options(block_class, block_kwargs)
    if keep_weights and block_kwargs.get("use_affine", True) is False:
        raise ValueError(
            "convert_to_acnet: keep_weights=True needs affine BNs (use_affine=True) to start the side "
            "branches at zero; drop use_affine=False or keep_weights=True"
        )

    pairs = find_conv_bn_pairs(model)
    converted, kept = 0, Counter()
    for pair in pairs:
        conv = model.get_submodule(pair.conv_name)
        bn = model.get_submodule(pair.bn_name)
        tail = bn_tail(bn)
        geometry = tail if isinstance(tail, str) else _block_geometry(conv, bn, sizes, block_class)
        if isinstance(geometry, str):
            logger.debug("convert_to_acnet: keeping %s as it is: %s", pair.conv_name, geometry)
            kept[geometry] += 1
            continue
        try:
            block = block_class(**geometry, bn_eps=bn.eps, **{"bn_momentum": bn.momentum, **block_kwargs})
        except ValueError as exc:
            logger.debug("convert_to_acnet: keeping %s as it is: %s cannot represent it (%s)",
                         pair.conv_name, block_class.__name__, exc)
            kept[f"{block_class.__name__} cannot represent its geometry (see the debug log)"] += 1
            continue
        block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        if keep_weights:
            _copy_pair_into_block(conv, bn, block)
        if not conv.weight.requires_grad:
            block.requires_grad_(False)
        block.train(conv.training)
        _set_submodule(model, pair.conv_name, block)
        _set_submodule(model, pair.bn_name, tail)
        converted += 1
    paired = {p.conv_name for p in pairs}
    unpaired = sum(1 for name, m in _modules_outside_blocks(model) if isinstance(m, nn.Conv2d) and name not in paired)
    if unpaired:
        kept["its output does not go only into one BatchNorm2d"] = unpaired
    present = sum(1 for _, m in _modules_outside_blocks(model) if isinstance(m, ReparamBlock))
    if present:
        kept["already a re-param block"] = present
    logger.info("convert_to_acnet: %d conv-BN pair(s) replaced by %s, %d conv(s) / block(s) left as they are",
                converted, block_class.__name__, sum(kept.values()))
    refused_bns = {reason: n for reason, n in kept.items() if reason.startswith(_UNVERIFIED_BN)}
    if converted == 0:
        reasons = "; ".join(f"{n} conv(s): {reason}" for reason, n in kept.most_common()) or "the model has no nn.Conv2d"
        warnings.warn(f"convert_to_acnet: no conv of {type(model).__name__} was replaced by {block_class.__name__} "
                      f"({reasons})", stacklevel=2)
    elif refused_bns:
        warnings.warn("convert_to_acnet: " + "; ".join(f"{n} conv(s) kept: {r}" for r, n in refused_bns.items()),
                      stacklevel=2)
    return model


_UNVERIFIED_BN = "its BN is a"


def bn_tail(bn: nn.Module) -> Union[nn.Module, str]:
    """What stays in the BN's place when a block takes the conv and ``bn``, or why ``bn`` cannot be taken.

    ``nn.Identity`` for ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm``; for a class of
    :data:`NORM_ACT_CLASSES`, ``nn.Sequential`` of its post-norm children under their own names
    (so the trained model computes what the BN subclass computes, with the same state-dict keys);
    any other ``BatchNorm2d`` subclass (its forward may differ from a BN's) is refused.
    """
    cls = type(bn)
    if cls in BatchNormTypes:
        return nn.Identity()
    children = NORM_ACT_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
    own = {name for name, _ in bn.named_parameters(recurse=False)} | {name for name, _ in bn.named_buffers(recurse=False)}
    if children is None or set(bn._modules) != set(children) or not own <= _BN_TENSORS:
        return (f"{_UNVERIFIED_BN} {cls.__module__}.{cls.__qualname__}, a BatchNorm2d subclass whose forward "
                "acnet cannot verify (supported: nn.BatchNorm2d, nn.SyncBatchNorm, "
                f"{', '.join(NORM_ACT_CLASSES)})")
    return nn.Sequential(OrderedDict((name, bn._modules[name]) for name in children))


_BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _modules_outside_blocks(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """``named_modules()`` without the insides of re-param blocks."""
    def visit(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            yield prefix + name, child
            if not isinstance(child, ReparamBlock):
                yield from visit(child, prefix + name + ".")
    yield from visit(model, "")


def _block_class(block_type: str) -> type:
    """The class :func:`convert_to_acnet` plugs in for ``block_type`` (a non-plain registry entry)."""
    key = block_type.lower() if isinstance(block_type, str) else block_type
    pluggable = {name: t.block_class for name, t in BLOCK_REGISTRY.items() if not t.plain}
    if key not in pluggable:
        raise ValueError(
            f"unknown block_type {block_type!r}; valid block types: {', '.join(map(repr, pluggable))}"
        )
    return pluggable[key]


def _check_block_options(block_class: type, block_kwargs: Dict[str, Any]) -> None:
    """Fail once, clearly, on options the block does not take or rejects (not silently per conv)."""
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


def _kernel_size_set(kernel_sizes: Iterable[int]) -> frozenset:
    try:
        sizes = frozenset(int(k) for k in kernel_sizes)
    except (TypeError, ValueError):
        raise ValueError(f"kernel_sizes must be an iterable of ints (e.g. range(2, 7)), got {kernel_sizes!r}") from None
    if not sizes:
        raise ValueError("kernel_sizes is empty: no conv could be converted (e.g. use range(2, 7))")
    return sizes


def _square(value: Any) -> Optional[int]:
    """``v`` for ``v`` or ``(v, v)``; ``None`` for a non-square tuple."""
    if isinstance(value, int):
        return value
    values = tuple(value)
    return values[0] if len(set(values)) == 1 else None


def _conv_geometry(conv: nn.Conv2d) -> Union[Dict[str, Any], str]:
    """``in/out_channels, kernel_size, stride, padding, dilation, groups, padding_mode`` as ints, or why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d (its forward may differ)"
    kernel, stride, dilation = _square(conv.kernel_size), _square(conv.stride), _square(conv.dilation)
    if kernel is None:
        return f"non-square kernel {tuple(conv.kernel_size)}"
    if stride is None:
        return f"non-square stride {tuple(conv.stride)}"
    if dilation is None:
        return f"non-square dilation {tuple(conv.dilation)}"
    if conv.padding == "valid":
        padding: Optional[int] = 0
    elif conv.padding == "same":
        total = dilation * (kernel - 1)
        padding = total // 2 if total % 2 == 0 else None
        if padding is None:
            return "padding='same' with an even total padding is asymmetric"
    else:
        padding = _square(conv.padding)
        if padding is None:
            return f"asymmetric padding {tuple(conv.padding)}"
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=kernel,
                stride=stride, padding=padding, dilation=dilation, groups=conv.groups,
                padding_mode=conv.padding_mode)


def _accepts(block_class: type, argument: str) -> bool:
    return argument in inspect.signature(block_class).parameters


def _block_geometry(conv: nn.Module, bn: nn.Module, sizes: frozenset, block_class: type) -> Union[Dict[str, Any], str]:
    """Constructor geometry for the block replacing ``conv`` + ``bn``, or the reason it cannot."""
    geometry = _conv_geometry(conv)
    if isinstance(geometry, str):
        return geometry
    if geometry["kernel_size"] not in sizes:
        return f"kernel size {geometry['kernel_size']} not in kernel_sizes {sorted(sizes)}"
    if not bn.track_running_stats or bn.running_mean is None:
        return "its BN has no running statistics (track_running_stats=False)"
    if bn.num_features != geometry["out_channels"]:
        return f"its BN has {bn.num_features} features for {geometry['out_channels']} conv outputs"
    if not _accepts(block_class, "padding_mode"):
        if geometry["padding_mode"] != "zeros":
            return f"{block_class.__name__} supports only padding_mode='zeros', not {geometry['padding_mode']!r}"
        del geometry["padding_mode"]
    return geometry


def _main_branch(block: nn.Module) -> Tuple[Tensor, nn.BatchNorm2d]:
    """The block's KxK weight and its BN (the branch that equals the original conv-BN pair)."""
    for spec in BLOCK_REGISTRY.values():
        if type(block) is spec.block_class:
            return spec.main_branch(block)
    raise TypeError(f"no main branch known for {type(block).__name__}")


@torch.no_grad()
def _copy_pair_into_block(conv: nn.Conv2d, bn: nn.Module, block: nn.Module) -> None:
    """Make ``block`` compute ``bn(conv(x))`` in eval mode: main branch = the pair, others zero."""
    block.single_init()
    main_weight, main_bn = _main_branch(block)
    main_weight.copy_(conv.weight)
    main_bn.weight.copy_(bn.weight if bn.affine else torch.ones_like(main_bn.weight))
    main_bn.bias.copy_(bn.bias if bn.affine else torch.zeros_like(main_bn.bias))
    mean = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    main_bn.running_mean.copy_(mean)
    main_bn.running_var.copy_(bn.running_var)
    if bn.num_batches_tracked is not None and main_bn.num_batches_tracked is not None:
        main_bn.num_batches_tracked.copy_(bn.num_batches_tracked)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


# --------------------------------------------------------------------------------------------
# acnet_fuse_and_load
# --------------------------------------------------------------------------------------------
def _ready_kernel_holders() -> Tuple[str, ...]:
    """Sub-modules that hold a kernel stored ready: the deployed blocks' fused convs, then a wrapped conv."""
    return tuple(dict.fromkeys(t.deploy_conv_name for t in BLOCK_REGISTRY.values())) + ("conv",)


def _block_signatures() -> Tuple[Tuple[str, str], ...]:
    """How a block stored under a conv's name is recognised in a state dict: ``(key, kind)`` in order.

    The multi-branch blocks first (an OREPA block also holds ``bn.running_mean``, the plain unit's key).
    """
    return (tuple((t.signature, name) for name, t in BLOCK_REGISTRY.items() if not t.plain)
            + tuple((t.signature, name) for name, t in BLOCK_REGISTRY.items() if t.plain)
            + tuple((f"{holder}.weight", "deployed") for holder in _ready_kernel_holders()[:-1])
            + (("conv.weight", "wrapped conv"),))  # a block holding one plain conv (e.g. a bias-free conv unit)


def acnet_fuse_and_load(
    base_model: nn.Module,
    weights: Union[Mapping[str, Tensor], nn.Module, PathLike],
    *,
    block_type: Optional[str] = None,
    **block_kwargs: Any,
) -> nn.Module:
    """Load training-time weights into the unmodified baseline model; same eval-mode outputs.

    ``weights``: a state dict, a module (its state dict), or a file (``.pth``/``.pt`` checkpoint or
    hdf5, see :func:`acnet.load_state_dict_file`); a ``module.`` prefix is stripped.

    For every ``nn.Conv2d`` named ``c`` in ``base_model`` whose weights hold a block under ``c.``
    instead of ``c.weight`` (an ACB, a DBB, an OREPA block, a ``ConvBN``: any type of
    :mod:`acnet.registry`; or a kernel stored ready, as an already deployed ``fused_conv`` / ``dbb_reparam`` / ``orepa_reparam`` or a block wrapping one plain ``conv``), the block is rebuilt with that conv's geometry and the eps of the BN after it
    (inferred: ACB ``use_affine`` from the keys, DBB / OREPA internal channels from the 1x1-KxK branch's
    shapes; ``block_kwargs`` override, ``block_type`` asserts the kind), loaded strictly, and its
    equivalent ``(K, b)`` is computed in float64 and written as:

    * ``c.weight = K``, and ``c.bias = b`` when the conv has a bias;
    * when ``c`` feeds a BN ``n`` whose entries the weights lack (the BN was replaced by
      ``nn.Identity``), ``n`` becomes a pass-through that adds the bias (when ``c`` has none):
      ``running_var = 1 - eps``, ``running_mean = 0``, ``weight = sqrt(running_var + eps)``,
      ``bias = b`` (see ``_pass_through_bn_state`` for non-affine BNs);
    * when the weights hold ``n.*`` (a block followed by a BN that was kept), they load with
      ``running_mean - b`` and ``c`` gets ``K`` alone.

    All exact; float32 rounding adds ~1e-7 relative.

    Every other entry loads by name. Missing, unexpected or mis-shaped entries, and blocks that do
    not fit the baseline conv, raise one :class:`acnet.WeightsError` listing them. The model is put
    in eval mode (its BNs hold folded statistics) and returned.
    """
    if block_type is not None and block_type.lower() not in BLOCK_REGISTRY:
        raise ValueError(
            f"unknown block_type {block_type!r}; valid block types: {', '.join(map(repr, BLOCK_REGISTRY))}"
        )
    if isinstance(weights, (Mapping, nn.Module)):
        source = "the given state dict"
        state = as_state_dict(weights, source=source)
    else:
        source = f"'{weights}'"
        state = load_state_dict_file(weights)
    state = _own_names(base_model, state, source)
    target = base_model.state_dict()
    modules = dict(base_model.named_modules())
    bn_after = {p.conv_name: p.bn_name for p in find_conv_bn_pairs(base_model)}

    values: Dict[str, Tensor] = {}
    consumed: set = set()
    problems: List[str] = []
    for conv_name, conv in modules.items():
        prefix = f"{conv_name}." if conv_name else ""
        if not isinstance(conv, nn.Conv2d) or f"{prefix}weight" in state:
            continue
        prefix = _block_prefix(modules, conv_name, state)
        kind = _stored_block_kind(state, prefix)
        if kind is None:
            continue
        if block_type is not None and kind in BLOCK_REGISTRY and kind != block_type.lower():
            problems.append(f"'{conv_name}' holds a {kind} block, not the requested {block_type}")
            continue
        sub_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        consumed.update(prefix + k for k in sub_state)
        bn_name = bn_after.get(conv_name)
        if bn_name is None and prefix != f"{conv_name}." and isinstance(modules.get(prefix + "bn"), nn.BatchNorm2d):
            bn_name = prefix + "bn"  # the ConvBN unit's own BN (units are not traced into)
        bn = modules[bn_name] if bn_name is not None else None
        try:
            kernel, bias = _equivalent_kernel_bias(kind, sub_state, conv, bn, block_kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            problems.append(f"the {kind} weights under '{conv_name}' do not fit its conv "
                            f"{_describe_conv(conv)}: {_first_line(exc)}")
            continue
        problems.extend(_place_kernel_bias(conv_name, conv, bn_name, bn, kernel, bias, state, values, consumed))

    for key in target:
        if key not in values and key in state:
            values[key] = state[key]
            consumed.add(key)
    for key in target:  # BN counters absent from older files default as torch's own loader does
        if key not in values and key.endswith("num_batches_tracked"):
            values[key] = target[key]

    _raise_on_mismatch(base_model, source, target, state, values, consumed, problems)
    ordered = OrderedDict((key, values[key]) for key in target)
    ordered._metadata = getattr(target, "_metadata", None)  # module versions some loaders check
    base_model.load_state_dict(ordered, strict=True)
    return base_model.eval()


def _own_names(base_model: nn.Module, state: Dict[str, Tensor], source: str) -> Dict[str, Tensor]:
    """``state`` under the model's own names when the model names foreign schemes and one matches.

    A model may carry ``weight_naming_schemes()`` (e.g. the framework's architectures: the original
    ACNet / DBB repositories' names, see :mod:`acnet.schemes`); a state dict matching one of them
    exactly (names, then shapes) is translated, anything else is used as it is.
    """
    from .schemes import recognise

    schemes_of = getattr(base_model, "weight_naming_schemes", None)
    if not callable(schemes_of):
        return state
    scheme = recognise(state, schemes_of(), source)
    return state if scheme is None else scheme.to_ours(state)


def _block_prefix(modules: Mapping[str, nn.Module], conv_name: str, state: Mapping[str, Tensor]) -> str:
    """Where ``state`` holds the block that replaces conv ``conv_name``: under the conv's own name, or,
    for the ``conv`` of a plain unit (a ``ConvBN`` of a framework's base model), under the unit's name."""
    prefix = f"{conv_name}." if conv_name else ""
    parent, _, leaf = conv_name.rpartition(".")
    unit = modules.get(parent)
    if (leaf == "conv" and _stored_block_kind(state, prefix) is None and isinstance(unit, ReparamBlock)
            and not isinstance(unit, tuple(BLOCK_CLASSES.values()))):
        unit_prefix = f"{parent}." if parent else ""
        if _stored_block_kind(state, unit_prefix) in ("acb", "dbb", "deployed"):
            return unit_prefix
    return prefix


def _stored_block_kind(state: Mapping[str, Tensor], prefix: str) -> Optional[str]:
    for suffix, kind in _block_signatures():
        if prefix + suffix in state:
            return kind
    return None


def _describe_conv(conv: nn.Conv2d) -> str:
    return (f"(in={conv.in_channels}, out={conv.out_channels}, kernel={tuple(conv.kernel_size)}, "
            f"stride={tuple(conv.stride)}, padding={conv.padding}, groups={conv.groups})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split())[:400] if text else type(exc).__name__


@torch.no_grad()
def _equivalent_kernel_bias(kind: str, sub_state: Dict[str, Tensor], conv: nn.Conv2d,
                            bn: Optional[nn.Module], block_kwargs: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """Rebuild the stored block on the baseline conv's geometry; its equivalent (K, b) in float64."""
    as64 = {k: (v.detach().to("cpu", torch.float64) if v.is_floating_point() else v.detach().cpu())
            for k, v in sub_state.items()}
    if kind not in BLOCK_REGISTRY:  # a kernel stored as it is: fused_conv / dbb_reparam / orepa_reparam / conv
        holder = next(h for h in _ready_kernel_holders() if f"{h}.weight" in as64)
        extra = sorted(set(as64) - {f"{holder}.weight", f"{holder}.bias"})
        if extra:
            raise ValueError(f"a {kind} holds only {holder}.weight and {holder}.bias, found also {extra}")
        kernel = as64[f"{holder}.weight"]
        bias = as64.get(f"{holder}.bias", torch.zeros(kernel.shape[0], dtype=kernel.dtype))
        if kernel.shape != conv.weight.shape:
            raise ValueError(f"stored kernel shape {tuple(kernel.shape)} != {tuple(conv.weight.shape)}")
        return kernel, bias
    geometry = _conv_geometry(conv)
    if isinstance(geometry, str):
        raise ValueError(geometry)
    block_type = get_block_type(kind)
    block_class = block_type.block_class
    if not _accepts(block_class, "padding_mode"):
        if geometry.pop("padding_mode") != "zeros":
            raise ValueError(f"{block_class.__name__} has no padding_mode")
    inferred: Dict[str, Any] = {"bn_eps": bn.eps if bn is not None else 1e-5,
                                **block_type.stored_options(as64, conv.in_channels)}
    options = {**inferred, **block_kwargs}
    block = block_class(**geometry, **options).to(torch.float64)
    block.load_state_dict(as64, strict=True)
    block.eval()
    kernel, bias = block.get_equivalent_kernel_bias()
    return kernel.detach(), bias.detach()


def _place_kernel_bias(conv_name: str, conv: nn.Conv2d, bn_name: Optional[str], bn: Optional[nn.Module],
                       kernel: Tensor, bias: Tensor, state: Mapping[str, Tensor],
                       values: Dict[str, Tensor], consumed: set) -> List[str]:
    """Write ``(K, b)`` into the baseline conv (and the BN it feeds); returns the problems found."""
    prefix = f"{conv_name}." if conv_name else ""
    # its own tensors, not those of a kept tail (e.g. timm BatchNormAct2d's ``act``)
    bn_is_stored = bn_name is not None and any(f"{bn_name}.{t}" in state for t in _BN_TENSORS)
    if bn is not None and bn_is_stored:
        # The block was followed by a BN that was kept: bn(Kx + b) == bn'(Kx + 0), mean' = mean - b.
        mean_key = f"{bn_name}.running_mean"
        if mean_key not in state:
            return [f"'{bn_name}' has entries in the weights but no running_mean"]
        values[f"{prefix}weight"] = kernel
        if conv.bias is not None:
            values[f"{prefix}bias"] = torch.zeros_like(bias)
        values[mean_key] = state[mean_key].to("cpu", torch.float64) - bias
        consumed.add(mean_key)
        return []
    if conv.bias is None and bn is None:
        return [f"'{conv_name}' holds a block but the baseline conv has no bias and feeds no BatchNorm "
                "to carry the fused bias (is this the baseline model the weights were trained from?)"]
    factor = 1.0
    if bn is not None:  # the BN was replaced by nn.Identity: make it one that carries the bias
        shift = torch.zeros_like(bias) if conv.bias is not None else bias
        entries, factor = _pass_through_bn_state(bn_name, bn, shift)
        values.update(entries)
    values[f"{prefix}weight"] = kernel * factor
    if conv.bias is not None:
        values[f"{prefix}bias"] = bias * factor
    return []


def _pass_through_bn_state(bn_name: str, bn: nn.Module, shift: Tensor) -> Tuple[Dict[str, Tensor], float]:
    """BN entries and input factor ``f`` with ``bn(f * y) = y + shift`` in eval mode.

    ``running_var = v = 1 - eps`` (0 when eps >= 1), ``s = sqrt(v + eps)`` (1 up to rounding):
    affine BN: ``weight = s, bias = shift, running_mean = 0``, ``f = 1``; non-affine BN:
    ``running_mean = -shift * s``, ``f = s``.
    """
    eps = float(bn.eps)
    var = 1.0 - eps if eps < 1.0 else 0.0
    std = math.sqrt(var + eps)
    n = shift.shape[0]
    entries = {f"{bn_name}.running_var": torch.full((n,), var, dtype=torch.float64)}
    if bn.affine:
        entries[f"{bn_name}.weight"] = torch.full((n,), std, dtype=torch.float64)
        entries[f"{bn_name}.bias"] = shift
        entries[f"{bn_name}.running_mean"] = torch.zeros(n, dtype=torch.float64)
        factor = 1.0
    else:
        entries[f"{bn_name}.running_mean"] = -shift * std
        factor = std
    if bn.num_batches_tracked is not None:
        entries[f"{bn_name}.num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
    return entries, factor


def _raise_on_mismatch(base_model: nn.Module, source: str, target: Mapping[str, Tensor],
                       state: Mapping[str, Tensor], values: Mapping[str, Tensor], consumed: set,
                       problems: List[str]) -> None:
    missing = [k for k in target if k not in values]
    unexpected = [k for k in state if k not in consumed]
    mismatched = [f"{k}: weights {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in values.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if not (missing or unexpected or mismatched or problems):
        return

    def listing(label: str, items: List[str], quote: bool) -> str:
        shown = ", ".join(repr(i) for i in items[:5]) if quote else "; ".join(items[:5])
        more = f" ... and {len(items) - 5} more" if len(items) > 5 else ""
        return f"{len(items)} {label}: {shown}{more}"

    parts = [listing(label, items, quote) for label, items, quote in (
        ("block problems", problems, False), ("missing keys", missing, True),
        ("unexpected keys", unexpected, True), ("shape mismatches", mismatched, False)) if items]
    hint = ("no entry matched: the weights are for another architecture" if len(consumed) == 0 else
            "check that the weights were trained from this baseline architecture "
            "(same arch and number of classes)")
    raise WeightsError(
        f"cannot load {source} into {type(base_model).__name__}: " + " | ".join(parts) + f". Hint: {hint}"
    )
