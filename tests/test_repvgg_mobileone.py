"""RepVGG and MobileOne blocks: the papers' rules, the forms with an identity branch, and the originals.

The registry-wide contract (every form, float64 exactness, stored_options, keep_weights) runs over these
types in ``test_block_contract.py`` and the crash sweep in ``test_block_sweep.py``; here: what is particular
to the family -- the identity branch (only where in == out and stride 1), MobileOne's ``k`` and its scale
branch (only for K > 1), the centre alignment for any padding -- and the original repositories' blocks:
committed state dicts and outputs of the original code (``tests/data/originals/``, loads on a plain clone)
and the original code itself, run live where it is present (``tests/reparam_originals.py``).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from acnet import MobileOneBlock, RepVGGBlock, acnet_fuse_and_load, convert_to_acnet, get_block_type
from acnet.norms import ChannelAffine, FrozenBatchNorm
from helpers import gradcheck_equivalent_kernel, randomize_all_, relative_difference
from reparam_originals import CASES, DATA, ORIGINALS, case_input, original_block, original_module

CLASSES = {"repvgg": RepVGGBlock, "mobileone": MobileOneBlock}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def our_block(family: str, arguments: dict, **extra) -> nn.Module:
    """Ours, built from the original's constructor arguments (its ReLU as our ``nonlinear``)."""
    return CLASSES[family](**arguments, nonlinear=nn.ReLU(), **extra).double()


# --- the papers' rules ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(CLASSES))
def test_identity_branch_only_where_in_equals_out_and_stride_is_1(family):
    cls = CLASSES[family]
    identity = cls.identity_name
    assert getattr(cls(8, 8, 3), identity) is not None
    assert getattr(cls(8, 8, 3, groups=8), identity) is not None  # depthwise: a grouped identity kernel
    assert getattr(cls(8, 8, 3, stride=2), identity) is None
    assert getattr(cls(8, 16, 3), identity) is None
    assert getattr(cls(8, 8, 3, stride=(1, 2)), identity) is None
    for stride in (1, 2):
        assert not any(n.startswith(identity) for n in cls(8, 16, 3, stride=stride).state_dict())


def test_mobileone_k_branches_and_a_scale_branch_only_for_kernels_larger_than_1x1():
    block = MobileOneBlock(8, 8, 3, num_conv_branches=4)
    assert len(block.rbr_conv) == 4 and block.rbr_scale is not None and block.rbr_skip is not None
    pointwise = MobileOneBlock(8, 16, 1, num_conv_branches=2)
    assert pointwise.rbr_scale is None and pointwise.rbr_skip is None and len(pointwise.rbr_conv) == 2
    assert MobileOneBlock(8, 8, (1, 3)).rbr_scale is not None  # larger than 1x1 on one axis
    assert MobileOneBlock.stored_options(block.state_dict(), 8) == {"num_conv_branches": 4}
    assert MobileOneBlock.stored_options(MobileOneBlock(4, 4, 3, dim=3, norm="none").state_dict(), 4) == \
        {"dim": 3, "norm": "none"}
    with pytest.raises(ValueError, match="positive int"):
        MobileOneBlock(8, 8, 3, num_conv_branches=0)


def test_repvgg_refuses_a_1x1_kernel_with_one_reason():
    reason = RepVGGBlock.unsupported(dim=2, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                     groups=1, padding_mode="zeros", norm="batch")
    assert "would duplicate the kernel" in reason
    with pytest.raises(ValueError, match="would duplicate the kernel"):
        RepVGGBlock(4, 4, 1)


def test_the_registry_names_the_papers():
    assert get_block_type("repvgg").block_class is RepVGGBlock and "RepVGG" in get_block_type("repvgg").paper
    assert get_block_type("mobileone").block_class is MobileOneBlock
    assert get_block_type("mobileone").deploy_conv_name == "reparam_conv"
    assert get_block_type("repvgg").deploy_conv_name == "rbr_reparam"


