"""The frozen-norm, BN-free, 1-D and 3-D forms of every block (``dim=``, ``norm=``) and the block contract's
insertion of a pretrained conv (``load_main_branch``), in float64."""
from __future__ import annotations

import itertools
import re
from typing import Any, Dict, List, Optional

import pytest
import torch
from torch import nn

from acnet.acb import ACBlock
from acnet.block import ConvBN, ReparamBlock
from acnet.dbb import DiverseBranchBlock
from acnet.norms import NORM_KINDS, ChannelAffine, FrozenBatchNorm
from acnet.mobileone import MobileOneBlock
from acnet.orepa import OREPABlock
from acnet.repvgg import RepVGGBlock
from helpers import gradcheck_equivalent_kernel, randomize_all_, relative_difference

BLOCKS = (ConvBN, ACBlock, DiverseBranchBlock, OREPABlock, RepVGGBlock, MobileOneBlock)
#: Per dimension, geometries (kernel, stride, groups) every block accepts unless its unsupported() says not.
GEOMETRIES = {
    1: [(3, 1, 1), (5, 2, 2)],
    2: [(3, 1, 1), ((3, 5), 2, 2)],
    3: [(3, 1, 1), ((1, 3, 3), (1, 2, 2), 2), ((3, 1, 1), 1, 1), ((3, 3, 1), 2, 1)],
}
SIZES = {1: (11,), 2: (7, 6), 3: (5, 6, 4)}


def same_padding(kernel) -> Any:
    return tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2


def geometry(dim: int, kernel, stride) -> Dict[str, Any]:
    def nd(v):
        return tuple(v) if isinstance(v, tuple) else (v,) * dim
    k = nd(kernel)
    return dict(dim=dim, kernel_size=k, stride=nd(stride), padding=tuple(v // 2 for v in k), dilation=(1,) * dim,
                padding_mode="zeros")


def form_cases() -> List[Dict[str, Any]]:
    cases = []
    for cls, dim, norm in itertools.product(BLOCKS, (1, 2, 3), NORM_KINDS):
        for kernel, stride, groups in GEOMETRIES[dim]:
            if cls.unsupported(**geometry(dim, kernel, stride), groups=groups, norm=norm) is None:
                cases.append(dict(cls=cls, dim=dim, norm=norm, kernel=kernel, stride=stride, groups=groups))
    return cases


def case_id(case: Dict[str, Any]) -> str:
    return f"{case['cls'].__name__}-{case['dim']}d-{case['norm']}-k{case['kernel']}-s{case['stride']}-g{case['groups']}"


def build(case: Dict[str, Any], cin: int = 4, cout: int = 6, seed: int = 0) -> ReparamBlock:
    block = case["cls"](cin, cout, case["kernel"], case["stride"], same_padding(case["kernel"]), groups=case["groups"],
                        dim=case["dim"], norm=case["norm"]).double()
    return randomize_all_(block, seed)


def make_input(case: Dict[str, Any], batch: int = 2, cin: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cin, *SIZES[case["dim"]], generator=gen, dtype=torch.float64)


FORMS = form_cases()


def test_the_grid_covers_every_block_dimension_and_norm_kind():
    covered = {(c["cls"], c["dim"], c["norm"]) for c in FORMS}
    expected = {(cls, d, n) for cls in BLOCKS for d in (1, 2, 3) for n in NORM_KINDS if not (cls is ACBlock and d == 1)}
    assert covered == expected
    assert any(c["cls"] is ACBlock and c["kernel"] == (1, 3, 3) for c in FORMS)  # r2plus1d's spatial conv
    assert any(c["cls"] is DiverseBranchBlock and c["kernel"] == (3, 1, 1) for c in FORMS)  # and its temporal one


@pytest.mark.parametrize("case", FORMS, ids=case_id)
def test_eval_mode_block_equals_its_deploy_conv_float64(case):
    block = build(case)
    x = make_input(case)
    block.train()
    block(x).sum().backward()  # a training step's forward (batch statistics update the running ones)
    block.eval()
    with torch.no_grad():
        expected = block(x)
        conv = block.make_deploy_conv()
        assert type(conv) is (nn.Conv1d, nn.Conv2d, nn.Conv3d)[case["dim"] - 1] and conv.bias is not None
        assert relative_difference(conv(x), expected) <= 1e-10
        block.switch_to_deploy()
        assert relative_difference(block(x), expected) <= 1e-10


def test_no_batch_statistics_in_the_frozen_and_bn_free_forms():
    for case in FORMS:
        if case["norm"] == "batch":
            continue
        block = build(case)
        assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in block.modules()), case_id(case)
        main = block.main_branch()[1]
        assert isinstance(main, FrozenBatchNorm if case["norm"] == "frozen" else ChannelAffine)


