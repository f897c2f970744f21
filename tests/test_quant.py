"""QAT on the equivalent kernel (acnet.quant, utils.modes.qat, do_acnet.py --qat): the fake quantization maths,
straight-through gradients through every branch, frozen BN statistics, int8-representable converted
kernels, and an int8 onnxruntime model that computes what the QAT model computes."""
from __future__ import annotations

import json
import shutil

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import constructor
import do_acnet
from acnet import ACBlock, ConvBN, DiverseBranchBlock, load_hdf5
from acnet.norms import FrozenBatchNorm
from acnet.quant import (INT8_MAX, ActivationQuantizer, QATUnit, activation_qparams, convert_qat,
                         fake_quantize, prepare_qat, qat_units, weight_scale)
from helpers import mild_bn_statistics_


@given(st.integers(1, 6), st.integers(1, 4), st.sampled_from([1, 3]), st.integers(0, 2 ** 31 - 1),
       st.floats(1e-3, 1e3))
def test_weight_fake_quantization_is_int8_per_output_channel(out_ch, in_ch, k, seed, magnitude):
    kernel = torch.randn(out_ch, in_ch, k, k, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64) * magnitude
    scale = weight_scale(kernel)
    q = fake_quantize(kernel, scale, torch.zeros((), dtype=kernel.dtype), -INT8_MAX, INT8_MAX)
    levels = q / scale  # integers up to the rounding of q = level * scale
    assert torch.allclose(levels, levels.round(), rtol=0, atol=1e-9)
    assert levels.round().abs().max() <= INT8_MAX
    assert torch.equal(levels.round().abs().flatten(1).amax(1), torch.full((out_ch,), float(INT8_MAX),
                                                                            dtype=kernel.dtype))
    assert ((q - kernel).abs() <= scale / 2 + 1e-12 * magnitude).all()


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    v = torch.tensor([-3.0, -0.4, 0.0, 0.7, 2.4, 9.0], requires_grad=True)
    out = fake_quantize(v, torch.tensor(0.01), torch.tensor(128.0), 0, 255)  # range [-1.28, 1.27]
    out.sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert out[0].item() == pytest.approx(-1.28) and out[-1].item() == pytest.approx(1.27)


def test_activation_range_follows_onnxruntime_rule():
    aq = ActivationQuantizer(momentum=0.5).train()
    aq(torch.tensor([0.5, 2.0]))  # first batch sets the range; rmin is clamped to 0
    scale, zp = aq.qparams()
    assert scale.item() == pytest.approx(2.0 / 255) and zp.item() == 0
    aq(torch.tensor([-1.0, 1.0]))  # running average of [0.5, 2] and [-1, 1]: [-0.25, 1.5]
    scale, zp = aq.qparams()
    assert scale.item() == pytest.approx(1.75 / 255) and zp.item() == round(0.25 / (1.75 / 255))
    before = (aq.min_val.clone(), aq.max_val.clone())
    aq.eval()(torch.tensor([-50.0, 50.0]))  # eval: frozen
    assert torch.equal(aq.min_val, before[0]) and torch.equal(aq.max_val, before[1])


