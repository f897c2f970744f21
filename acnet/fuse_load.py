"""Fold training-time weights back into the unmodified baseline model: :func:`acnet_fuse_and_load`.

For every conv of the baseline model whose weights hold a stored block instead of a kernel, the block
is rebuilt on that conv's geometry and form (dimension; the norm that follows the conv: BatchNorm,
frozen BatchNorm, or none), its equivalent kernel and bias are computed in float64 and written into
the conv (and the norm after it). Pairs are the ones :func:`acnet.pairs.find_conv_bn_pairs` finds,
so conversion and fuse-and-load see the same pairs.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .block import ReparamBlock, takes_arguments
from .errors import exception_line
from .pairs import (ANY_CONV_TYPES, NORM_TENSORS, Refusal, constructor_geometry, conv_geometry, find_conv_bn_pairs,
                    norm_kind)
from .registry import BLOCK_REGISTRY, get_block_type
from .weights import PathLike, WeightsError, as_state_dict, check_finite_weights, load_state_dict_file

__all__ = ["acnet_fuse_and_load", "pass_through_norm_state"]

_BN_TENSORS = NORM_TENSORS


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
    naming_schemes: Optional[Sequence[Any]] = None,
    **block_kwargs: Any,
) -> nn.Module:
    """Load training-time weights into the unmodified baseline model; same eval-mode outputs.

    ``weights``: a state dict, a module (its state dict), or a file (``.pth``/``.pt`` checkpoint or
    hdf5, see :func:`acnet.load_state_dict_file`); a ``module.`` prefix is stripped.

    For every ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d`` named ``c`` in ``base_model`` whose weights hold a block under ``c.``
    instead of ``c.weight`` (an ACB, a DBB, an OREPA block, a ``ConvBN``: any type of
    :mod:`acnet.registry`; or a kernel stored ready, as an already deployed ``fused_conv`` /
    ``dbb_reparam`` / ``orepa_reparam`` or a block wrapping one plain ``conv``), the block is rebuilt with
    that conv's geometry, its form and the eps of the norm after it (inferred: ``dim`` from the conv,
    ``norm`` from what follows it -- ``"batch"``, ``"frozen"`` after a frozen BatchNorm, ``"none"`` when no
    norm does --, then the class's ``stored_options``: ACB ``use_affine`` from the keys, DBB / OREPA
    internal channels from the 1x1-KxK branch's shapes; ``block_kwargs`` override, ``block_type`` asserts
    the kind), loaded strictly, and its
    equivalent ``(K, b)`` is computed in float64 and written as:

    * ``c.weight = K``, and ``c.bias = b`` when the conv has a bias (a bias-free conv, e.g. before a
      GroupNorm, was trained as a bias-free BN-free block: ``b = 0``);
    * when ``c`` feeds a BN ``n`` whose entries the weights lack (the block took the BN, a
      :class:`~acnet.convert.FoldedNorm` held its place), ``n`` becomes a pass-through that adds the bias (when ``c`` has none):
      ``running_var = 1 - eps``, ``running_mean = 0``, ``weight = sqrt(running_var + eps)``,
      ``bias = b`` (see :func:`pass_through_norm_state` for non-affine BNs); a frozen BatchNorm's buffers
      are set the same way;
    * when the weights hold ``n.*`` (a block followed by a BN that was kept), they load with
      ``running_mean - b`` and ``c`` gets ``K`` alone.

    All exact; float32 rounding adds ~1e-7 relative.

    ``naming_schemes``: a sequence of :mod:`acnet.schemes` schemes the weights may be written in (e.g.
    the original ACNet / DBB repositories' names); a state dict matching one of them exactly is
    translated first (without it, the names are taken as the model's own). The framework's archs give
    theirs with ``constructor.naming_schemes(arch)``.

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
    check_finite_weights(state, source)  # NaN / inf weights (a diverged run's) are refused before any change
    state = _own_names(base_model, state, source, naming_schemes)
    target = base_model.state_dict()
    modules = dict(base_model.named_modules())
    bn_after = {p.conv_name: p.bn_name for p in find_conv_bn_pairs(base_model)}

    values: Dict[str, Tensor] = {}
    consumed: set = set()
    problems: List[str] = []
    for conv_name, conv in modules.items():
        prefix = f"{conv_name}." if conv_name else ""
        if not isinstance(conv, ANY_CONV_TYPES) or f"{prefix}weight" in state:
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
        if bn_name is None and prefix != f"{conv_name}." and norm_kind(modules.get(prefix + "bn")) is not None:
            bn_name = prefix + "bn"  # the ConvBN unit's own BN (units are not traced into)
        bn = modules[bn_name] if bn_name is not None else None
        try:
            kernel, bias = _equivalent_kernel_bias(kind, sub_state, conv, bn, block_kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            problems.append(f"the {kind} weights under '{conv_name}' do not fit its conv "
                            f"{_describe_conv(conv)}: {exception_line(exc, whole=True, limit=400)}")
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


def _own_names(base_model: nn.Module, state: Dict[str, Tensor], source: str,
               naming_schemes: Optional[Sequence[Any]]) -> Dict[str, Tensor]:
    """``state`` under the model's own names when ``naming_schemes`` (:mod:`acnet.schemes`, e.g. the
    original ACNet / DBB repositories' names) are given and one matches exactly (names, then shapes);
    anything else is used as it is.
    """
    from .schemes import recognise

    if naming_schemes is None:
        return state
    scheme = recognise(state, tuple(naming_schemes), source)
    return state if scheme is None else scheme.to_ours(state)


def _block_prefix(modules: Mapping[str, nn.Module], conv_name: str, state: Mapping[str, Tensor]) -> str:
    """Where ``state`` holds the block that replaces conv ``conv_name``: under the conv's own name, or,
    for the ``conv`` of a plain unit (a ``ConvBN`` of a framework's base model), under the unit's name."""
    prefix = f"{conv_name}." if conv_name else ""
    parent, _, leaf = conv_name.rpartition(".")
    unit = modules.get(parent)
    if (leaf == "conv" and _stored_block_kind(state, prefix) is None and isinstance(unit, ReparamBlock)
            and not any(isinstance(unit, t.block_class) for t in BLOCK_REGISTRY.values() if not t.plain)):
        unit_prefix = f"{parent}." if parent else ""
        pluggable = {name for name, t in BLOCK_REGISTRY.items() if not t.plain}
        if _stored_block_kind(state, unit_prefix) in pluggable | {"deployed"}:
            return unit_prefix
    return prefix


def _stored_block_kind(state: Mapping[str, Tensor], prefix: str) -> Optional[str]:
    for suffix, kind in _block_signatures():
        if prefix + suffix in state:
            return kind
    return None


def _describe_conv(conv: nn.Module) -> str:
    return (f"(in={conv.in_channels}, out={conv.out_channels}, kernel={tuple(conv.kernel_size)}, "
            f"stride={tuple(conv.stride)}, padding={conv.padding}, groups={conv.groups})")


@torch.no_grad()
def _equivalent_kernel_bias(kind: str, sub_state: Dict[str, Tensor], conv: nn.Module,
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
    geometry = conv_geometry(conv)
    if isinstance(geometry, Refusal):
        raise ValueError(geometry.text)
    block_type = get_block_type(kind)
    block_class = block_type.block_class
    if not takes_arguments(block_class, "padding_mode"):
        if geometry.pop("padding_mode") != "zeros":
            raise ValueError(f"{block_class.__name__} has no padding_mode")
    block = _block_matching(block_class, geometry, norm_kind(bn) or "none", bn,
                            {**block_type.stored_options(as64, conv.in_channels), **block_kwargs}, as64,
                            conv.bias is not None)
    block.load_state_dict(as64, strict=True)
    block.eval()
    kernel, bias = block.get_equivalent_kernel_bias()
    return kernel.detach(), bias.detach()


def _block_matching(block_class: type, geometry: Dict[str, Any], guess: str, bn: Optional[nn.Module],
                    options: Dict[str, Any], state: Mapping[str, Tensor], conv_bias: bool = True) -> nn.Module:
    """The block (float64) of the form whose state-dict names are the stored ones: first the form the
    baseline model suggests (``guess``: the norm after the conv), then the others (a block with BNs
    trained for a conv whose BN was later folded, a BN-free block trained for a conv whose BN was
    kept, ...); the BN-free form first with the conv's own bias setting, then the other; the guess when
    none matches (its load error then names the keys)."""
    eps = {"bn_eps": float(bn.eps)} if bn is not None and getattr(bn, "eps", None) is not None else {}
    first: Optional[nn.Module] = None
    bias_variants = ([{"bias": False}, {}] if not conv_bias else [{}, {"bias": False}]) \
        if takes_arguments(block_class, "bias") and "bias" not in options else [{}]
    for form in dict.fromkeys((guess, "batch", "frozen", "none")):
        for variant in bias_variants if form == "none" else [{}]:
            try:
                block = block_class(**{**constructor_geometry(geometry, form), **({} if form == "none" else eps),
                                       **variant, **options})
            except (TypeError, ValueError):
                if form == guess and guess == "batch":
                    raise
                continue
            first = first if first is not None else block
            if set(block.state_dict()) == set(state):
                return block.to(torch.float64)
    if first is None:
        raise ValueError(f"{block_class.__name__} has no form for this conv")
    return first.to(torch.float64)


def _place_kernel_bias(conv_name: str, conv: nn.Module, bn_name: Optional[str], bn: Optional[nn.Module],
                       kernel: Tensor, bias: Tensor, state: Mapping[str, Tensor],
                       values: Dict[str, Tensor], consumed: set) -> List[str]:
    """Write ``(K, b)`` into the baseline conv (and the BN it feeds); returns the problems found."""
    prefix = f"{conv_name}." if conv_name else ""
    # its own tensors, not those of a kept tail (e.g. timm BatchNormAct2d's ``act``)
    bn_is_stored = bn_name is not None and any(f"{bn_name}.{t}" in state for t in _BN_TENSORS)
    bias_is_zero = not bool(bias.ne(0).any())
    if bn is not None and bn_is_stored:
        # The block was followed by a BN that was kept: bn(Kx + b) == bn'(Kx + 0), mean' = mean - b.
        mean_key = f"{bn_name}.running_mean"
        if bias_is_zero or (mean_key not in state and not getattr(bn, "track_running_stats", True)):
            # a bias-free block, or a BN normalising with batch statistics (bn(y + b) == bn(y)): the BN loads
            # as it is (below), the bias goes into the conv where it has one
            values[f"{prefix}weight"] = kernel
            if conv.bias is not None:
                values[f"{prefix}bias"] = bias
            return []
        if mean_key not in state:
            return [f"'{bn_name}' has entries in the weights but no running_mean"]
        values[f"{prefix}weight"] = kernel
        if conv.bias is not None:
            values[f"{prefix}bias"] = torch.zeros_like(bias)
        values[mean_key] = state[mean_key].to("cpu", torch.float64) - bias
        consumed.add(mean_key)
        return []
    if conv.bias is None and bn is None and bias_is_zero:  # a bias-free block on a bias-free conv
        values[f"{prefix}weight"] = kernel
        return []
    if conv.bias is None and bn is None:
        return [f"'{conv_name}' holds a block but the baseline conv has no bias and feeds no norm to carry "
                "the fused bias (is this the baseline model the weights were trained from? a BN-free block "
                "trained on a bias-free conv deploys with acnet_switch_to_deploy)"]
    factor = 1.0
    if bn is not None:  # the BN was replaced by nn.Identity: make it one that carries the bias
        shift = torch.zeros_like(bias) if conv.bias is not None else bias
        entries, factor = pass_through_norm_state(bn_name, bn, shift)
        values.update(entries)
    values[f"{prefix}weight"] = kernel * factor
    if conv.bias is not None:
        values[f"{prefix}bias"] = bias * factor
    return []


def pass_through_norm_state(bn_name: str, bn: nn.Module, shift: Tensor) -> Tuple[Dict[str, Tensor], float]:
    """BN entries (``bn_name.running_var`` etc.; bare names when ``bn_name`` is empty) and input factor
    ``f`` with ``bn(f * y) = y + shift`` in eval mode.

    ``running_var = v = 1 - eps`` (0 when eps >= 1), ``s = sqrt(v + eps)`` (1 up to rounding):
    affine BN: ``weight = s, bias = shift, running_mean = 0``, ``f = 1``; non-affine BN:
    ``running_mean = -shift * s``, ``f = s``.
    """
    eps = float(bn.eps)
    var = 1.0 - eps if eps < 1.0 else 0.0
    std = math.sqrt(var + eps)
    n = shift.shape[0]
    prefix = f"{bn_name}." if bn_name else ""
    entries = {f"{prefix}running_var": torch.full((n,), var, dtype=torch.float64)}
    if getattr(bn, "affine", True):
        entries[f"{prefix}weight"] = torch.full((n,), std, dtype=torch.float64)
        entries[f"{prefix}bias"] = shift
        entries[f"{prefix}running_mean"] = torch.zeros(n, dtype=torch.float64)
        factor = 1.0
    else:
        entries[f"{prefix}running_mean"] = -shift * std
        factor = std
    if getattr(bn, "num_batches_tracked", None) is not None:
        entries[f"{prefix}num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
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
