"""OREPABlock: the merged kernel against the original's formulas, exact eval-mode fusion, names, init."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet import OREPABlock, acnet_fuse_and_load, acnet_switch_to_deploy, convert_to_acnet
from acnet.block import ReparamBlock
from acnet.orepa import OREPA_INITIAL_SCALES
from helpers import gradcheck_equivalent_kernel, randomize_, relative_difference


def original_weight_gen(block: OREPABlock) -> torch.Tensor:
    """The original ``OREPA.weight_gen`` formulas (einsum per branch, its ``dwsc2full`` layout)."""
    v, k, g = block.vector, block.kernel_size, block.groups
    kernel = torch.einsum("oihw,o->oihw", block.weight_orepa_origin, v[0])
    kernel = kernel + torch.einsum("oihw,o->oihw", torch.einsum(
        "oi,hw->oihw", block.weight_orepa_avg_conv[:, :, 0, 0], block.weight_orepa_avg_avg), v[1])
    kernel = kernel + torch.einsum("oihw,o->oihw", torch.einsum(
        "oi,ohw->oihw", block.weight_orepa_pfir_conv[:, :, 0, 0], block.weight_orepa_prior), v[2])
    first = (block.weight_orepa_1x1_kxk_idconv1 + block.id_tensor)[:, :, 0, 0]
    second = block.weight_orepa_1x1_kxk_conv2
    t, ig = first.shape
    o, tg, h, w = second.shape
    merged = torch.einsum("gti,gothw->goihw", first.view(g, t // g, ig), second.view(g, o // g, tg, h, w))
    kernel = kernel + torch.einsum("oihw,o->oihw", merged.reshape(o, ig, h, w), v[3])
    kernel = kernel + torch.einsum("oihw,o->oihw", F.pad(block.weight_orepa_1x1, [k // 2] * 4), v[4])
    dw, pw = block.weight_orepa_gconv_dw, block.weight_orepa_gconv_pw
    c = block.in_channels
    dw = dw.view(g, c // g, dw.shape[0] // c, 1, k, k)
    pw = pw.reshape(o // g, g, c // g, dw.shape[2])
    dwpw = torch.einsum("cgtihw,ocgt->cogihw", dw, pw).reshape(o, c // g, k, k)
    return kernel + torch.einsum("oihw,o->oihw", dwpw, v[5])


def randomize_orepa_(block: OREPABlock, seed: int) -> OREPABlock:
    """Random branch weights and scales (the prior's 0 and the 1x1-KxK's zero start are not exercised) and BN."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return randomize_(block, seed + 1)