@pytest.mark.parametrize("make", [
    lambda: ACBlock(4, 6, 3, padding=1, gamma_init=1 / 3),
    lambda: DiverseBranchBlock(4, 6, 3),
    lambda: ConvBN(4, 6, 3, padding=1),
    lambda: ACBlock(4, 6, 3, stride=2, padding=1),
])
def test_qat_unit_is_the_quantized_equivalent_conv_and_trains_every_branch(make):
    torch.manual_seed(0)
    block = mild_bn_statistics_(make(), 1)
    bn_state = {k: v.clone() for k, v in block.state_dict().items() if "running" in k}
    unit = QATUnit(block).train()
    x = torch.randn(3, 4, 8, 8)
    y = unit(x)  # training mode: observes the range, batch statistics are NOT used
    y.square().sum().backward()
    for key, value in block.state_dict().items():
        if key in bn_state:
            assert torch.equal(value, bn_state[key]), f"{key} changed: BN statistics must stay frozen"
    trained = [name for name, p in block.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(trained) == len(list(block.parameters())), f"no gradient for some branch parameters: {trained}"
    unit.eval()
    with torch.no_grad():
        scale, zp = unit.input_quant.qparams()
        xq = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
        kernel, bias = block.get_equivalent_kernel_bias()
        s_w = weight_scale(kernel)
        kq = torch.clamp(torch.round(kernel / s_w), -127, 127) * s_w
        bq = torch.round(bias / (scale * s_w.flatten())) * scale * s_w.flatten()
        expected = F.conv2d(xq, kq, bq, block.stride, block.padding, block.dilation, block.groups)
        torch.testing.assert_close(unit(x), expected, rtol=0, atol=1e-6)
        deploy = unit.deploy_module()
        assert torch.equal(deploy.weight, kq) and torch.equal(deploy.bias, bias)


def test_prepare_qat_freezes_standalone_bns_and_convert_gives_the_arch_deploy_model():
    model = prepare_qat(mild_bn_statistics_(constructor.build_model("wrnc16plain", "acb"), 0))
    assert any(isinstance(m, FrozenBatchNorm) and m.trainable_affine for m in model.modules())
    units = tuple(f"{name}." for name in qat_units(model))
    loose = [name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d and not name.startswith(units)]
    assert not loose  # every BN is frozen or inside a unit (where only its running statistics are read)
    model.train()(torch.randn(2, 3, 32, 32))
    deploy = convert_qat(model)
    reference = constructor.build_model("wrnc16plain", "acb", deploy=True)
    assert {k: v.shape for k, v in deploy.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    for name, unit in qat_units(model).items():
        weight = deploy.get_submodule(name).weight
        levels = weight / weight_scale(weight)
        assert torch.allclose(levels, levels.round(), atol=1e-4), name


@pytest.mark.parametrize("affine", [True, False])
def test_a_frozen_bn_computes_its_batchnorm_in_eval_mode_learns_its_affine_and_gives_it_back(affine):
    bn = nn.BatchNorm2d(6, eps=1e-3, momentum=0.3, affine=affine)
    bn.train()(torch.randn(8, 6, 5, 5) * 3 + 1)  # running statistics away from (0, 1)
    frozen = FrozenBatchNorm.from_batch_norm(bn).train()
    assert list(frozen.state_dict()) == list(bn.state_dict())
    x = torch.randn(4, 6, 5, 5)
    assert torch.equal(frozen(x), bn.eval()(x))  # exactly the BN's eval mode, in training too
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen(x.clone().requires_grad_()).sum().backward()
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in before.items())  # statistics never move
    assert [n for n, p in frozen.named_parameters() if p.grad is not None] == (["weight", "bias"] if affine else [])
    back = frozen.eval().to_batch_norm()
    assert type(back) is nn.BatchNorm2d and (back.eps, back.momentum, back.affine) == (1e-3, 0.3, affine)
    assert not back.training and torch.equal(back(x), frozen(x))


@pytest.mark.parametrize("block_type", ["acb", "dbb"])
def test_int8_onnx_model_computes_what_the_qat_model_computes(block_type, tmp_path):
    """A few QAT steps on cfqkbnc, convert, export, int8 with the QAT scales: onnxruntime == PyTorch QAT."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from acnet.export import export_onnx
    from utils.engine.deploy import calibration_batches, quantize_int8

    torch.manual_seed(0)
    model = prepare_qat(mild_bn_statistics_(constructor.build_model("cfqkbnc", block_type), 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    model.train()
    for step in range(3):
        batch = slice(16 * step, 16 * step + 16)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    deploy = convert_qat(model)
    export_onnx(deploy, images[:4], tmp_path / "m.onnx")
    loader = [(images[:32], labels[:32])]
    int8 = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", calibration_batches(loader, 32),
                         input_qparams=activation_qparams(model))
    # the int8 file quantizes exactly what the QAT model fake-quantizes, with the same scales
    graph = onnx.load(int8).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize_of = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    dequantized_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    qparams = activation_qparams(model)
    for name, unit in qat_units(model).items():
        (node,) = [n for n in graph.node if n.op_type in ("Conv", "Gemm") and
                   dequantized_from.get(n.input[1]) == f"{name}.weight_quantized"]
        q = quantize_of[dequantized_from[node.input[0]]]
        assert (float(inits[q.input[1]]), int(inits[q.input[2]])) == qparams[name], name
        kernel = deploy.get_submodule(name).weight.detach()
        stored, zero_point = inits[f"{name}.weight_quantized"], inits[f"{name}.weight_zero_point"]
        assert stored.dtype == np.uint8 and np.array_equal(zero_point, np.full(kernel.shape[0], 128, np.uint8))
        levels = stored.astype(np.int64) - zero_point.astype(np.int64).reshape(-1, *[1] * (stored.ndim - 1))
        assert np.array_equal(levels, (kernel / weight_scale(kernel)).round().numpy())
        np.testing.assert_allclose(inits[f"{name}.weight_scale"], weight_scale(kernel).flatten().numpy(), rtol=1e-6)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == len(qparams)
    # and computes the same logits, up to activations that land on the other side of a rounding step
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        expected = model(images)
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < 2e-2, error
    assert (actual.argmax(1) == expected.argmax(1)).sum() >= 62


def _saturating_linear_model() -> nn.Module:
    """Conv -> ReLU -> Linear whose last layer saturates a u8 x s8 kernel's int16 pair sums.

    Inputs in [0, 1] calibrate to uint8 levels up to 255 and every Linear weight lies in [0.5, 1] (int8
    levels 64..127 per row), so two adjacent products ``x_q * w_q`` can reach 2 * 255 * 127 > 32767.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.0)
        model[0].bias.zero_()
        model[3].weight.uniform_(0.5, 1.0)
        model[3].bias.uniform_(-1.0, 1.0)
    return model.eval()


