"""The conversion report: what :func:`acnet.convert_to_acnet` would do to a model, read before training.

:func:`conversion_report` returns one :class:`ConvReportRow` per conv (module name, kernel / stride /
groups, the norm that follows, converted or the reason not, the block form, extra training
parameters) and the totals; :func:`format_report` (and ``str(report)``) prints it as a table. The model
is not modified: the decisions come from the same function the conversion uses
(:func:`acnet.convert.plan_conversion`), the blocks are built on the meta device to count their
parameters, and the FLOPs are counted on copies.

Totals:

* ``params_deploy``: the model's parameters as they are (``acnet_fuse_and_load`` folds the trained
  blocks back into this very architecture); ``params_train``: the same plus each block's parameters
  minus those of the conv and norm it replaces (frozen buffers are not parameters).
* ``train_flops_multiplier`` (with ``example_input``): conv and matmul FLOPs of one forward + backward
  pass of the converted model divided by those of the model as it is, both counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on copies in eval mode at ``example_input``'s shape
  (the backward of ``sum`` of every floating output; elementwise and norm ops are not counted;
  parameters with ``requires_grad=False`` get no weight-gradient FLOPs, as in training).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .convert import block_class_for, check_block_options, convert_to_acnet, kernel_size_set, plan_conversion

__all__ = ["ConvReportRow", "ConversionReport", "conversion_report", "format_report"]


@dataclass(frozen=True)
class ConvReportRow:
    """One conv of the model: ``converted`` and ``reason == ""``, or kept with ``reason`` saying why."""

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

    @property
    def converted(self) -> int:
        """How many convs become blocks."""
        return sum(row.converted for row in self.rows)

    def __str__(self) -> str:
        return format_report(self)


def conversion_report(
    model: nn.Module,
    block_type: str = "acb",
    kernel_sizes: Iterable[int] = range(2, 7),
    *,
    bn_free: bool = False,
    example_input: Optional[Any] = None,
    **block_kwargs: Any,
) -> ConversionReport:
    """What ``convert_to_acnet(model, block_type, kernel_sizes, bn_free=bn_free, **block_kwargs)`` would do.

    One row per ``nn.Conv1d/2d/3d`` outside re-param blocks, in registration order, and the totals
    (module docstring). ``example_input`` (a tensor, or a tuple of the model's positional arguments)
    enables the training-FLOPs multiplier. ``model`` is left exactly as it was (weights, modules,
    train/eval mode).
    """
    block_class = block_class_for(block_type)
    sizes = kernel_size_set(kernel_sizes)
    options = dict(block_kwargs)
    check_block_options(block_class, options)
    rows = []
    extra_total = 0
    for plan in plan_conversion(model, block_class, sizes, bn_free=bn_free, block_kwargs=options):
        conv = plan.conv
        converted = plan.reason is None
        extra = 0
        if converted:
            replaced = sum(p.numel() for p in conv.parameters())
            if plan.norm is not None:
                replaced += sum(p.numel() for p in plan.norm.parameters(recurse=False))
            extra = plan.block_params - replaced
            extra_total += extra
        rows.append(ConvReportRow(
            name=plan.conv_name, conv_type=type(conv).__name__, kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride), groups=conv.groups,
            norm=type(plan.norm).__name__ if plan.norm is not None else "-", converted=converted,
            reason=plan.reason or "", form=plan.form if converted else "-", extra_params=extra))
    params = sum(p.numel() for p in model.parameters())
    multiplier, shape = None, None
    if example_input is not None:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        shape = tuple(inputs[0].shape) if isinstance(inputs[0], Tensor) else None
        multiplier = _flops_multiplier(model, inputs, block_type, kernel_sizes, bn_free, block_kwargs)
    return ConversionReport(type(model).__name__, block_type.lower(), tuple(rows), params, params + extra_total,
                            multiplier, shape)


def _tensors(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _train_flops(model: nn.Module, inputs: Tuple[Any, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        outputs = [t for t in _tensors(model(*inputs)) if t.is_floating_point() and t.requires_grad]
        if outputs:
            torch.autograd.backward([t.sum() for t in outputs])
    return int(counter.get_total_flops())


def _flops_multiplier(model: nn.Module, inputs: Tuple[Any, ...], block_type: str, kernel_sizes: Iterable[int],
                      bn_free: bool, block_kwargs: Any) -> Optional[float]:
    plain = copy.deepcopy(model).eval()
    baseline = _train_flops(plain, inputs)
    del plain
    converted = copy.deepcopy(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model that converts nothing has multiplier 1, said by the rows
        convert_to_acnet(converted, block_type, kernel_sizes, bn_free=bn_free, **block_kwargs)
    trained = _train_flops(converted.eval(), inputs)
    return trained / baseline if baseline else None


def _size(values: Tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def format_report(report: ConversionReport) -> str:
    """The report as a printable table: one line per conv, then the totals."""
    header = (f"{'conv':<36} {'type':<6} {'kernel':<7} {'stride':<6} {'groups':>6} {'norm':<18} "
              f"{'block':<6} {'+params':>8}  reason kept")
    lines = [f"conversion report: {report.model}, block type {report.block_type}", header, "-" * len(header)]
    for row in report.rows:
        block = row.form if row.converted else "kept"
        lines.append(f"{row.name:<36} {row.conv_type:<6} {_size(row.kernel_size):<7} {_size(row.stride):<6} "
                     f"{row.groups:>6} {row.norm:<18} {block:<6} {row.extra_params:>8}  {row.reason}".rstrip())
    lines.append("-" * len(header))
    lines.append(f"{report.converted} of {len(report.rows)} conv(s) converted; parameters: train "
                 f"{report.params_train:,} vs deploy {report.params_deploy:,} "
                 f"({report.params_train / max(report.params_deploy, 1):.2f}x)")
    if report.train_flops_multiplier is not None:
        lines.append(f"training FLOPs (conv + matmul, forward + backward at input {report.input_shape}): "
                     f"{report.train_flops_multiplier:.2f}x the model as it is")
    else:
        lines.append("training FLOPs: pass example_input= to count them")
    return "\n".join(lines)