@pytest.mark.parametrize("cls", [ACBlock, DiverseBranchBlock, OREPABlock, ConvBN])
@pytest.mark.parametrize("dim", [1, 3])
def test_frozen_form_trains_on_a_batch_of_one_and_never_changes_its_frozen_norm(cls, dim):
    if cls is ACBlock and dim == 1:
        pytest.raises(ValueError, cls, 3, 4, 3, padding=1, dim=1, norm="frozen")
        return
    case = dict(cls=cls, dim=dim, norm="frozen", kernel=3, stride=1, groups=1)
    block = build(case, cin=3, cout=4).train()
    frozen = {k: v.clone() for k, v in block.main_branch()[1].state_dict().items()}
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    x = make_input(case, batch=1, cin=3)
    first = block(x)
    for _ in range(2):
        opt.zero_grad()
        block(x).square().mean().backward()
        opt.step()
    assert not torch.equal(block(x), first)  # it learnt
    for k, v in block.main_branch()[1].state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert block.training and torch.equal(block(x), block.eval()(x))  # train and eval mode compute the same


def source_pair(dim: int, norm: str, bias: bool, cin: int, cout: int, kernel, stride, groups, seed: int):
    """A pretrained conv (+ the norm that follows it) as a user's model holds it."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1](cin, cout, kernel, stride, same_padding(kernel), groups=groups,
                                                      bias=bias).double()
    if norm == "batch":
        follower: Optional[nn.Module] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](cout, eps=1e-3)
    elif norm == "frozen":
        follower = FrozenBatchNorm(cout, eps=1e-4)
    else:
        follower = None
    randomize_all_(conv, seed)
    if follower is not None:
        randomize_all_(follower.double(), seed + 1)
    return conv, follower


@pytest.mark.parametrize("case", [c for c in FORMS if c["stride"] == 1 or c["dim"] == 3], ids=case_id)
@pytest.mark.parametrize("bias", [False, True])
def test_load_main_branch_reproduces_the_pretrained_pair_exactly(case, bias):
    block = build(case, seed=5).eval()
    conv, follower = source_pair(case["dim"], case["norm"], bias, 4, 6, case["kernel"], case["stride"],
                                 case["groups"], seed=7)
    block.load_main_branch(conv.weight, conv.bias, follower)
    x = make_input(case)
    with torch.no_grad():
        expected = conv(x) if follower is None else follower.eval()(conv(x))
        assert relative_difference(block(x), expected) <= 1e-10
        assert relative_difference(block.make_deploy_conv()(x), expected) <= 1e-10


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bn_free_blocks_also_take_a_conv_bn_pair_and_frozen_blocks_refuse_a_bare_conv(dim):
    case = dict(cls=DiverseBranchBlock, dim=dim, norm="none", kernel=3, stride=1, groups=1)
    block = build(case).eval()
    conv, bn = source_pair(dim, "batch", True, 4, 6, 3, 1, 1, seed=3)
    block.load_main_branch(conv.weight, conv.bias, bn.eval())
    x = make_input(case)
    with torch.no_grad():
        assert relative_difference(block(x), bn(conv(x))) <= 1e-10
    frozen = build(dict(case, norm="frozen"))
    with pytest.raises(ValueError, match="norm='none'"):
        frozen.load_main_branch(conv.weight, conv.bias, None)


def new_branch_parameters(block: ReparamBlock) -> Dict[str, nn.Parameter]:
    """The parameters outside the main branch (the main conv weight, the main norm)."""
    weight, main_norm = block.main_branch()
    main = {id(weight)} | {id(p) for p in main_norm.parameters()}
    return {n: p for n, p in block.named_parameters() if id(p) not in main}


@pytest.mark.parametrize("case", [c for c in FORMS if c["stride"] == 1 and c["kernel"] in (3,) and c["cls"] is not ConvBN],
                         ids=case_id)
def test_new_branches_start_at_zero_and_get_gradients_after_one_step(case):
    block = build(case).train()
    conv, follower = source_pair(case["dim"], case["norm"], True, 4, 6, 3, 1, case["groups"], seed=9)
    block.load_main_branch(conv.weight, conv.bias, follower)
    x = make_input(case)
    if case["norm"] != "batch":  # no batch statistics: the block equals the pair in training mode too
        with torch.no_grad():
            expected = conv(x) if follower is None else follower(conv(x))
            assert relative_difference(block(x), expected) <= 1e-10
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    branches = new_branch_parameters(block)
    assert branches
    for step in range(2):
        opt.zero_grad()
        block(x).sin().sum().backward()
        if step == 1:  # after one step every parameter of every new branch learns
            silent = [n for n, p in branches.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, f"no gradient after one step: {silent}"
        opt.step()


def test_bn_free_dbb_is_exact_at_the_borders_only_with_bias_padding(monkeypatch):
    """The 1x1 -> KxK and average branches pad their intermediate map with the preceding shift; padding with
    zeros instead makes the border pixels differ from the fused conv (the interior still agrees)."""
    from acnet import dbb as dbb_module

    case = dict(cls=DiverseBranchBlock, dim=2, norm="none", kernel=3, stride=1, groups=1)
    block = build(case).eval()
    x = make_input(case)
    with torch.no_grad():
        fused = block.make_deploy_conv()(x)
        assert relative_difference(block(x), fused) <= 1e-10
        monkeypatch.setattr(dbb_module.BNAndPadLayer, "pad_values", lambda self: torch.zeros_like(self.bn.bias))
        wrong = block(x)
    border = torch.ones_like(fused, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1] = False
    assert relative_difference(wrong[~border], fused[~border]) <= 1e-10
    assert (wrong[border] - fused[border]).abs().max() > 1e-3


@pytest.mark.parametrize("cls, kwargs, reason", [
    (ACBlock, dict(dim=1, kernel_size=(3,)), "ACB on a 1-D conv"),
    (ACBlock, dict(dim=3, kernel_size=(3, 1, 1)), "two axes of size > 1"),
    (ACBlock, dict(dim=2, kernel_size=(1, 5)), "two axes of size > 1"),
    (ACBlock, dict(dim=3, kernel_size=(2, 1, 1)), "two axes of size > 1"),
    (DiverseBranchBlock, dict(dim=2, kernel_size=(3, 3), padding_mode="reflect"), "padding_mode='zeros'"),
    (OREPABlock, dict(dim=3, kernel_size=(3, 3, 3), norm="batch", bias=False), "bias=False needs norm='none'"),
    (ConvBN, dict(dim=2, kernel_size=(3, 3), norm="layer"), "norm must be one of"),
])
def test_unsupported_geometries_give_one_reason_and_the_constructor_refuses_them(cls, kwargs, reason):
    dim = kwargs["dim"]
    k = kwargs["kernel_size"]
    full = dict(dim=dim, kernel_size=k, stride=(1,) * dim, padding=kwargs.get("padding", tuple(v // 2 for v in k)),
                dilation=(1,) * dim, groups=1, padding_mode=kwargs.get("padding_mode", "zeros"),
                norm=kwargs.get("norm", "batch"), bias=kwargs.get("bias", True))
    text = cls.unsupported(**full)
    assert isinstance(text, str) and reason in text and "\n" not in text
    args = dict(padding=full["padding"], dim=dim, norm=full["norm"], bias=full["bias"])
    if full["padding_mode"] != "zeros":
        args["padding_mode"] = full["padding_mode"]
    if cls is DiverseBranchBlock and "padding_mode" in args:
        assert "padding_mode" not in DiverseBranchBlock.__init__.__code__.co_varnames  # DBB has no such argument
        return
    # the constructor says the same, or (even sizes) its own argument rule "kernel_size must be an odd int"
    with pytest.raises(ValueError, match=re.escape(reason) + "|kernel_size must be an odd int"):
        cls(4, 4, k, **args)


def test_supported_geometries_have_no_reason():
    for case in FORMS:
        assert case["cls"].unsupported(**geometry(case["dim"], case["kernel"], case["stride"]), groups=case["groups"],
                                       norm=case["norm"]) is None


@pytest.mark.parametrize("cls, dim, norm, kernel", [
    (ACBlock, 3, "frozen", 3), (ACBlock, 2, "none", 3), (DiverseBranchBlock, 1, "frozen", 3),
    (DiverseBranchBlock, 3, "none", (1, 3, 1)), (OREPABlock, 1, "none", 3), (OREPABlock, 3, "frozen", (3, 1, 1)),
])
def test_equivalent_kernel_of_the_new_forms_passes_gradcheck(cls, dim, norm, kernel):
    extra = dict(internal_channels_1x1_3x3=2) if cls is DiverseBranchBlock else {}
    block = randomize_all_(cls(2, 2, kernel, padding=same_padding(kernel), dim=dim, norm=norm, **extra).double(), 4)
    names = gradcheck_equivalent_kernel(block)
    assert len(names) == len(list(block.parameters()))


def test_state_dict_names_of_the_new_forms():
    acb3 = ACBlock(2, 2, (1, 3, 3), padding=(0, 1, 1), dim=3, norm="frozen")
    keys = set(acb3.state_dict())
    assert {"square_conv.weight", "square_bn.running_mean", "ver_conv.weight", "hor_conv.weight", "ver_bn.weight",
            "hor_bn.bias"} <= keys and not any(k.startswith("dep_") for k in keys)
    assert tuple(acb3.ver_conv.weight.shape[2:]) == (1, 3, 1) and tuple(acb3.hor_conv.weight.shape[2:]) == (1, 1, 3)
    acb333 = ACBlock(2, 2, 3, padding=1, dim=3)
    assert tuple(acb333.dep_conv.weight.shape[2:]) == (3, 1, 1)
    assert ACBlock.stored_options(acb3.state_dict(), 2) == {"use_affine": True, "dim": 3, "norm": "frozen"}
    dbb = DiverseBranchBlock(4, 4, 3, dim=1, norm="none")
    assert DiverseBranchBlock.stored_options(dbb.state_dict(), 4) == {"internal_channels_1x1_3x3": 4, "dim": 1,
                                                                      "norm": "none"}
    orepa = OREPABlock(4, 4, 3, dim=3, norm="none")
    assert OREPABlock.stored_options(orepa.state_dict(), 4) == {"internal_channels_1x1_3x3": 4, "dim": 3,
                                                                "norm": "none"}
    assert ConvBN.stored_options(ConvBN(4, 4, 3).state_dict(), 4) == {}
    two_d = ACBlock(2, 2, 3, padding=1)
    assert ACBlock.stored_options(two_d.state_dict(), 2) == {"use_affine": True}  # the 2-d BN form: as before


def test_the_forms_benchmark_times_every_block_the_form_accepts():
    from benchmarks.bench_blocks import FORM_SHAPES, bench_form

    assert {(dim, norm) for _, dim, norm, _, _, _ in FORM_SHAPES} >= {(1, "batch"), (3, "batch"), (2, "frozen"),
                                                                       (2, "none")}
    assert {(o.get("transposed", False), o.get("bias", True)) for *_, o in FORM_SHAPES} >= {(True, True), (True, False),
                                                                                          (False, False)}
    transposed = bench_form(2, "none", (1, 4, 5, 5), 3, rounds=1, warmup=0,
                            options=dict(stride=2, transposed=True, output_padding=1, bias=False))
    assert set(transposed) == {"plain", "ACB", "DBB", "OREPA"}
    one_d = bench_form(1, "batch", (2, 4, 16), 3, rounds=1, warmup=0)
    assert set(one_d) == {"plain", "DBB", "OREPA"}  # no 1-D ACB
    three_d = bench_form(3, "frozen", (1, 4, 3, 5, 5), (1, 3, 3), rounds=1, warmup=0)
    assert set(three_d) == {"plain", "ACB", "DBB", "OREPA"} and all(len(t) == 1 and t[0] > 0 for t in three_d.values())


# --- issue 27: no layout leaks, transposed, bias-free, even-kernel and padding-0 forms --------------------
#: (label, block class, constructor keywords) of every new form, 2-d unless ``dim`` says otherwise.
LAYOUT_FORMS = [(f"{cls.__name__}-{label}", cls, dict(kwargs)) for cls in BLOCKS for label, kwargs in [
    ("conv", dict(kernel_size=3, padding=1)),
    ("stride2", dict(kernel_size=3, padding=1, stride=2)),
    ("padding0", dict(kernel_size=3, padding=0)),
    ("even4-s4", dict(kernel_size=4, padding=0, stride=4)),
    ("even2-s2", dict(kernel_size=2, padding=0, stride=2)),
    ("no-bias", dict(kernel_size=3, padding=1, norm="none", bias=False)),
    ("transposed-s2", dict(kernel_size=3, padding=1, stride=2, transposed=True, output_padding=1)),
    ("transposed-even4", dict(kernel_size=4, padding=1, stride=2, transposed=True)),
    ("transposed-3d", dict(kernel_size=3, padding=1, stride=2, transposed=True, output_padding=1, dim=3)),
    ("frozen-3d", dict(kernel_size=3, padding=1, dim=3, norm="frozen")),
]]


@pytest.mark.parametrize("label, cls, kwargs", LAYOUT_FORMS, ids=[f[0] for f in LAYOUT_FORMS])
def test_every_block_form_returns_its_output_in_the_input_memory_format(label, cls, kwargs):
    """A stock conv's rule: NCHW in, NCHW out (``.view`` works, as torchvision's keypoint head needs);
    channels_last in, channels_last out -- in training (the NHWC fast path inside) and in eval mode."""
    dim = kwargs.get("dim", 2)
    block = cls(16, 8, **kwargs)
    x = torch.randn(2, 16, *(12,) * dim)
    last = torch.channels_last_3d if dim == 3 else torch.channels_last
    for mode in ("train", "eval"):
        getattr(block, mode)()
        out = block(x)
        assert out.is_contiguous(), f"{label} ({mode}): an NCHW input gave a non-contiguous output"
        out.view(out.shape[0], -1)
        out.sum().backward()
        assert x.grad is None  # (x needs no grad) the backward ran through the layout conversion
        out_last = block(x.contiguous(memory_format=last))
        assert out_last.is_contiguous(memory_format=last) and not out_last.is_contiguous(), f"{label} ({mode})"
        torch.testing.assert_close(out_last, out, rtol=1e-4, atol=1e-4) if mode == "eval" else None
    block.switch_to_deploy()
    assert block(x).is_contiguous()


@pytest.mark.parametrize("cls", [ConvBN, ACBlock, DiverseBranchBlock, OREPABlock])
def test_bias_free_form_has_no_bias_anywhere_and_takes_a_bias_free_conv_exactly(cls):
    block = randomize_all_(cls(4, 6, 3, padding=1, norm="none", bias=False).double(), 3)
    assert not [n for n, _ in block.named_parameters() if n.endswith("bias")]
    if cls is DiverseBranchBlock:  # the padded intermediate maps pad with the (absent) shift: zero
        assert torch.equal(block.dbb_1x1_kxk.bn1.pad_values(), torch.zeros(4, dtype=torch.float64))
    kernel, bias = block.get_equivalent_kernel_bias()
    assert torch.equal(bias, torch.zeros_like(bias))
    conv = randomize_all_(nn.Conv2d(4, 6, 3, padding=1, bias=False).double(), 4)
    block.load_main_branch(conv.weight, None, None)
    x = make_input(dict(dim=2))
    with torch.no_grad():
        assert relative_difference(block(x), conv(x)) <= 1e-10
        deployed = block.make_deploy_conv()
        assert deployed.bias is None and relative_difference(deployed(x), conv(x)) <= 1e-10
    with pytest.raises(ValueError, match="bias=False"):
        block.load_main_branch(conv.weight, torch.ones(6, dtype=torch.float64), None)  # a conv bias has no place
    randomize_all_(block, 5)
    with torch.no_grad():  # trained: still exact, still no bias
        assert relative_difference(block.make_deploy_conv()(x), block(x)) <= 1e-10


@pytest.mark.parametrize("cls", [ACBlock, DiverseBranchBlock, OREPABlock])
@pytest.mark.parametrize("kwargs", [
    dict(transposed=True, stride=2, padding=1, output_padding=1),
    dict(transposed=True, kernel_size=4, stride=2, padding=1, norm="none", bias=False),
    dict(kernel_size=4, stride=2, padding=1, norm="frozen"),
    dict(kernel_size=3, padding=0, norm="none"),
], ids=["transposed", "transposed-even-nobias", "even-frozen", "padding0"])
def test_equivalent_kernel_of_the_issue27_forms_passes_gradcheck(cls, kwargs):
    kwargs = dict(kwargs)
    kernel = kwargs.pop("kernel_size", 3)
    extra = dict(internal_channels_1x1_3x3=2) if cls is DiverseBranchBlock else {}
    block = randomize_all_(cls(2, 2, kernel, **kwargs, **extra).double(), 4)
    names = gradcheck_equivalent_kernel(block)
    assert len(names) == len(list(block.parameters()))


def test_acb_even_kernel_puts_its_1d_branches_on_the_row_and_column_a_same_padded_conv_centres():
    """For an even K the 1-D branches sit on row / column (K - 1) // 2: the tap over the output pixel with
    PyTorch's padding="same" (the block itself is exact for any padding)."""
    block = ACBlock(1, 1, 4, padding=0, norm="none").double()
    with torch.no_grad():
        block.square_conv.weight.zero_()
        block.hor_conv.weight.fill_(1.0)
        block.ver_conv.weight.fill_(2.0)
    kernel = block.get_equivalent_kernel_bias()[0][0, 0]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[1, :] += 1.0
    expected[:, 1] += 2.0
    assert torch.equal(kernel, expected)