def test_ptq_int8_file_computes_the_same_with_default_and_disabled_graph_optimizations(tmp_path):
    """Regression: default sessions fuse DQ -> Gemm/Conv into QGemm / QLinearConv, whose u8 x s8 kernel
    saturates on x86 without VNNI; the int8 file stores uint8 weights (zero point 128), so the fused
    model computes what the unfused one computes, and what the float model computes within int8 noise."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from acnet.export import export_onnx
    from utils.engine.deploy import quantize_int8

    model = _saturating_linear_model()
    images = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    images[0] = 1.0  # the calibrated range reaches 255 at the input
    export_onnx(model, images[:4], tmp_path / "m.onnx")
    int8 = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [images.numpy()])
    graph = onnx.load(int8).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                  and inits[n.input[0]].ndim >= 2]
    assert len(weight_dqs) == 2
    for node in weight_dqs:
        assert inits[node.input[0]].dtype == np.uint8 and (inits[node.input[2]] == 128).all(), node.input[0]
        assert np.abs(inits[node.input[0]].astype(np.int64) - 128).max() == 127  # per-channel max-abs levels

    disabled = ort.SessionOptions()
    disabled.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    default = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "QGemm" for n in _optimized_graph(int8, tmp_path).node)  # the fused kernel ran
    fused = default.run(None, {"input": images.numpy()})[0]
    unfused = ort.InferenceSession(str(int8), disabled, providers=["CPUExecutionProvider"]).run(
        None, {"input": images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(fused - unfused).max() / np.abs(unfused).max() < 1e-3
    assert np.abs(fused - expected).max() / np.abs(expected).max() < 2e-2


def _optimized_graph(path, tmp_path):
    """The graph onnxruntime runs with default session options (its optimized model, saved)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def test_cli_qat_int8_top1_equals_the_qat_models(quickstart_run, tmp_path, capsys):
    run = shutil.copytree(quickstart_run, tmp_path / "run")
    args = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--workers", "0", "--no-progress",
            "--qat", "--init-weights", run / "finish.hdf5", "--epochs", "1", "--synthetic-num-train", "256",
            "--batch-size", "64", "--calib-images", "64", "--output-dir", tmp_path / "exps"]
    do_acnet.main(args)
    qat_dir = tmp_path / "exps" / "cfqkbnc_acb_synthetic_qat"
    summary = json.loads((qat_dir / "summary.json").read_text())
    assert abs(summary["int8_top1"] - summary["qat_top1"]) <= 100 / summary["eval_images"] + 1e-9
    assert summary["onnx_rel_diff"] <= 1e-5
    for key in ("qat_top5", "fp32_top1", "fp32_top5", "int8_top5"):
        assert 0 <= summary[key] <= 100
    deploy = load_hdf5(qat_dir / "finish_deploy.hdf5")
    reference = constructor.build_model("cfqkbnc", "acb", deploy=True)
    reference.load_state_dict(deploy)  # the arch's plain deploy model
    for name in ("conv1.conv", "conv2.conv", "conv3.conv", "fc1", "fc2"):
        weight = deploy[f"{name}.weight"]
        levels = weight / weight_scale(weight)
        assert np.allclose(levels, levels.round(), atol=1e-4), name
    assert (qat_dir / "model.int8.onnx").is_file()
    assert "int8 (model.int8.onnx, onnxruntime) acc1" in (qat_dir / "log.txt").read_text()
    # a derived run: its record says so, it held its folder and recorded its end
    assert json.loads((qat_dir / "recipe.json").read_text())["kind"] == "qat"
    assert json.loads((qat_dir / "run_state.json").read_text())["state"] == "finished"


def test_cli_qat_with_weights_of_another_block_type_is_one_line(quickstart_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        do_acnet.main(["-a", "cfqkbnc", "-b", "dbb", "--dataset", "synthetic", "--workers", "0", "--qat",
                       "--init-weights", quickstart_run / "finish.hdf5", "--epochs", "1",
                       "--output-dir", tmp_path / "exps"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-weights" in err[0]
