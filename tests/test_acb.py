"""ACBlock: exact fusion over the whole argument space, original compatibility, training semantics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet.acb import ACBlock, AsymConvBlock
from acnet.block import ReparamBlock
from helpers import randomize_


PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def original_acb_forward(state: dict, x: torch.Tensor, *, k: int, stride: int, padding: int, groups: int,
                         eps: float = 1e-5) -> torch.Tensor:
    """The original ACBlock's eval-mode forward (dilation 1, zero padding), written with torch.nn.functional."""
    def bn(y, prefix):
        return F.batch_norm(y, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, eps)

    c = k // 2
    out = bn(F.conv2d(x, state["square_conv.weight"], None, stride, padding, 1, groups), "square_bn")
    if padding >= c:
        ver_in, hor_in, ver_pad, hor_pad = x, x, (padding, padding - c), (padding - c, padding)
    else:
        crop = c - padding
        ver_in, hor_in = x[:, :, :, crop:-crop], x[:, :, crop:-crop, :]
        ver_pad, hor_pad = (padding, 0), (0, padding)
    out = out + bn(F.conv2d(ver_in, state["ver_conv.weight"], None, stride, ver_pad, 1, groups), "ver_bn")
    out = out + bn(F.conv2d(hor_in, state["hor_conv.weight"], None, stride, hor_pad, 1, groups), "hor_bn")
    return out


