"""Which convs of a model a block can replace, and in which form.

Every N-D conv (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) outside re-param blocks has a role:

* a *pair* with the norm it feeds (block form ``"batch"`` or ``"frozen"``, the block takes the norm too);
* *BN-free* (``bn_name=None``, block form ``"none"``): its output goes anywhere else -- a GroupNorm,
  LayerNorm or InstanceNorm (which cannot absorb a conv), an activation, an add, nothing -- so the
  block replaces the conv alone and whatever follows stays;
* none: its parameters are read directly in ``forward`` (or a transposed conv is called with
  ``output_size``), so no block can stand in for it.

A *pair* is a conv whose output goes only into one normalisation layer that acnet can take with it:

* ``"batch"``: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (and the BN subclasses of
  :data:`NORM_ACT_CLASSES`, e.g. timm's ``BatchNormAct2d``);
* ``"frozen"``: torchvision's ``FrozenBatchNorm2d`` (every torchvision detector's backbone), recognised
  by its class and its buffers (acnet imports torch only): ``y = (x - running_mean) * weight /
  sqrt(running_var + eps) + bias`` with fixed buffers.

Pairs are found by dataflow (``torch.fx``, blocks and norms kept opaque) when the model traces;
otherwise by the registration order of siblings (a conv registered immediately before a norm, as in
torchvision's ``conv1``/``bn1`` and ``Sequential(conv, bn, relu)``). The same rule runs in conversion,
in the report and in fuse-and-load, so all three see the same pairs.

With ``bn_free=True``, the BN-free convs come back too, as pairs with ``bn_name=None`` (what
:func:`acnet.convert_to_acnet` converts in the BN-free form by default).
"""
from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .block import ReparamBlock
from .norms import CONV_CLASSES, TRANSPOSED_CONV_CLASSES

__all__ = ["ConvBNPair", "Refusal", "RefusalKind", "CONV_TYPES", "TRANSPOSED_CONV_TYPES", "ANY_CONV_TYPES", "NORM_ACT_CLASSES", "FROZEN_NORM_CLASSES", "find_conv_bn_pairs",
           "norm_kind", "bn_tail", "modules_outside_blocks", "is_transposed", "conv_geometry", "geometry_rule_arguments"]

logger = logging.getLogger(__name__)