def test_transposed_dbb_runs_each_branch_as_the_adjoint_of_the_conv_forms_branch():
    """Transposed DBB: KxKᵀ -> norm -> 1x1 and avgᵀ -> norm -> 1x1 (the middle norm after the strided
    transposed conv, then a pointwise conv: exact); a shift BEFORE a strided transposed conv is not a
    constant after it, which is why the conv form's order (1x1 -> padded norm -> KxK) is not used."""
    block = DiverseBranchBlock(4, 6, 3, stride=2, padding=1, transposed=True, output_padding=1)
    branch = block.dbb_1x1_kxk
    assert [n for n, _ in branch.named_children()] == ["conv2", "bn1", "idconv1", "bn2"]
    assert isinstance(branch.conv2, nn.ConvTranspose2d) and branch.conv2.stride == (2, 2)
    assert [n for n, _ in block.dbb_avg.named_children()] == ["avg", "bn", "conv", "avgbn"]
    shift = torch.ones(1, 1, 4, 4)  # a constant map through a stride-2 transposed 3x3 conv: not constant
    spread = torch.nn.functional.conv_transpose2d(shift, torch.ones(1, 1, 3, 3), stride=2, padding=1, output_padding=1)
    assert spread.min() < spread.max()
    stored = DiverseBranchBlock.stored_options(block.state_dict(), 4)
    assert stored == {"internal_channels_1x1_3x3": 6}  # the transposed 1x1's first axis: the internal width
