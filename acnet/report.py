"""The conversion report: what :func:`acnet.convert_to_acnet` would do to a model, read before training.

:func:`conversion_report` returns one :class:`ConvReportRow` per conv (module name, kernel / stride /
groups, the norm that follows, the block form chosen -- BN, frozen, BN-free, on a conv or a transposed
conv -- or, for a conv kept, the reason and the option that would convert it) and the totals;
:func:`format_report` (and ``str(report)``) prints it as a table. The model is not modified: the
decisions come from the same function the conversion uses (:func:`acnet.convert.plan_conversion`), the
blocks are built on the meta device to count their parameters, and the FLOPs are counted on copies.

Totals:

* ``converted`` convs of ``len(rows)``, ``converted_params``: the parameters of the convs that change;
* ``params_deploy``: the model's parameters as they are (``acnet_fuse_and_load`` folds the trained
  blocks back into this very architecture); ``params_train``: the same plus each block's parameters
  minus those of the conv and norm it replaces (frozen buffers are not parameters).
* with ``example_input``: ``converted_flops`` / ``model_flops``, the forward conv and matmul FLOPs of
  the convs that change and of the whole model; ``train_flops_multiplier`` (the expected training
  cost): conv and matmul FLOPs of one forward + backward pass of the converted model divided by those
  of the model as it is, both counted by ``torch.utils.flop_counter.FlopCounterMode`` on copies in
  eval mode at ``example_input``'s shape (the backward of ``sum`` of every floating output; elementwise
  and norm ops are not counted; parameters with ``requires_grad=False`` get no weight-gradient FLOPs,
  as in training).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .convert import (
    FORM_NAMES,
    block_class_for,
    check_block_options,
    convert_to_acnet,
    kernel_size_set,
    plan_conversion,
    pluggable_block_classes,
)
from .pairs import is_transposed

__all__ = ["ConvReportRow", "ConversionReport", "conversion_report", "format_report"]


@dataclass(frozen=True)
class ConvReportRow:
    """One conv of the model: ``converted`` and ``reason == ""``, or kept with ``reason`` saying why and
    ``hint`` naming the option that would convert it (``""`` when none does: no block has a form)."""

    name: str
    conv_type: str
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    groups: int
    norm: str  # class name of the norm that follows it, "-" for none
    converted: bool
    reason: str
    form: str  # the block's norm argument ("batch", "frozen", "none"), "-" when kept
    extra_params: int  # the block's parameters minus the conv's and the norm's
    hint: str = ""
    transposed: bool = False

    @property
    def form_name(self) -> str:
        """The form as the docs name it: ``BN``, ``frozen``, ``BN-free`` (+ `` transposed``); ``kept``."""
        if not self.converted:
            return "kept"
        return FORM_NAMES.get(self.form, self.form) + (" transposed" if self.transposed else "")


@dataclass(frozen=True)
class ConversionReport:
    """Rows and totals of :func:`conversion_report`; ``str(report)`` is :func:`format_report`'s table."""

    model: str
    block_type: str
    rows: Tuple[ConvReportRow, ...]
    params_deploy: int
    params_train: int
    train_flops_multiplier: Optional[float]
    input_shape: Optional[Tuple[int, ...]]
    converted_params: int = 0
    converted_flops: Optional[int] = None
    model_flops: Optional[int] = None

    @property
    def converted(self) -> int:
        """How many convs become blocks."""
        return sum(row.converted for row in self.rows)

    def __str__(self) -> str:
        return format_report(self)