def reference_train_forward(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """Straightforward three-branch forward through the block's own children (the semantics to keep)."""
    ver_in, hor_in = block._side_inputs(x)
    return (block.square_bn(block.square_conv(x)) + block.ver_bn(block.ver_conv(ver_in))
            + block.hor_bn(block.hor_conv(hor_in)))


@st.composite
def acb_cases(draw):
    k = draw(st.sampled_from([3, 5]))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, dilation * (k // 2) + 1))
    stride = draw(st.integers(1, 3))
    groups, cin, cout = draw(st.sampled_from([(1, 2, 3), (1, 3, 3), (2, 4, 2), (2, 2, 4), (3, 3, 3), (4, 4, 4)]))
    mode = draw(st.sampled_from(PADDING_MODES))
    reach = dilation * (k - 1) + 1 - 2 * padding  # smallest input that leaves one output pixel
    h = draw(st.integers(max(reach, padding + 1, 2), max(reach, padding + 1, 2) + 5))
    w = draw(st.integers(max(reach, padding + 1, 2), max(reach, padding + 1, 2) + 5))
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    seed = draw(st.integers(0, 2**16))
    return dict(k=k, stride=stride, padding=padding, dilation=dilation, groups=groups, cin=cin, cout=cout,
                mode=mode, h=h, w=w, affine=affine, eps=eps, seed=seed)


def build(case, dtype=torch.float64):
    block = ACBlock(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                    case["groups"], case["mode"], use_affine=case["affine"], bn_eps=case["eps"])
    randomize_(block, case["seed"]).to(dtype).eval()
    x = torch.randn(2, case["cin"], case["h"], case["w"], generator=torch.Generator().manual_seed(case["seed"] + 1),
                    dtype=torch.float64).to(dtype)
    return block, x


@settings(max_examples=30)
@given(acb_cases())
def test_eval_forward_equals_the_reference_three_branch_forward(case):
    # deploy == training form for every block type: tests/test_block_contract.py
    block, x = build(case)
    expected = reference_train_forward(block, x)
    assert block(x).shape == expected.shape
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,padding,stride", [(3, 1, 1), (3, 0, 2), (5, 2, 1), (5, 1, 2), (3, 2, 1)])
def test_original_state_dict_loads_strictly_and_matches_original_forward(k, padding, stride):
    """A state dict with the original names (and no other keys) loads strictly and gives the original's outputs."""
    gen = torch.Generator().manual_seed(k * 10 + padding)
    cin, cout, groups = 4, 6, 2
    state = {
        "square_conv.weight": torch.randn(cout, cin // groups, k, k, generator=gen),
        "ver_conv.weight": torch.randn(cout, cin // groups, k, 1, generator=gen),
        "hor_conv.weight": torch.randn(cout, cin // groups, 1, k, generator=gen),
    }
    for bn in ("square_bn", "ver_bn", "hor_bn"):
        state[f"{bn}.weight"] = torch.randn(cout, generator=gen)
        state[f"{bn}.bias"] = torch.randn(cout, generator=gen)
        state[f"{bn}.running_mean"] = torch.randn(cout, generator=gen)
        state[f"{bn}.running_var"] = torch.rand(cout, generator=gen) + 0.5
        state[f"{bn}.num_batches_tracked"] = torch.tensor(7)
    block = ACBlock(cin, cout, k, stride, padding, groups=groups)
    block.load_state_dict(state, strict=True)
    block.eval()
    x = torch.randn(2, cin, 9, 10, generator=gen)
    expected = original_acb_forward(state, x, k=k, stride=stride, padding=padding, groups=groups)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    deployed = ACBlock(cin, cout, k, stride, padding, groups=groups, deploy=True)
    deployed.load_state_dict({f"fused_conv.{n}": t for n, t in block.make_deploy_conv().state_dict().items()})
    torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)
    assert set(deployed.state_dict()) == {"fused_conv.weight", "fused_conv.bias"}


def test_state_dict_names_match_the_original():
    block = ACBlock(3, 4, 3, padding=1)
    names = [n for n, _ in block.named_children()]
    assert names == ["square_conv", "square_bn", "ver_conv", "hor_conv", "ver_bn", "hor_bn"]
    assert block.ver_conv.kernel_size == (3, 1) and block.hor_conv.kernel_size == (1, 3)
    assert all(getattr(block, n).bias is None for n in ("square_conv", "ver_conv", "hor_conv"))
    assert isinstance(block, ReparamBlock) and AsymConvBlock is ACBlock


def test_dilated_side_branches_align_with_the_dilated_centre_row():
    """Dilation 2, K=3, padding 2: the 1xK branch must read the centre row 2 pixels from the window edge."""
    block = ACBlock(1, 1, 3, padding=2, dilation=2).double().eval()
    with torch.no_grad():
        block.square_conv.weight.zero_()
        block.ver_conv.weight.zero_()
        block.hor_conv.weight.copy_(torch.tensor([[[[0.0, 1.0, 0.0]]]]))
    x = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    bn = block.hor_bn
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).item()
    # the hor branch is then a pure (scaled) identity, square/ver contribute their BN shift only
    shift = sum((b.bias - b.running_mean * b.weight / (b.running_var + b.eps).sqrt()).item()
                for b in (block.square_bn, block.ver_bn, block.hor_bn))
    torch.testing.assert_close(block(x), x * scale + shift)
    block.switch_to_deploy()
    torch.testing.assert_close(block(x), x * scale + shift)


def test_switch_to_deploy_is_in_place_and_idempotent():
    block, x = build(dict(k=3, stride=1, padding=1, dilation=1, groups=1, cin=3, cout=4, mode="zeros", h=6, w=6,
                          affine=True, eps=1e-5, seed=3))
    expected = block(x)
    conv = block.make_deploy_conv()
    assert not block.deployed and hasattr(block, "square_conv")  # make_deploy_conv leaves the block alone
    block.switch_to_deploy()
    first = block.fused_conv.weight.clone()
    block.switch_to_deploy()
    assert block.deployed and block.deploy
    assert set(dict(block.named_children())) == {"fused_conv"}
    torch.testing.assert_close(block.fused_conv.weight, first)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(block.make_deploy_conv().weight, conv.weight)
    assert block.make_deploy_conv() is not block.fused_conv


def test_deploy_constructor_builds_only_fused_conv():
    block = ACBlock(4, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect", deploy=True)
    assert block.deployed and set(block.state_dict()) == {"fused_conv.weight", "fused_conv.bias"}
    assert block.fused_conv.padding_mode == "reflect" and block.fused_conv.groups == 2
    assert block(torch.randn(1, 4, 8, 8)).shape == (1, 8, 4, 4)


def test_gamma_options():
    reduced = ACBlock(2, 2, 3, padding=1, reduce_gamma=True)
    assert all(torch.allclose(b.weight, torch.full((2,), 1 / 3)) for b in (reduced.square_bn, reduced.ver_bn, reduced.hor_bn))
    block = ACBlock(2, 2, 3, padding=1, gamma_init=0.25)
    assert all(torch.all(b.weight == 0.25) for b in (block.square_bn, block.ver_bn, block.hor_bn))
    block.single_init()
    assert torch.all(block.square_bn.weight == 1) and torch.all(block.ver_bn.weight == 0)
    assert torch.all(block.hor_bn.weight == 0)
    block.init_gamma(0.5)
    assert all(torch.all(b.weight == 0.5) for b in (block.square_bn, block.ver_bn, block.hor_bn))
    no_affine = ACBlock(2, 2, 3, padding=1, use_affine=False)
    assert no_affine.square_bn.weight is None
    with pytest.raises(ValueError, match="use_affine"):
        no_affine.init_gamma(0.3)
    with pytest.raises(ValueError, match="reduce_gamma"):
        ACBlock(2, 2, 3, padding=1, reduce_gamma=True, gamma_init=0.5)


def test_single_init_block_equals_its_square_branch():
    block = randomize_(ACBlock(3, 4, 3, padding=1), 5).double().eval()
    block.single_init()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    bns = (block.ver_bn, block.hor_bn)
    shift = sum(b.bias.view(1, -1, 1, 1) for b in bns)
    torch.testing.assert_close(block(x), block.square_bn(block.square_conv(x)) + shift)


def test_each_bn_uses_its_own_eps_and_momentum():
    block = ACBlock(2, 3, 3, padding=1, bn_eps=1e-3, bn_momentum=0.3)
    assert {b.eps for b in (block.square_bn, block.ver_bn, block.hor_bn)} == {1e-3}
    assert {b.momentum for b in (block.square_bn, block.ver_bn, block.hor_bn)} == {0.3}
    randomize_(block, 1).double().eval()
    block.ver_bn.eps = 0.5  # one BN with a very different eps must still fuse exactly
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    expected = block(x)
    block.switch_to_deploy()
    assert (block(x) - expected).abs().max().item() <= 1e-10


class EquivalentKernelBias(nn.Module):
    """Exposes a block's ``get_equivalent_kernel_bias`` as ``forward`` (for ``torch.func.functional_call``)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self):
        return self.block.get_equivalent_kernel_bias()


def test_equivalent_kernel_passes_gradcheck():
    block = randomize_(ACBlock(2, 2, 3, padding=1, groups=2), 11).double().eval()
    wrapper = EquivalentKernelBias(block)
    names = [n for n, _ in wrapper.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())

    def kernel_bias(*tensors):
        return torch.func.functional_call(wrapper, dict(zip(names, tensors)), ())

    assert len(inputs) == 9  # 3 conv weights + 3 BN weights + 3 BN biases
    assert torch.autograd.gradcheck(kernel_bias, inputs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=0, padding=1), "kernel_size must be an int >= 1"),
        (dict(kernel_size=1), "two axes of size > 1"),
        (dict(kernel_size=3, padding=-1), "padding must be >= 0"),
        (dict(kernel_size=3, padding=1, groups=4), "divisible by groups"),
        (dict(kernel_size=3, stride=0), "stride must be >= 1"),
        (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
        (dict(kernel_size=(1, 3)), "two axes of size > 1"),  # non-square kernels: where the 1-D branches fit
        (dict(kernel_size=3, output_padding=1, stride=2), "output_padding is for transposed=True blocks"),
        (dict(kernel_size=3, transposed=True, output_padding=2, stride=2), "smaller than stride or dilation"),
        (dict(kernel_size=3, transposed=True, padding_mode="reflect"), "pads only with zeros"),
        (dict(kernel_size=3, bias=False), "bias=False needs norm='none'"),
        (dict(kernel_size=3, dim=1), "ACB on a 1-D conv"),
        (dict(kernel_size=3, norm="group"), "norm must be one of"),
        (dict(kernel_size=3, norm="frozen", use_affine=False), "use_affine=False needs norm='batch'"),
        (dict(kernel_size=3, padding_mode="mirror"), "padding_mode must be one of"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ACBlock(6, 6, **kwargs)


def test_tuple_geometry_is_accepted():
    block = ACBlock(2, 2, (3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    assert (block.kernel_size, block.stride, block.padding, block.dilation) == (3, 2, 1, 1)


@pytest.mark.parametrize("case", [
    dict(k=3, stride=1, padding=1, dilation=1, groups=1, cin=3, cout=5, mode="zeros", h=7, w=6),
    dict(k=3, stride=2, padding=0, dilation=1, groups=2, cin=4, cout=4, mode="reflect", h=8, w=9),
    dict(k=5, stride=1, padding=3, dilation=2, groups=4, cin=4, cout=4, mode="circular", h=6, w=7),
    dict(k=3, stride=2, padding=1, dilation=1, groups=1, cin=3, cout=3, mode="replicate", h=7, w=7),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_mode_forward_backward_match_reference(case, momentum):
    """Train mode: outputs, input/parameter gradients and BN running statistics equal the plain three-branch form."""
    block = ACBlock(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                    case["groups"], case["mode"])
    randomize_(block, 7).double().train()
    for bn in (block.square_bn, block.ver_bn, block.hor_bn):
        bn.momentum = momentum
    reference = copy.deepcopy(block)
    x = torch.randn(3, case["cin"], case["h"], case["w"], dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = None
    for _ in range(2):  # two steps: running statistics accumulate
        out = block(x)
        expected = reference_train_forward(reference, x_ref)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), b_ref in zip(block.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_branch_bn_sum_equals_bn_by_bn(affine, momentum, track):
    """The fused batch-statistics BN + sum: same output, gradients and running statistics as separate BNs."""
    from acnet.fastpath import branch_bn_sum

    gen = torch.Generator().manual_seed(3)
    bns = [nn.BatchNorm2d(3, eps=eps, momentum=momentum, affine=affine, track_running_stats=track).double()
           for eps in (1e-5, 1e-3, 0.3)]
    if affine:
        with torch.no_grad():
            for bn in bns:
                bn.weight.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
                bn.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    reference = copy.deepcopy(bns)
    ys = [(torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64) * 3 + 2).requires_grad_() for _ in bns]
    ys_ref = [y.detach().clone().requires_grad_() for y in ys]
    for _ in range(2):
        out = branch_bn_sum(ys, bns)
        expected = sum(bn(y) for bn, y in zip(reference, ys_ref))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(grad)
        expected.backward(grad)
    for y, y_ref in zip(ys, ys_ref):
        torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-10, atol=1e-10)
    for bn, bn_ref in zip(bns, reference):
        for p, p_ref in zip(bn.parameters(), bn_ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10)
        for b, b_ref in zip(bn.buffers(), bn_ref.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12)
    for bn in bns:  # eval mode goes BN by BN with the running statistics
        bn.eval()
    if track:
        torch.testing.assert_close(branch_bn_sum(ys, bns), sum(bn.eval()(y) for bn, y in zip(reference, ys)))


def test_training_forward_float32_and_single_value_error():
    block = ACBlock(3, 4, 3, padding=1).train()
    reference = copy.deepcopy(block)
    x = torch.randn(4, 3, 6, 6) * 10 + 5
    torch.testing.assert_close(block(x), reference_train_forward(reference, x), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 3, 1, 1))


def test_hooks_on_branch_bns_fire_in_training():
    """A forward hook on a branch BN sees that BN's input and output, as in the original block."""
    block = ACBlock(4, 4, 3, padding=1).train()
    seen = []
    block.ver_bn.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    x = torch.randn(2, 4, 6, 6)
    out = block(x)
    assert len(seen) == 1
    bn_in, bn_out = seen[0]
    torch.testing.assert_close(bn_in, block.ver_conv(x))
    reference = copy.deepcopy(block)
    reference.ver_bn._forward_hooks.clear()
    ver_in, hor_in = reference._side_inputs(x)
    expected = (reference.square_bn(reference.square_conv(x)) + reference.ver_bn(reference.ver_conv(ver_in))
                + reference.hor_bn(reference.hor_conv(hor_in)))
    torch.testing.assert_close(out, expected)
    assert bn_out.shape == out.shape