#: The convs a block can replace, by dimension.
CONV_TYPES: Tuple[type, ...] = tuple(CONV_CLASSES.values())
CONV_DIM: Dict[type, int] = {cls: dim for dim, cls in CONV_CLASSES.items()}
#: The transposed convs a block can replace (``transposed=True`` forms), by dimension.
TRANSPOSED_CONV_TYPES: Tuple[type, ...] = tuple(TRANSPOSED_CONV_CLASSES.values())
TRANSPOSED_CONV_DIM: Dict[type, int] = {cls: dim for dim, cls in TRANSPOSED_CONV_CLASSES.items()}
#: Every conv class the plug-in looks at.
ANY_CONV_TYPES: Tuple[type, ...] = CONV_TYPES + TRANSPOSED_CONV_TYPES
_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: BatchNorm subclasses whose forward is verified to be ``tail(batch_norm(x))`` (the parent's
#: batch-norm, then the named children in this order), by exact class: the block takes the conv and the
#: BN, ``nn.Sequential`` of these children (same names, so same state-dict keys) takes the BN's place.
#: timm's BatchNormAct2d (timm >= 0.9, checked on 1.0): F.batch_norm as nn.BatchNorm2d, then drop, act.
NORM_ACT_CLASSES: Dict[str, Tuple[str, ...]] = {
    "timm.layers.norm_act.BatchNormAct2d": ("drop", "act"),
}
#: Frozen batch norms (fixed affine buffers, no batch statistics), by exact class: torchvision's
#: ``FrozenBatchNorm2d`` (checked on torchvision 0.29: buffers weight, bias, running_mean, running_var;
#: attribute eps; forward ``x * w * rsqrt(rv + eps) + (b - rm * w * rsqrt(rv + eps))``) and acnet's own
#: N-D :class:`acnet.norms.FrozenBatchNorm` (same buffers and forward, for 1-D and 3-D models).
FROZEN_NORM_CLASSES: Tuple[str, ...] = ("torchvision.ops.misc.FrozenBatchNorm2d", "acnet.norms.FrozenBatchNorm")
#: The tensors a (batch or frozen) norm holds itself.
NORM_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_FROZEN_BUFFERS = frozenset({"weight", "bias", "running_mean", "running_var"})


class RefusalKind(enum.Enum):
    """Why a conv is kept as it is (or a form of it refused): the kind of a :class:`Refusal`."""

    NOT_A_PLAIN_CONV = "a conv subclass with its own forward"
    ASYMMETRIC_PADDING = "padding='same' with an even total padding"
    UNVERIFIED_NORM = "a BatchNorm subclass whose forward acnet cannot verify"
    NOT_PAIRED = "bn_free=False and the conv feeds no norm alone"
    NO_STAND_IN = "its parameters are read directly (or output_size is given)"
    KERNEL_SIZE = "its kernel size is not in kernel_sizes"
    NORM_MISMATCH = "its norm does not fit the form (features, running statistics)"
    NO_FORM = "the block type has no form for it"
    BLOCK_REFUSES = "the block's constructor refuses the options"
    ALREADY_A_BLOCK = "already a re-param block"


@dataclass(frozen=True)
class Refusal:
    """Why a conv is kept (or a form of it refused): a :class:`RefusalKind` to compare and the one-line
    ``text`` the report and the warnings print (``str(refusal)``)."""

    kind: RefusalKind
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ConvBNPair:
    """A conv whose output feeds only one norm (qualified module names in the model); ``bn_name`` is
    ``None`` for a BN-free conv (found with ``bn_free=True`` only)."""

    conv_name: str
    bn_name: Optional[str]


def conv_dim(module: nn.Module) -> Optional[int]:
    """1, 2 or 3 for an ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d`` or a subclass that computes what
    its base class does (it overrides neither ``forward`` nor ``_conv_forward``, e.g. torchvision's
    ``Conv3DSimple``); else None."""
    for base, dim in CONV_DIM.items():
        if isinstance(module, base):
            cls = type(module)
            return dim if cls.forward is base.forward and cls._conv_forward is base._conv_forward else None
    for base, dim in TRANSPOSED_CONV_DIM.items():
        if isinstance(module, base):
            return dim if type(module).forward is base.forward else None
    return None


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.ConvTranspose1d/2d/3d`` (or a subclass)."""
    return isinstance(module, TRANSPOSED_CONV_TYPES)


def _qualified_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def norm_kind(module: Optional[nn.Module]) -> Optional[str]:
    """``"batch"`` for a BatchNorm{1,2,3}d / SyncBatchNorm (or a subclass), ``"frozen"`` for a frozen
    batch norm of :data:`FROZEN_NORM_CLASSES` with its four buffers, ``None`` for anything else."""
    if module is None:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if _qualified_name(module) in FROZEN_NORM_CLASSES:
        buffers = {name for name, _ in module.named_buffers(recurse=False)}
        if buffers == _FROZEN_BUFFERS and not list(module.parameters(recurse=False)) and hasattr(module, "eps"):
            return "frozen"
    return None


def norm_features(norm: nn.Module) -> int:
    """Channels a norm normalises (its running_mean's length)."""
    return int(norm.running_mean.shape[0]) if getattr(norm, "running_mean", None) is not None else int(
        getattr(norm, "num_features", -1))


def bn_tail(bn: nn.Module) -> Union[nn.Module, Refusal]:
    """What stays in the norm's place when a block takes the conv and ``bn``, or why ``bn`` cannot be taken.

    ``nn.Identity`` for ``nn.BatchNorm{1,2,3}d`` / ``nn.SyncBatchNorm`` and frozen batch norms; for a
    class of :data:`NORM_ACT_CLASSES`, ``nn.Sequential`` of its post-norm children under their own
    names (so the trained model computes what the BN subclass computes, with the same state-dict keys);
    any other ``BatchNorm`` subclass (its forward may differ from a BN's) is refused
    (:attr:`RefusalKind.UNVERIFIED_NORM`).
    """
    cls = type(bn)
    if cls in _BATCH_NORM_TYPES or norm_kind(bn) == "frozen":
        return nn.Identity()
    children = NORM_ACT_CLASSES.get(_qualified_name(bn))
    own = {name for name, _ in bn.named_parameters(recurse=False)} | {name for name, _ in bn.named_buffers(recurse=False)}
    if children is None or set(bn._modules) != set(children) or not own <= NORM_TENSORS:
        return Refusal(RefusalKind.UNVERIFIED_NORM,
                       f"its BN is a {_qualified_name(bn)}, a BatchNorm subclass whose forward acnet cannot "
                       "verify (supported: nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, "
                       f"{', '.join((*NORM_ACT_CLASSES, *FROZEN_NORM_CLASSES))})")
    return nn.Sequential(OrderedDict((name, bn._modules[name]) for name in children))


def modules_outside_blocks(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """``named_modules()`` without the insides of re-param blocks (nor the model itself)."""
    def visit(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            yield prefix + name, child
            if not isinstance(child, ReparamBlock):
                yield from visit(child, prefix + name + ".")
    yield from visit(model, "")


def find_conv_bn_pairs(model: nn.Module, *, bn_free: bool = False) -> List[ConvBNPair]:
    """Every conv (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) whose output goes only into one norm
    (:func:`norm_kind`), outside re-param blocks; with ``bn_free=True`` also every other conv a block can
    stand in for alone (``bn_name=None``: its output goes into anything else, a norm it does not feed
    alone included -- that norm then stays).

    By dataflow when ``torch.fx`` can trace the model: every call of the conv must feed exactly
    one node, a call of the same norm, whose only input it is; the norm must be called on nothing else,
    and neither module's parameters may be read directly in ``forward``. A BN-free conv: its parameters
    are not read directly and (a transposed conv) it is never called with ``output_size``. When tracing
    fails (data-dependent control flow), by registration order: a conv child registered immediately
    before a norm child of the same parent; a BN-free conv: any other. Pairs are returned in
    module-registration order.
    """
    try:
        pairs = _pairs_by_dataflow(model, bn_free)
        method = "dataflow (torch.fx)"
    except Exception as exc:  # any tracing failure means: fall back to registration order
        logger.debug("find_conv_bn_pairs: torch.fx cannot trace %s (%s: %s); using registration order",
                     type(model).__name__, type(exc).__name__, exc)
        pairs = _pairs_by_registration(model, bn_free)
        method = "registration order"
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    pairs.sort(key=lambda p: order.get(p.conv_name, len(order)))
    logger.debug("find_conv_bn_pairs: %d pair(s) found by %s", len(pairs), method)
    return pairs


class _BlockOpaqueTracer(torch.fx.Tracer):
    """fx tracer that keeps re-param blocks, norms (BN subclasses such as timm's BatchNormAct2d, frozen
    BNs) and torch.nn layers as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, ReparamBlock) or norm_kind(m) is not None or conv_dim(m) is not None
                or super().is_leaf_module(m, module_qualified_name))


def _pairs_by_dataflow(model: nn.Module, bn_free: bool) -> List[ConvBNPair]:
    graph = _BlockOpaqueTracer().trace(model)
    modules = dict(model.named_modules())
    conv_sites: Dict[str, List[torch.fx.Node]] = {}
    bn_sites: Dict[str, List[torch.fx.Node]] = {}
    attr_reads: List[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            module = modules.get(node.target)
            if conv_dim(module) is not None:
                conv_sites.setdefault(node.target, []).append(node)
            elif norm_kind(module) is not None:
                bn_sites.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            attr_reads.append(str(node.target))

    def read_directly(name: str) -> bool:
        return any(t == name or t.startswith(name + ".") for t in attr_reads)

    pairs = []
    for conv_name, sites in conv_sites.items():
        if read_directly(conv_name) or any(len(site.args) != 1 or site.kwargs for site in sites):
            continue  # parameters read in forward, or a transposed conv called with output_size
        pair = _norm_fed_alone(conv_name, sites, bn_sites, read_directly)
        if pair is not None:
            pairs.append(pair)
        elif bn_free:
            pairs.append(ConvBNPair(conv_name, None))
    return pairs


def _norm_fed_alone(conv_name: str, sites: List[torch.fx.Node], bn_sites: Dict[str, List[torch.fx.Node]],
                    read_directly) -> Optional[ConvBNPair]:
    """The pair of ``conv_name`` with the one norm every call of it feeds alone, or None."""
    bn_names = set()
    for site in sites:
        users = list(site.users)
        if len(users) != 1:
            return None
        user = users[0]
        if not (user.op == "call_module" and user.target in bn_sites and user.args[:1] == (site,)
                and len(user.args) == 1 and not user.kwargs):
            return None
        bn_names.add(user.target)
    if len(bn_names) != 1:
        return None
    bn_name = bn_names.pop()
    bn_fed_by_conv_only = all(
        n.args and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_module"
        and n.args[0].target == conv_name for n in bn_sites[bn_name]
    )
    if bn_fed_by_conv_only and not read_directly(bn_name):
        return ConvBNPair(conv_name, bn_name)
    return None


def _pairs_by_registration(model: nn.Module, bn_free: bool) -> List[ConvBNPair]:
    pairs = []

    def visit(module: nn.Module, prefix: str) -> None:
        children = list(module.named_children())
        for index, (name, child) in enumerate(children):
            if conv_dim(child) is None:
                continue
            following = children[index + 1] if index + 1 < len(children) else None
            if following is not None and norm_kind(following[1]) is not None:
                pairs.append(ConvBNPair(prefix + name, prefix + following[0]))
            elif bn_free:
                pairs.append(ConvBNPair(prefix + name, None))
        for name, child in children:
            if not isinstance(child, ReparamBlock):
                visit(child, prefix + name + ".")

    if not isinstance(model, ReparamBlock):
        visit(model, "")
    return pairs


def _resolved_padding(conv: nn.Module, kernel: Tuple[int, ...],
                      dilation: Tuple[int, ...]) -> Union[Tuple[int, ...], Refusal]:
    if conv.padding == "valid":
        return (0,) * len(kernel)
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in totals):
            return Refusal(RefusalKind.ASYMMETRIC_PADDING, "padding='same' with an even total padding is asymmetric")
        return tuple(t // 2 for t in totals)
    return tuple(int(p) for p in conv.padding)


def conv_geometry(conv: nn.Module) -> Union[Dict[str, object], Refusal]:
    """``dim, in/out_channels, kernel_size, stride, padding, dilation, groups, padding_mode`` of a plain
    ``nn.Conv1d/2d/3d`` (sizes as tuples of length ``dim``, ``'same'``/``'valid'`` resolved), plus
    ``transposed=True`` and ``output_padding`` for an ``nn.ConvTranspose1d/2d/3d``; or why not (a :class:`Refusal`)."""
    dim = conv_dim(conv)
    if dim is None:
        base = "nn.ConvTranspose1d/2d/3d" if is_transposed(conv) else "nn.Conv1d/2d/3d"
        return Refusal(RefusalKind.NOT_A_PLAIN_CONV,
                       f"{type(conv).__name__} is not a plain {base} (its forward may differ)")
    kernel, stride, dilation = (tuple(int(v) for v in getattr(conv, a)) for a in ("kernel_size", "stride", "dilation"))
    padding = _resolved_padding(conv, kernel, dilation)
    if isinstance(padding, Refusal):
        return padding
    geometry: Dict[str, object] = dict(dim=dim, in_channels=conv.in_channels, out_channels=conv.out_channels,
                                       kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                                       groups=conv.groups, padding_mode=conv.padding_mode)
    if is_transposed(conv):
        geometry.update(transposed=True, output_padding=tuple(int(v) for v in conv.output_padding))
    return geometry


def geometry_rule_arguments(geometry: Dict[str, object], norm: str, bias: bool = True) -> Dict[str, object]:
    """The keyword arguments of a block's ``unsupported()`` for a :func:`conv_geometry` (with ``dim``);
    ``transposed`` / ``bias`` only where they differ from the contract's defaults (a block whose
    constructor takes no such argument is never asked about that form)."""
    args = {k: geometry[k] for k in ("dim", "kernel_size", "stride", "padding", "dilation", "groups")}
    args.update(padding_mode=geometry.get("padding_mode", "zeros"), norm=norm)
    if geometry.get("transposed"):
        args["transposed"] = True
    if not bias:
        args["bias"] = False
    return args


def constructor_geometry(geometry: Dict[str, object], form: str) -> Dict[str, object]:
    """Block constructor arguments from :func:`conv_geometry`: a 2-D square geometry as ints (today's
    arguments), anything else as tuples plus ``dim=``; ``norm=form`` unless it is ``"batch"``;
    ``transposed=True`` and ``output_padding`` for a transposed conv."""
    args = {k: v for k, v in geometry.items() if k != "dim" and not (k == "transposed" and not v)}
    dim = geometry["dim"]
    sizes = tuple(k for k in ("kernel_size", "stride", "padding", "dilation", "output_padding") if k in args)
    if dim == 2 and all(len(set(args[k])) == 1 for k in sizes):
        args.update({k: args[k][0] for k in sizes})
    if dim != 2:
        args["dim"] = dim
    if form != "batch":
        args["norm"] = form
    return args