def conversion_report(
    model: nn.Module,
    block_type: str = "acb",
    kernel_sizes: Optional[Iterable[int]] = None,
    *,
    bn_free: Optional[bool] = None,
    example_input: Optional[Any] = None,
    **block_kwargs: Any,
) -> ConversionReport:
    """What ``convert_to_acnet(model, block_type, kernel_sizes, bn_free=bn_free, **block_kwargs)`` would do.

    One row per ``nn.Conv1d/2d/3d`` / ``nn.ConvTranspose1d/2d/3d`` outside re-param blocks, in
    registration order, and the totals (module docstring). A kept conv's ``hint`` is the option that
    would convert it: a ``kernel_sizes`` that includes its size, dropping ``bn_free=False``, or another
    block type; empty when no block type has a form for it (the reason says why). ``example_input`` (a
    tensor, or a tuple of the model's positional arguments) enables the FLOPs totals. ``model`` is left
    exactly as it was (weights, modules, train/eval mode).
    """
    block_class = block_class_for(block_type)
    sizes = kernel_size_set(kernel_sizes)
    options = dict(block_kwargs)
    check_block_options(block_class, options)
    plans = plan_conversion(model, block_class, sizes, bn_free=bn_free, block_kwargs=options)
    hints = _hints(model, block_type, block_class, [p for p in plans if p.reason is not None], sizes, bn_free,
                   options)
    rows = []
    extra_total = converted_params = 0
    for plan in plans:
        conv = plan.conv
        converted = plan.reason is None
        extra = 0
        if converted:
            replaced = sum(p.numel() for p in conv.parameters())
            converted_params += replaced
            if plan.norm is not None:
                replaced += sum(p.numel() for p in plan.norm.parameters(recurse=False))
            extra = plan.block_params - replaced
            extra_total += extra
        rows.append(ConvReportRow(
            name=plan.conv_name, conv_type=type(conv).__name__, kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride), groups=conv.groups,
            norm=type(plan.norm).__name__ if plan.norm is not None else "-", converted=converted,
            reason=plan.reason.text if plan.reason is not None else "", form=plan.form if converted else "-", extra_params=extra,
            hint=hints.get(plan.conv_name, ""), transposed=is_transposed(conv)))
    params = sum(p.numel() for p in model.parameters())
    multiplier = shape = converted_flops = model_flops = None
    if example_input is not None:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        shape = tuple(inputs[0].shape) if isinstance(inputs[0], Tensor) else None
        names = {plan.conv_name for plan in plans if plan.reason is None}
        multiplier, converted_flops, model_flops = _flops(model, inputs, names, block_type, kernel_sizes, bn_free,
                                                          block_kwargs)
    return ConversionReport(type(model).__name__, block_type.lower(), tuple(rows), params, params + extra_total,
                            multiplier, shape, converted_params, converted_flops, model_flops)


def _hints(model: nn.Module, block_type: str, block_class: type, kept: List[Any], sizes: Optional[frozenset],
           bn_free: Optional[bool], options: Dict[str, Any]) -> Dict[str, str]:
    """For each kept conv, the option that would convert it (the overrides dropped, then another block type)."""
    if not kept:
        return {}
    hints: Dict[str, str] = {}
    if sizes is not None or bn_free is False:
        relaxed = {p.conv_name: p for p in plan_conversion(model, block_class, None, bn_free=None,
                                                           block_kwargs=options)}
        for plan in kept:
            other = relaxed.get(plan.conv_name)
            if other is None or other.reason is not None:
                continue
            changes = _option_changes(plan, other, sizes, bn_free)
            hints[plan.conv_name] = "converts with " + " and ".join(changes or ["the default options"])
    missing = [p for p in kept if p.conv_name not in hints]
    for name, other_class in pluggable_block_classes().items():
        if not missing or name == block_type.lower():
            continue
        others = {p.conv_name: p for p in plan_conversion(model, other_class, None, bn_free=None)}
        for plan in list(missing):
            other = others.get(plan.conv_name)
            if other is not None and other.reason is None:
                changes = _option_changes(plan, other, sizes, bn_free)
                hints[plan.conv_name] = (f"block type {name!r} converts it ({FORM_NAMES[other.form]} form"
                                         + (f", with {' and '.join(changes)})" if changes else ")"))
                missing.remove(plan)
    return hints


def _option_changes(plan: Any, other: Any, sizes: Optional[frozenset], bn_free: Optional[bool]) -> List[str]:
    """The overrides the user gave that keep ``plan``'s conv, which ``other`` (planned without them) converts."""
    changes = []
    size = max(tuple(plan.conv.kernel_size))
    if sizes is not None and size not in sizes:
        changes.append(f"kernel_sizes including {size} (or the default None)")
    if bn_free is False and other.form == "none":
        changes.append("bn_free=None (the default: BN-free form)")
    return changes


