"""ONNX export of a deploy model, checked every time.

:func:`export_onnx` converts a (training-time or deploy) model to its deploy form (every
:class:`~acnet.ReparamBlock` folded into one conv, on a copy: the caller's model is unchanged),
exports it with ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter; the
TorchScript exporter is deprecated) with a dynamic batch dimension, then checks the file before it
appears at ``path``:

1. ``onnx.checker.check_model(full_check=True)`` (structure and shape inference);
2. onnxruntime on the example batch against the PyTorch deploy model, float32:
   ``max |ort - torch| / max |torch| <= rtol`` (default ``1e-5``).

Only a model that passes both is renamed onto ``path`` (``acnet.fileio.atomic_path``): a failure
leaves no file. ``onnx`` and ``onnxruntime`` (the ``deploy`` extra) are imported here only;
without them :class:`MissingExtraError` says how to install them.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .errors import ACNetError, exception_line
from .fileio import atomic_path

__all__ = ["ExportError", "MissingExtraError", "ExportResult", "export_onnx", "onnx_op_counts", "require_extra",
           "DEFAULT_RTOL"]

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-5
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PathLike = Union[str, "os.PathLike[str]"]


class ExportError(ACNetError, RuntimeError):
    """The model cannot be exported, the export fails its checks, or the file cannot be written."""


class MissingExtraError(ACNetError, ImportError):
    """An optional dependency of the deploy tools is not installed."""


def require_extra(module: str, extra: str = "deploy") -> Any:
    """``importlib.import_module(module)``, or one :class:`MissingExtraError` line naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{module} is not installed: the ONNX / int8 tools need the {extra!r} extra "
            f"(pip install -e \".[{extra}]\")") from None


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    opset: int
    op_counts: Dict[str, int] = field(default_factory=dict)
    checker: str = "onnx.checker full_check passed"
    max_abs_diff: float = float("nan")
    rel_diff: float = float("nan")  # max |ort - torch| / max |torch| on the example batch
    batch_size: int = 0

    def summary(self) -> str:
        """One line: the two figures the export is checked by."""
        return (f"{self.path}: opset {self.opset}, {sum(self.op_counts.values())} nodes; {self.checker}; "
                f"onnxruntime vs PyTorch on a batch of {self.batch_size}: max abs diff {self.max_abs_diff:.3g}, "
                f"relative {self.rel_diff:.3g}")


def onnx_op_counts(model_proto: Any) -> Dict[str, int]:
    """``{op_type: count}`` of the nodes of an ``onnx.ModelProto``'s main graph (sorted by name)."""
    return dict(sorted(Counter(node.op_type for node in model_proto.graph.node).items()))


def _deploy_copy(model: nn.Module) -> nn.Module:
    from .convert import acnet_switch_to_deploy

    deploy = copy.deepcopy(model).cpu().float()
    return acnet_switch_to_deploy(deploy).eval()


#: Loggers of the exporter and its optimizer, which log every rewrite at INFO ("No unused functions to
#: remove", "PassManager: No more graph changes ...").
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _exporter_output(verbose: bool):
    """Mute the exporter's progress prints (stdout) and raise :data:`EXPORTER_LOGGERS` to WARNING meanwhile;
    ``verbose`` or a level the user set on one of those loggers keeps its output."""
    if verbose:
        yield
        return
    muted = [log for log in map(logging.getLogger, EXPORTER_LOGGERS) if log.level == logging.NOTSET]
    for log in muted:
        log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for log in muted:
            log.setLevel(logging.NOTSET)


def _to_proto(model: nn.Module, example: Tensor, opset: Optional[int], dynamic_batch: bool, verbose: bool) -> Any:
    """``torch.onnx.export(dynamo=True)`` to an in-memory ``ModelProto`` (the exporter's output muted unless
    ``verbose``)."""
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _exporter_output(verbose):
        program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=verbose, optimize=True,
                                    opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=dynamic_shapes)
    return program.model_proto


def export_onnx(model: nn.Module, example_input: Tensor, path: PathLike, *, opset: Optional[int] = None,
                dynamic_batch: bool = True, rtol: float = DEFAULT_RTOL, verbose: bool = False) -> ExportResult:
    """Export ``model``'s deploy form to ONNX at ``path``; check it (module docstring); return the figures.

    ``example_input``: a float batch the model takes (its batch size becomes dynamic when
    ``dynamic_batch``); it is also the batch onnxruntime is compared on. ``opset=None``: the
    exporter's default (recorded in the file and in :attr:`ExportResult.opset`). Raises
    :class:`ExportError` (one line) when the model does not export, fails a check or ``path`` cannot be
    written, :class:`MissingExtraError` without the ``deploy`` extra. Quiet: the exporter's progress and
    optimizer messages are muted unless ``verbose`` (or a level set on one of :data:`EXPORTER_LOGGERS`);
    the result is logged at DEBUG (callers report :meth:`ExportResult.summary` as they see fit).
    """
    onnx = require_extra("onnx")
    require_extra("onnxscript")
    ort = require_extra("onnxruntime")
    deploy = _deploy_copy(model)
    example = example_input.detach().to("cpu", torch.float32).contiguous()
    with torch.no_grad():
        expected = deploy(example).float()
    try:
        proto = _to_proto(deploy, example, opset, dynamic_batch, verbose)
    except Exception as exc:  # the exporter raises many types; the first line names the unsupported part
        raise ExportError(f"the model does not export to ONNX ({exception_line(exc, type_name=True)}); every "
                          "operation of its deploy form must be supported by torch.onnx.export(dynamo=True)") from None
    proto.producer_name = "acnet"
    opset_used = next((imp.version for imp in proto.opset_import if imp.domain in ("", "ai.onnx")), 0)
    result = ExportResult(Path(path), opset_used, onnx_op_counts(proto), batch_size=int(example.shape[0]))
    try:
        with atomic_path(path) as tmp:
            onnx.save_model(proto, tmp)
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except Exception as exc:
                raise ExportError(f"the exported graph fails onnx.checker "
                                  f"({exception_line(exc, type_name=True)})") from None
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
            actual = torch.from_numpy(session.run(None, {INPUT_NAME: example.numpy()})[0])
            if actual.shape != expected.shape:
                raise ExportError(f"onnxruntime returns shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}")
            diff = (actual - expected).abs().max().item()
            result.max_abs_diff = diff
            result.rel_diff = diff / max(expected.abs().max().item(), 1e-30)
            if not result.rel_diff <= rtol:
                raise ExportError(f"onnxruntime differs from the PyTorch deploy model by {result.rel_diff:.3g} "
                                  f"(relative; max abs {diff:.3g}) > {rtol:g}: the export is wrong")
    except OSError as exc:
        raise ExportError(f"cannot write {os.fspath(path)!r} ({exc.strerror or exc}); choose a writable "
                          "output path") from None
    logger.debug("%s", result.summary())
    return result
