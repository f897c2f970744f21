"""Deployment tools: ONNX export of a weights file, int8 post-training quantization, onnxruntime evaluation.

``do_acnet.py -a ARCH -b BLOCK --export-onnx WEIGHTS OUT.onnx [--quantize int8 --calib-images N]``:

1. WEIGHTS (any form :func:`utils.engine.evaluation.load_model_for_eval` takes) -> deploy model (training-time
   weights are converted first) -> ``acnet.export_onnx`` (checked: onnx.checker, onnxruntime vs PyTorch).
2. ``--quantize int8``: onnxruntime's static QDQ quantization (``quantize_static``: uint8 activations
   per tensor, int8 weights per output channel, int32 biases, MinMax calibration on the first N
   training images in the loader's epoch-0 order) -> ``OUT.int8.onnx``; fp32 (the ONNX model) and int8
   top-1/top-5 on the eval set go to the log and into the run's ``summary.json`` (``fp32_top1``,
   ``int8_top1``, ...): the run is the folder of WEIGHTS when it holds a ``summary.json``, else
   ``OUT.summary.json`` is written.

Everything is written atomically; onnx / onnxruntime are imported only here and in ``acnet.export``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from acnet.export import ExportError, ExportResult, export_onnx, require_extra
from acnet.fileio import atomic_path
from data import to_device
from utils.engine.evaluation import load_model_for_eval
from utils.engine.metrics import MetricSums
from utils.engine.posttrain import convert_weights

__all__ = ["require_deploy_extras", "int8_path", "export_weights", "calibration_batches", "quantize_int8",
           "evaluate_onnx"]

logger = logging.getLogger("do_acnet")

def require_deploy_extras() -> None:
    """One :class:`acnet.export.MissingExtraError` line unless onnx, onnxscript and onnxruntime import."""
    for module in ("onnx", "onnxscript", "onnxruntime", "onnxruntime.quantization"):
        require_extra(module)


def int8_path(out: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (beside it)."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    return out.with_name(stem + ".int8.onnx")


def example_batch(input_size: int, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """The fixed batch the export is checked on (normal noise, the scale of normalised images)."""
    return torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))


def export_weights(arch: str, block_type: str, weights: str | os.PathLike | Mapping[str, torch.Tensor],
                   out: str | os.PathLike, *, input_size: int, num_classes: Optional[int] = None,
                   opset: Optional[int] = None) -> tuple[nn.Module, ExportResult]:
    """Load ``weights`` for ``arch``/``block_type`` (either form), export the deploy model to ``out``.

    Returns ``(deploy model, export result)``. ``acnet.WeightsError`` for weights of another model.
    """
    model = load_model_for_eval(arch, block_type, weights, "cpu", num_classes=num_classes)
    deploy = convert_weights(model)
    return deploy, export_onnx(deploy, example_batch(input_size), out, opset=opset)


def calibration_batches(loader, num_images: int) -> list[np.ndarray]:
    """The first ``num_images`` images of ``loader`` (epoch 0 order) as float32 NCHW numpy batches."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    batches, seen = [], 0
    for images, _ in loader:
        take = min(num_images - seen, images.shape[0])
        batches.append(to_device(loader, images, "cpu")[:take].detach().to(torch.float32).contiguous().numpy())
        seen += take
        if seen >= num_images:
            break
    if not batches:
        raise ExportError("no calibration images: the training loader is empty")
    return batches