def _tensors(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _train_flops(model: nn.Module, inputs: Tuple[Any, ...]) -> int:
    return _count_flops(model, inputs, backward=True)[0]


def _count_flops(model: nn.Module, inputs: Tuple[Any, ...], backward: bool) -> Tuple[int, Dict[str, int]]:
    """Total conv + matmul FLOPs of one forward (+ backward) pass, and the forward FLOPs per module name."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        outputs = [t for t in _tensors(model(*inputs)) if t.is_floating_point() and t.requires_grad]
        if backward and outputs:
            torch.autograd.backward([t.sum() for t in outputs])
    root = type(model).__name__ + "."
    per_module = {name[len(root):]: sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                  if name.startswith(root)}
    return int(counter.get_total_flops()), per_module


def _flops(model: nn.Module, inputs: Tuple[Any, ...], converted: set, block_type: str,
           kernel_sizes: Optional[Iterable[int]], bn_free: Optional[bool],
           block_kwargs: Any) -> Tuple[Optional[float], int, int]:
    """``(training FLOPs multiplier, forward FLOPs of the converted convs, forward FLOPs of the model)``."""
    plain = copy.deepcopy(model).eval()
    with torch.no_grad():
        forward_total, per_module = _count_flops(plain, inputs, backward=False)
    baseline = _train_flops(plain, inputs)
    del plain
    converted_copy = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model that converts nothing has multiplier 1, said by the rows
        convert_to_acnet(converted_copy, block_type, kernel_sizes, bn_free=bn_free, **block_kwargs)
    trained = _train_flops(converted_copy.eval(), inputs)
    converted_flops = sum(per_module.get(name, 0) for name in converted)
    return (trained / baseline if baseline else None), converted_flops, forward_total


def _shown_size(values: Tuple[int, ...]) -> str:
    """A kernel size or stride as the table shows it: ``3x3``."""
    return "x".join(map(str, values))


def format_report(report: ConversionReport) -> str:
    """The report as a printable table: one line per conv (its form, or why it is kept and the option
    that would convert it), then the totals."""
    header = (f"{'conv':<36} {'type':<15} {'kernel':<7} {'stride':<6} {'groups':>6} {'norm':<18} "
              f"{'form':<18} {'+params':>8}  why kept / option that converts it")
    lines = [f"conversion report: {report.model}, block type {report.block_type}", header, "-" * len(header)]
    for row in report.rows:
        why = row.reason + (f"; {row.hint}" if row.hint else "")
        lines.append(f"{row.name:<36} {row.conv_type:<15} {_shown_size(row.kernel_size):<7} "
                     f"{_shown_size(row.stride):<6} "
                     f"{row.groups:>6} {row.norm:<18} {row.form_name:<18} {row.extra_params:>8}  {why}".rstrip())
    lines.append("-" * len(header))
    forms: Dict[str, int] = {}
    for row in report.rows:
        if row.converted:
            forms[row.form_name] = forms.get(row.form_name, 0) + 1
    by_form = ", ".join(f"{n} {form}" for form, n in forms.items())
    lines.append(f"{report.converted} of {len(report.rows)} conv(s) converted" + (f" ({by_form})" if by_form else "")
                 + f", holding {report.converted_params:,} of the model's {report.params_deploy:,} parameters")
    lines.append(f"parameters while training: {report.params_train:,} "
                 f"({report.params_train / max(report.params_deploy, 1):.2f}x); deployed: {report.params_deploy:,} "
                 "(the stock model)")
    if report.train_flops_multiplier is not None:
        share = (f"{report.converted_flops / report.model_flops:.0%}" if report.model_flops else "-")
        lines.append(f"FLOPs at input {report.input_shape} (conv + matmul): the converted convs do "
                     f"{report.converted_flops / 1e6:,.1f} of the model's {(report.model_flops or 0) / 1e6:,.1f} "
                     f"MFLOPs per forward ({share}); expected training cost (forward + backward): "
                     f"{report.train_flops_multiplier:.2f}x the model as it is")
    else:
        lines.append("FLOPs and the expected training cost: pass example_input= to count them")
    return "\n".join(lines)