@st.composite
def orepa_cases(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    groups, cin, cout = draw(st.sampled_from([(1, 2, 3), (1, 3, 3), (2, 4, 2), (2, 2, 4), (2, 4, 8), (3, 3, 3),
                                              (3, 6, 9), (4, 4, 4), (4, 8, 4)]))
    internal = draw(st.sampled_from([None, cin, 2 * groups, 3 * groups]))
    padding = draw(st.integers(0, dilation * (k // 2) + 1))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    reach = dilation * (k - 1) + 1
    low = max(reach - 2 * padding, 1, padding + 1)
    h = draw(st.integers(low, low + 6))
    w = draw(st.integers(low, low + 6))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    seed = draw(st.integers(0, 2**16))
    return dict(k=k, stride=stride, dilation=dilation, groups=groups, cin=cin, cout=cout, internal=internal,
                padding=padding, mode=mode, h=h, w=w, eps=eps, seed=seed)


def build(case, dtype=torch.float64, nonlinear=None):
    block = OREPABlock(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                       case["groups"], internal_channels_1x1_3x3=case["internal"], nonlinear=nonlinear,
                       padding_mode=case["mode"], bn_eps=case["eps"])
    randomize_orepa_(block.double(), case["seed"]).to(dtype).eval()
    x = torch.randn(2, case["cin"], case["h"], case["w"], generator=torch.Generator().manual_seed(case["seed"] + 2),
                    dtype=torch.float64).to(dtype)
    return block, x


def reference_forward(block: OREPABlock, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x; original_weight_gen))`` with a plain ``nn.Conv2d`` of the block's geometry."""
    conv = nn.Conv2d(block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding,
                     block.dilation, block.groups, bias=False, padding_mode=block.padding_mode).to(x.dtype)
    with torch.no_grad():
        conv.weight.copy_(original_weight_gen(block))
    return block.nonlinear(block.bn(conv(x)))


@settings(max_examples=30)
@given(orepa_cases())
def test_eval_forward_equals_the_original_kernel_formulas_forward(case):
    # deploy == training form for every block type: tests/test_block_contract.py
    block, x = build(case)
    torch.testing.assert_close(block(x), reference_forward(block, x), rtol=1e-10, atol=1e-10)


@settings(max_examples=15)
@given(orepa_cases())
def test_merged_kernel_gradients_equal_autograd_of_the_original_formulas(case):
    block, _ = build(case)
    params = [p for n, p in block.named_parameters() if not n.startswith("bn.")]
    upstream = torch.randn(block.weight_gen().shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(case["seed"]))
    ours = torch.autograd.grad((block.weight_gen() * upstream).sum(), params)
    theirs = torch.autograd.grad((original_weight_gen(block) * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_large_ungrouped_product_path_matches_the_formulas():
    """From 128 channels the 1x1-KxK product runs as a conv: same kernel, same gradients."""
    block = randomize_orepa_(OREPABlock(128, 136, 3).double(), 3)
    params = [p for n, p in block.named_parameters() if not n.startswith("bn.")]
    ours, theirs = block.weight_gen(), original_weight_gen(block)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-9)
    upstream = torch.randn(ours.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((ours * upstream).sum(), params),
                    torch.autograd.grad((theirs * upstream).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)


def test_equivalent_kernel_passes_gradcheck():
    block = randomize_orepa_(OREPABlock(2, 4, 3, groups=2, internal_channels_1x1_3x3=4).double(), 5).eval()
    names = gradcheck_equivalent_kernel(block)
    assert "vector" in names and "weight_orepa_gconv_pw" in names


def test_training_step_uses_batch_statistics_and_updates_every_branch():
    torch.manual_seed(0)
    block = OREPABlock(4, 6, 3, padding=1)
    with torch.no_grad():
        block.vector[2].fill_(0.1)  # the prior branch starts at 0 (the original's): give it a gradient
    x = torch.randn(8, 4, 6, 6)
    out = block.train()(x)
    expected = F.batch_norm(F.conv2d(x, original_weight_gen(block), padding=1), None, None,
                            block.bn.weight, block.bn.bias, training=True, eps=block.bn.eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert block.bn.num_batches_tracked.item() == 1


def test_channels_last_training_step_matches_the_contiguous_one():
    """A channels_last input makes the conv return an NHWC-strided kernel gradient."""
    torch.manual_seed(0)
    block = OREPABlock(8, 8, 3, padding=1).double()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        block.zero_grad()
        block(x.contiguous(memory_format=layout)).square().sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_structure_names_initial_values_and_buffers_match_the_original():
    block = OREPABlock(8, 16, 3, padding=1)
    keys = set(block.state_dict())
    for key in ("weight_orepa_origin", "weight_orepa_avg_conv", "weight_orepa_pfir_conv", "weight_orepa_avg_avg",
                "weight_orepa_1x1", "weight_orepa_1x1_kxk_idconv1", "id_tensor", "weight_orepa_1x1_kxk_conv2",
                "weight_orepa_gconv_dw", "weight_orepa_gconv_pw", "vector", "weight_orepa_prior",
                "bn.weight", "bn.running_mean"):
        assert key in keys, key
    assert isinstance(block, ReparamBlock)
    assert block.weight_orepa_gconv_dw.shape == (64, 1, 3, 3) and block.weight_orepa_gconv_pw.shape == (16, 64, 1, 1)
    for row, value in enumerate(OREPA_INITIAL_SCALES):
        assert torch.all(block.vector[row] == value)
    assert torch.all(block.weight_orepa_1x1_kxk_idconv1 == 0)
    torch.testing.assert_close(block.weight_orepa_avg_avg, torch.full((3, 3), 1 / 9))
    prior = block.weight_orepa_prior
    assert prior[0, 0, 1] == pytest.approx(math.cos(math.pi * 0.5 / 3))  # the original's loop, row wave
    assert prior[9, 2, 0] == pytest.approx(math.cos(math.pi * 0.5 * 2 / 3))  # column wave, frequency 2
    scaled = OREPABlock(8, 16, 3, padding=1, init_hyper_gamma=4.0)
    assert torch.all(scaled.vector[3] == 1.0)
    # more than 4 groups: 2x internal channels, the identity repeated over them
    wide = OREPABlock(8, 8, 3, padding=1, groups=8)
    assert wide.weight_orepa_1x1_kxk_idconv1.shape == (16, 1, 1, 1) and torch.all(wide.id_tensor == 1)


def test_single_init_block_is_a_plain_conv_bn():
    block = randomize_orepa_(OREPABlock(3, 4, 3, padding=1).double(), 6)
    block.single_init()
    block.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), block.bn(F.conv2d(x, block.weight_orepa_origin, padding=1)))


def test_switch_to_deploy_is_in_place_idempotent_and_keeps_nonlinear():
    block, x = build(dict(k=3, stride=2, dilation=1, groups=2, cin=4, cout=4, internal=None, padding=1,
                          mode="zeros", h=7, w=6, eps=1e-5, seed=9), nonlinear=nn.ReLU())
    expected = block(x)
    block.switch_to_deploy()
    block.switch_to_deploy()
    assert set(dict(block.named_children())) == {"nonlinear", "orepa_reparam"}
    assert set(block.state_dict()) == {"orepa_reparam.weight", "orepa_reparam.bias"}
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    deployed = OREPABlock(4, 4, 3, 2, 1, groups=2, deploy=True, nonlinear=nn.ReLU()).double()
    deployed.load_state_dict(block.state_dict(), strict=True)
    torch.testing.assert_close(deployed(x), expected, rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match="deployed"):
        block.weight_gen()


def test_bf16_autocast_builds_the_kernel_in_float32():
    block = OREPABlock(4, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = block.weight_gen()
        out = block(torch.randn(2, 4, 5, 5))
    assert kernel.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(kernel, original_weight_gen(block))


@pytest.mark.parametrize("bad, message", [
    (dict(kernel_size=0), "kernel_size must be an int >= 1"),
    (dict(internal_channels_1x1_3x3=3, groups=2), "multiple of groups"),
    (dict(init_hyper_gamma=-1.0), "init_hyper_gamma"),
])
def test_bad_arguments_raise_one_clear_error(bad, message):
    arguments = {**dict(in_channels=4, out_channels=4, kernel_size=3), **bad}
    with pytest.raises(ValueError, match=message):
        OREPABlock(**arguments)


def test_conversion_of_a_torchvision_model_and_fuse_and_load_into_the_baseline():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    model = convert_to_acnet(torchvision.models.resnet18(num_classes=10), "orepa")
    assert sum(isinstance(m, OREPABlock) for m in model.modules()) == 20  # every conv: OREPA has 7x7 and 1x1 forms
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, OREPABlock):  # every branch in play, not only the initial values
                m.vector.uniform_(0.2, 1.0)
                m.weight_orepa_1x1_kxk_idconv1.normal_(0, 0.1)
        model.train()(torch.randn(4, 3, 32, 32))  # running statistics of real batches
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        loaded = acnet_fuse_and_load(base, model.state_dict())
        assert relative_difference(loaded(x), expected) <= 1e-5
        deployed = acnet_switch_to_deploy(model)
        assert not any(isinstance(m, OREPABlock) for m in deployed.modules())
        assert relative_difference(deployed(x), expected) <= 1e-5


def test_keep_weights_conversion_starts_as_the_trained_pair():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_(torchvision.models.resnet18(num_classes=10), 3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        converted = convert_to_acnet(model, "orepa", keep_weights=True).eval()
        assert relative_difference(converted(x), expected) <= 1e-5


def test_orepa_run_learns_like_base_and_its_deploy_model_scores_the_same(tmp_path):
    """End to end through do_acnet.py on the learnable synthetic set: train, convert, evaluate both."""
    import json

    import do_acnet

    scores = {}
    for block in ("base", "orepa"):
        do_acnet.main(["-a", "cfqkbnc", "-b", block, "--dataset", "synthetic", "--synthetic-num-train", "384",
                       "--synthetic-num-val", "200", "--epochs", "3", "--batch-size", "64", "--workers", "0",
                       "--no-progress", "--output-dir", str(tmp_path)])
        summary = json.loads((tmp_path / f"cfqkbnc_{block}_synthetic_train" / "summary.json").read_text())
        assert summary["deploy_top1"] == summary["train_top1"], summary  # the deploy model is the same function
        assert summary["max_abs_logit_diff"] < 1e-3
        scores[block] = summary["train_top1"]
    assert scores["base"] > 50 and scores["orepa"] > 50  # 10 classes: chance is 10 %
    assert abs(scores["orepa"] - scores["base"]) < 35, scores