# --- forms with the identity branch (in == out, stride 1) ----------------------------------------------
IDENTITY_FORMS = [
    dict(dim=2, norm="batch", kernel_size=3), dict(dim=2, norm="batch", kernel_size=3, padding=0),
    dict(dim=2, norm="batch", kernel_size=4, padding=2, padding_mode="circular", dilation=2),
    dict(dim=2, norm="batch", kernel_size=(1, 5), padding=(0, 1), padding_mode="reflect"),
    dict(dim=2, norm="frozen", kernel_size=3, groups=4), dict(dim=1, norm="none", kernel_size=5),
    dict(dim=3, norm="frozen", kernel_size=(1, 3, 3)), dict(dim=2, norm="none", kernel_size=3, bias=False),
    dict(dim=2, norm="batch", kernel_size=3, transposed=True), dict(dim=2, norm="none", kernel_size=4,
                                                                   padding=1, transposed=True, dilation=2,
                                                                   output_padding=1),
]


def form_id(form: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in form.items()).replace(" ", "")


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("form", IDENTITY_FORMS, ids=form_id)
def test_identity_forms_train_and_equal_their_deploy_conv_float64(family, form):
    extra = dict(num_conv_branches=2) if family == "mobileone" else {}
    block = randomize_all_(CLASSES[family](4, 4, **form, **extra).double(), 3)
    assert block._identity_norm() is not None
    if form["norm"] != "batch":
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in block.modules())
        assert isinstance(block._identity_norm(), ChannelAffine)
        assert isinstance(block.main_branch()[1], FrozenBatchNorm if form["norm"] == "frozen" else ChannelAffine)
    x = torch.randn(2, 4, *(7,) * form["dim"], dtype=torch.float64)
    block.train()
    block(x).sin().sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    block.eval()
    with torch.no_grad():
        expected = block(x)
        conv = block.make_deploy_conv()
        assert relative_difference(conv(x), expected) <= 1e-10
        block.switch_to_deploy()
        assert relative_difference(block(x), expected) <= 1e-10
        assert set(dict(block.named_children())) == {block.deploy_conv_name, "nonlinear"}


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("norm", ["batch", "frozen", "none"])
def test_keep_weights_starts_as_the_pretrained_pair_and_every_new_branch_learns(family, norm):
    extra = dict(num_conv_branches=3) if family == "mobileone" else {}
    block = randomize_all_(CLASSES[family](4, 4, 3, norm=norm, **extra).double(), 5)
    conv = randomize_all_(nn.Conv2d(4, 4, 3, padding=1).double(), 6)
    follower = None if norm == "none" else randomize_all_(
        (FrozenBatchNorm(4) if norm == "frozen" else nn.BatchNorm2d(4)).double(), 7).eval()
    block.load_main_branch(conv.weight, conv.bias, follower)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x) if follower is None else follower(conv(x))
        assert relative_difference(block.eval()(x), expected) <= 1e-10
        assert relative_difference(block.make_deploy_conv()(x), expected) <= 1e-10
    weight, main_norm = block.main_branch()
    main = {id(weight)} | {id(p) for p in main_norm.parameters()}
    new = {n: p for n, p in block.named_parameters() if id(p) not in main}
    assert any(".running" not in n and n.startswith(block.identity_name) for n in new)
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    block.train()
    for step in range(2):
        opt.zero_grad()
        block(x).sin().sum().backward()
        if step == 1:
            silent = [n for n, p in new.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, silent
        opt.step()


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("form", [dict(norm="batch"), dict(norm="frozen", dim=3), dict(norm="none", dim=1),
                                  dict(norm="none", transposed=True, stride=1, bias=False)], ids=form_id)
def test_equivalent_kernel_passes_gradcheck(family, form):
    extra = dict(num_conv_branches=2) if family == "mobileone" else {}
    block = randomize_all_(CLASSES[family](2, 2, 3, **form, **extra).double(), 4)
    names = gradcheck_equivalent_kernel(block)
    assert len(names) == len(list(block.parameters())) and any(n.startswith(block.identity_name) for n in names)


@pytest.mark.parametrize("family", list(CLASSES))
def test_plug_in_converts_any_model_and_folds_back_exactly(family):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
    fresh = copy.deepcopy(model)
    convert_to_acnet(model, family)
    blocks = [m for m in model.modules() if isinstance(m, CLASSES[family])]
    assert len(blocks) == (2 if family == "repvgg" else 3)  # MobileOne takes the pointwise 1x1 too
    x = torch.randn(2, 3, 8, 8)
    model.train()
    model(x).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(acnet_fuse_and_load(fresh, model.state_dict())(x), model(x), rtol=1e-5, atol=1e-5)


# --- the original repositories' blocks -----------------------------------------------------------------
def committed(family: str) -> dict:
    return torch.load(DATA / f"{family}_blocks.pt", weights_only=True)


@pytest.mark.parametrize("family", list(CLASSES))
def test_the_committed_key_lists_are_the_original_state_dicts_and_ours(family):
    keys = json.loads((DATA / f"{family}_keys.json").read_text())
    data = committed(family)
    assert keys["commit"] == data["commit"] and set(keys["cases"]) == set(CASES[family])
    for case, record in data["cases"].items():
        assert list(record["state_dict"]) == keys["cases"][case]["train"]
        assert list(record["deploy_state_dict"]) == keys["cases"][case]["deploy"]
        ours = our_block(family, record["arguments"])
        assert list(ours.state_dict()) == keys["cases"][case]["train"]  # same names, same order
        deployed = our_block(family, record["arguments"], deploy=True)
        assert list(deployed.state_dict()) == keys["cases"][case]["deploy"]


@pytest.mark.parametrize("family", list(CLASSES))
def test_the_original_blocks_load_into_ours_and_compute_the_same_train_eval_and_deploy(family):
    for case, record in committed(family)["cases"].items():
        ours = our_block(family, record["arguments"])
        ours.load_state_dict(record["state_dict"], strict=True)
        x = record["input"]
        with torch.no_grad():
            trained = copy.deepcopy(ours).train()
            assert relative_difference(trained(x), record["output_train"]) <= 1e-10, case
            ours.eval()
            assert relative_difference(ours(x), record["output_eval"]) <= 1e-10, case
            ours.switch_to_deploy()
            assert relative_difference(ours(x), record["output_deploy"]) <= 1e-10, case
            for key, value in ours.state_dict().items():  # the same fused kernel as the original's fusion
                assert relative_difference(value, record["deploy_state_dict"][key]) <= 1e-12, (case, key)
            theirs_deployed = our_block(family, record["arguments"], deploy=True)
            theirs_deployed.load_state_dict(record["deploy_state_dict"], strict=True)
            assert relative_difference(theirs_deployed(x), record["output_deploy"]) <= 1e-10, case


@pytest.mark.parametrize("family", list(CLASSES))
def test_a_model_of_original_blocks_folds_into_a_plain_model(family):
    """acnet_fuse_and_load recognises an original block under a conv's name (its signature; a deployed one by its
    fused conv's name) and writes its equivalent kernel and bias into the plain conv; then the plain conv + ReLU
    computes the original's output."""
    for case, record in committed(family)["cases"].items():
        args = dict(record["arguments"])
        args.pop("num_conv_branches", None)
        plain = nn.Sequential()
        plain.add_module("block", nn.Conv2d(**args, bias=True).double())
        plain.add_module("relu", nn.ReLU())
        for stored, expected in (("state_dict", "output_eval"), ("deploy_state_dict", "output_deploy")):
            state = {f"block.{k}": v for k, v in record[stored].items()}  # deployed: rbr_reparam / reparam_conv
            acnet_fuse_and_load(plain, state)
            with torch.no_grad():
                assert relative_difference(plain(record["input"]), record[expected]) <= 1e-10, (case, stored)


def original_or_skip(family: str):
    if original_module(family) is None:
        owner, repo = ORIGINALS[family][:2]
        pytest.skip(f"the original {owner}/{repo} code is not present (ACNET_ORIGINALS_DIR, tests/reparam_originals.py)")


@pytest.mark.parametrize("family", list(CLASSES))
def test_live_original_blocks_load_into_ours_and_ours_export_to_theirs(family):
    original_or_skip(family)
    x = case_input(seed=11)
    for case, arguments in CASES[family].items():
        theirs = original_block(family, case, seed=3)
        ours = our_block(family, arguments)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        with torch.no_grad():
            for mode in ("train", "eval"):
                a, b = copy.deepcopy(theirs), copy.deepcopy(ours)
                getattr(a, mode)(), getattr(b, mode)()
                assert relative_difference(b(x), a(x)) <= 1e-10, (case, mode)
        # export: a trained block of ours (random state) loads into the original and computes the same
        randomize_all_(ours, 9)
        back = original_block(family, case, seed=4)
        back.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            assert relative_difference(back.eval()(x), ours.eval()(x)) <= 1e-10, case
            ours.switch_to_deploy()
            deployed = original_block(family, case)
            (deployed.switch_to_deploy if family == "repvgg" else deployed.reparameterize)()
            deployed.load_state_dict(ours.state_dict(), strict=True)
            assert relative_difference(deployed(x), ours(x)) <= 1e-10, case