def _ort_session(path: str | os.PathLike):
    ort = require_extra("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def quantize_int8(fp32_path: str | os.PathLike, int8_out: str | os.PathLike, calibration: list[np.ndarray], *,
                  input_qparams: Optional[Mapping[str, tuple[float, int]]] = None) -> Path:
    """onnxruntime static QDQ int8 quantization of ``fp32_path`` into ``int8_out`` (atomically).

    Default (post-training): every operator onnxruntime quantizes (Conv, Gemm, Add, pools, ...), uint8
    activations calibrated by MinMax on ``calibration``, int8 per-channel symmetric weights, int32 biases.
    ``input_qparams={module name: (scale, zero_point)}`` (QAT, ``acnet.quant.activation_qparams``): only
    Conv and Gemm nodes are quantized; the input of the node whose weight is ``<module name>.weight`` gets
    the given uint8 scale / zero point, weights per channel their own max-abs scale, biases int32 with
    scale ``s_x * s_w`` (no weight-scale adjustment); outputs stay float.

    Either way the int8 weights are then stored as uint8 ``q + 128`` with zero point ``z + 128``
    (:func:`_store_weights_as_uint8`: the same real values), so that onnxruntime's fused kernels compute
    u8 x u8, which never saturates, instead of u8 x s8, which saturates on x86 CPUs without VNNI.
    """
    require_extra("onnx")
    quantization = require_extra("onnxruntime.quantization")
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    op_types = None
    try:
        with tempfile.TemporaryDirectory(prefix="acnet_quant_") as work, atomic_path(int8_out) as tmp:
            prepared = Path(work) / "prepared.onnx"
            quantization.quant_pre_process(os.fspath(fp32_path), os.fspath(prepared), skip_symbolic_shape=True)
            if input_qparams is not None:
                op_types = ["Conv", "Gemm"]
                overrides = {name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zp, np.uint8)}]
                             for name, (scale, zp) in _input_tensors(prepared, input_qparams).items()}
                extra.update(OpTypesToExcludeOutputQuantization=op_types, QDQDisableWeightAdjustForInt32Bias=True,
                             TensorQuantOverrides=overrides)
            quantization.quantize_static(
                os.fspath(prepared), tmp, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
            _store_weights_as_uint8(tmp)
    except OSError as exc:
        raise ExportError(f"cannot write {os.fspath(int8_out)!r} ({exc.strerror or exc}); choose a writable "
                          "output path") from None
    return Path(int8_out)


def _store_weights_as_uint8(path: str | os.PathLike) -> None:
    """Rewrite the int8 weights of the QDQ file ``path`` as uint8: ``q_u8 = q + 128``, ``z_u8 = z + 128``.

    ``DequantizeLinear`` computes ``s * (q - z)``, so every weight keeps its exact real value. Why: with
    default session options onnxruntime fuses ``DQ -> Conv/Gemm (-> Q)`` into QLinearConv / QGemm, and on
    x86-64 CPUs without VNNI (AVX2, AVX-512F) MLAS computes u8 x s8 with ``vpmaddubsw``, which adds two
    products ``x * w`` in a saturating int16: a uint8 activation near 255 times an int8 weight near
    +-127 (which per-channel max-abs weights always have) overflows it, and the logits drift (0.13
    relative on cfqkbnc). onnxruntime's own remedy (its ``session.x64quantprecision`` option) is this
    same conversion, off by default; its u8 x u8 kernels do not saturate (exact on full-range operands).
    Only ``DequantizeLinear`` nodes whose data and zero point are int8 initializers read by nothing else
    are changed; biases (int32) and activations (uint8) are left as they are.
    """
    onnx = require_extra("onnx")
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    converted: set[str] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        data, zero_point = (inits.get(name) for name in (node.input[0], node.input[2]))
        if (data is None or zero_point is None or data.data_type != onnx.TensorProto.INT8
                or zero_point.data_type != onnx.TensorProto.INT8
                or readers[data.name] != 1 or readers[zero_point.name] != 1):
            continue
        for init in (data, zero_point):
            shifted = (numpy_helper.to_array(init).astype(np.int16) + 128).astype(np.uint8)
            init.CopyFrom(numpy_helper.from_array(shifted, init.name))
            converted.add(init.name)
    for info in list(graph.value_info) + list(graph.input):
        if info.name in converted:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    onnx.save(model, os.fspath(path))


def _input_tensors(model_path: Path, input_qparams: Mapping[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
    """``{input tensor name: qparams}`` of the Conv/Gemm nodes whose weight is ``<module>.weight``."""
    onnx = require_extra("onnx")
    graph = onnx.load(os.fspath(model_path), load_external_data=False).graph
    by_weight = {node.input[1]: node.input[0] for node in graph.node if node.op_type in ("Conv", "Gemm")}
    missing = [name for name in input_qparams if f"{name}.weight" not in by_weight]
    if missing:
        raise ExportError(f"the ONNX graph has no Conv/Gemm with weight {missing[0]}.weight (of {len(missing)} "
                          "quantized modules): the QAT model and its export disagree")
    tensors: dict[str, tuple[float, int]] = {}
    for name, qparams in input_qparams.items():
        tensor = by_weight[f"{name}.weight"]
        if tensors.setdefault(tensor, qparams) != qparams:  # two convs reading one tensor saw the same values
            logger.warning("tensor %s: QAT input ranges of its readers differ (%s vs %s); using the first",
                           tensor, tensors[tensor], qparams)
    return tensors


def evaluate_onnx(path: str | os.PathLike, loader) -> dict[str, float]:
    """Cross-entropy ``loss``, ``top1``/``top5`` (percent), ``num_samples`` of an ONNX model (onnxruntime, CPU)."""
    session = _ort_session(path)
    name = session.get_inputs()[0].name
    sums = MetricSums(torch.device("cpu"))
    for images, labels in loader:
        logits = torch.from_numpy(session.run(None, {name: to_device(loader, images, "cpu").float().numpy()})[0])
        labels = labels.to("cpu")
        sums.update(F.cross_entropy(logits, labels), logits, labels)
    return sums.read()
