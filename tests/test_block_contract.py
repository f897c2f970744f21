"""The block contract, checked once for every block type of the registry (read at collection time).

Every registered :class:`~acnet.block.ReparamBlock` class, in every form it accepts (``dim`` 1/2/3,
``norm`` batch/frozen/none, non-cubic kernels, strides, dilations, groups, padding modes): the eval-mode
block equals its deploy conv (float64 to 1e-10, float32 to 1e-5 relative), ``unsupported()`` agrees
with the constructor, ``stored_options()`` rebuilds a stored block, ``load_main_branch()`` /
``single_init()`` / ``init_gamma()`` do what the contract says, and the class attributes are usable.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from acnet.norms import NORM_KINDS
from acnet.registry import BLOCK_REGISTRY
from helpers import randomize_all_, relative_difference


def block_class(entry: Any) -> type:
    return entry if isinstance(entry, type) else entry.block_class


BLOCK_CLASSES = {name: block_class(entry) for name, entry in BLOCK_REGISTRY.items()}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


def accepts(cls: type, argument: str) -> bool:
    return argument in inspect.signature(cls.__init__).parameters


@st.composite
def forms(draw, cls: type) -> Dict[str, Any]:
    """A geometry and form the block accepts (``unsupported()`` is None), with a small input shape:
    conv or transposed conv (with an output_padding), even and odd kernels, any padding (0 included),
    with or without bias in the BN-free form."""
    dim = draw(st.sampled_from([1, 2, 3]))
    norm = draw(st.sampled_from(NORM_KINDS))
    sizes = [1, 2, 3, 4, 5] if dim < 3 else [1, 2, 3]
    kernel = tuple(draw(st.sampled_from(sizes)) for _ in range(dim))
    if draw(st.booleans()):
        kernel = (kernel[0],) * dim  # cubic
    dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(dim))
    stride = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(dim))
    same = tuple(d * ((k - 1) // 2) for k, d in zip(kernel, dilation))
    padding = same if draw(st.booleans()) else tuple(draw(st.integers(0, s + 1)) for s in same)
    transposed = accepts(cls, "transposed") and draw(st.sampled_from([False, False, True]))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)) \
        if transposed else (0,) * dim
    bias = draw(st.booleans()) if norm == "none" and accepts(cls, "bias") else True
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])) \
        if accepts(cls, "padding_mode") and not transposed else "zeros"
    groups, cin, cout = draw(st.sampled_from([(1, 2, 3), (1, 3, 2), (2, 4, 2), (2, 2, 4), (3, 3, 3)]))
    extra = dict(transposed=True) if transposed else {}
    if not bias:
        extra["bias"] = False
    assume(cls.unsupported(dim=dim, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, padding_mode=mode, norm=norm, **extra) is None)
    if transposed:  # smallest map whose transposed output has a pixel
        low = [1 + max(0, -(-(2 * p - d * (k - 1) - o) // s))
               for k, d, p, s, o in zip(kernel, dilation, padding, stride, output_padding)]
    else:  # smallest map that leaves one output pixel and is larger than the padding (reflect / circular need that)
        low = [max(d * (k - 1) + 1 - 2 * p, p + 1, 2) for k, d, p in zip(kernel, dilation, padding)]
    shape = tuple(draw(st.integers(v, v + 3)) for v in low)
    return dict(dim=dim, norm=norm, kernel=kernel, stride=stride, padding=padding, dilation=dilation, mode=mode,
                groups=groups, cin=cin, cout=cout, shape=shape, transposed=transposed,
                output_padding=output_padding, bias=bias, seed=draw(st.integers(0, 2**16)))


def form_options(case: Dict[str, Any]) -> Dict[str, Any]:
    """The constructor keywords of the case's transposed / bias-free form (none for the plain form)."""
    options: Dict[str, Any] = {}
    if case.get("transposed"):
        options.update(transposed=True, output_padding=case["output_padding"])
    if not case.get("bias", True):
        options["bias"] = False
    return options


def build(cls: type, case: Dict[str, Any], dtype=torch.float64):
    kwargs = dict(kernel_size=case["kernel"], stride=case["stride"], padding=case["padding"],
                  dilation=case["dilation"], groups=case["groups"], dim=case["dim"], norm=case["norm"],
                  **form_options(case))
    if accepts(cls, "padding_mode"):
        kwargs["padding_mode"] = case["mode"]
    block = randomize_all_(cls(case["cin"], case["cout"], **kwargs).double(), case["seed"]).to(dtype)
    x = torch.randn(2, case["cin"], *case["shape"], generator=torch.Generator().manual_seed(case["seed"] + 1),
                    dtype=torch.float64).to(dtype)
    return block, x


def check_deploy_equals_training_form(cls: type, case: Dict[str, Any], dtype, tol: float) -> None:
    block, x = build(cls, case, dtype)
    block.train()
    block(x).sum().backward()  # training-mode forward (batch statistics, running statistics updated)
    block.eval()
    with torch.no_grad():
        expected = block(x)
        conv = block.make_deploy_conv()
        kind = (TRANSPOSED if case["transposed"] else CONVS)[case["dim"]]
        assert type(conv) is kind and (conv.bias is not None) == case["bias"] and conv.weight.dtype == dtype
        assert (conv.padding_mode, conv.groups) == (case["mode"], case["groups"])
        if case["transposed"]:
            assert tuple(conv.output_padding) == case["output_padding"]
        kernel, bias = block.get_equivalent_kernel_bias()
        assert kernel.shape == conv.weight.shape and (case["bias"] or not bias.any())
        assert relative_difference(conv(x), expected) <= tol
        block.switch_to_deploy()
        assert block.deployed and block.deploy_conv_name in dict(block.named_children())
        assert relative_difference(block(x), expected) <= tol
        block.switch_to_deploy()  # idempotent
        assert relative_difference(block(x), expected) <= tol


@pytest.mark.parametrize("name", list(BLOCK_CLASSES))
def test_deploy_equals_training_form_float64(name):
    cls = BLOCK_CLASSES[name]

    @settings(max_examples=30, **SETTINGS)
    @given(forms(cls))
    def check(case):
        check_deploy_equals_training_form(cls, case, torch.float64, 1e-10)

    check()


@pytest.mark.parametrize("name", list(BLOCK_CLASSES))
def test_deploy_equals_training_form_float32(name):
    cls = BLOCK_CLASSES[name]

    @settings(max_examples=8, **SETTINGS)
    @given(forms(cls))
    def check(case):
        check_deploy_equals_training_form(cls, case, torch.float32, 1e-5)

    check()


@pytest.mark.parametrize("name", list(BLOCK_CLASSES))
def test_unsupported_agrees_with_the_constructor(name):
    cls = BLOCK_CLASSES[name]

    @settings(max_examples=40, **SETTINGS)
    @given(st.sampled_from([1, 2, 3]), st.sampled_from(NORM_KINDS), st.data())
    def check(dim, norm, data):
        kernel = tuple(data.draw(st.integers(1, 4)) for _ in range(dim))
        padding = tuple(data.draw(st.integers(0, 2)) for _ in range(dim))
        mode = data.draw(st.sampled_from(["zeros", "reflect"])) if accepts(cls, "padding_mode") else "zeros"
        form = dict(transposed=data.draw(st.booleans()), bias=data.draw(st.booleans())) \
            if accepts(cls, "transposed") else {}
        reason = cls.unsupported(dim=dim, kernel_size=kernel, stride=(1,) * dim, padding=padding,
                                 dilation=(1,) * dim, groups=1, padding_mode=mode, norm=norm, **form)
        extra = dict(padding_mode=mode) if accepts(cls, "padding_mode") else {}
        try:
            cls(2, 2, kernel, padding=padding, dim=dim, norm=norm, **extra, **form)
        except ValueError as error:
            assert reason is not None or "kernel_size must be" in str(error), str(error)
        else:
            assert reason is None
        assert reason is None or (isinstance(reason, str) and "\n" not in reason)

    check()


#: The block forms of issue 27 the contract runs over too: (label, constructor keywords, unsupported() keywords).
EXTRA_FORMS = {
    "plain": ({}, {}),
    "transposed": (dict(transposed=True, output_padding=1, stride=2), dict(transposed=True)),
    "no-bias": (dict(bias=False), dict(bias=False)),
}


def contract_kernel(cls: type) -> int:
    """The kernel size the per-form checks use: 3, or the smallest odd size the block has a plain form for
    (the dilated large-kernel block starts at 5)."""
    return next((k for k in (3, 5, 7) if cls.unsupported(dim=2, kernel_size=(k, k), stride=(1, 1), padding=(k // 2,) * 2,
                                                          dilation=(1, 1), groups=1, padding_mode="zeros",
                                                          norm="batch") is None), 3)


def form_accepted(cls: type, form: str, dim: int, norm: str, kernel: int = 0, padding: int = -1) -> bool:
    kernel = kernel or contract_kernel(cls)
    padding = kernel // 2 if padding < 0 else padding
    options, asked = EXTRA_FORMS[form]
    if asked and not accepts(cls, "transposed"):
        return False
    stride = options.get("stride", 1)
    return cls.unsupported(dim=dim, kernel_size=(kernel,) * dim, stride=(stride,) * dim, padding=(padding,) * dim,
                           dilation=(1,) * dim, groups=1, padding_mode="zeros", norm=norm, **asked) is None


@pytest.mark.parametrize("name", list(BLOCK_CLASSES))
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("form", list(EXTRA_FORMS))
def test_class_attributes_and_stored_options_rebuild_a_stored_block(name, dim, norm, form):
    cls = BLOCK_CLASSES[name]
    if not form_accepted(cls, form, dim, norm):
        return
    options_in, _ = EXTRA_FORMS[form]
    k = contract_kernel(cls)
    block = cls(4, 6, k, padding=k // 2, dim=dim, norm=norm, **options_in)
    state = block.state_dict()
    assert isinstance(cls.signature, str) and cls.signature
    # the plain unit (``base``) is recognised by its BN statistics: its BN-free form has none (a conv with a
    # scale and bias, stored as what it folds to); every multi-branch block is recognised in every form
    if not (getattr(BLOCK_REGISTRY[name], "plain", False) and norm == "none"):
        assert cls.signature in state
    assert isinstance(cls.recipe_options, tuple) and all(accepts(cls, o) for o in cls.recipe_options)
    options = cls.stored_options(state, 4)
    # a transposed block is stored like a conv one: the stock conv's class tells it, not the entries
    told = {k: v for k, v in options_in.items() if k != "bias"}
    assert options.get("bias", True) == options_in.get("bias", True)  # bias=False is read from the entries
    rebuilt = cls(4, 6, k, padding=k // 2, **options, **told)

    def shapes(entries):  # a frozen BN is stored like a BN without its batch count (ConvBN, OREPA: told apart by it
        return {k: tuple(v.shape) for k, v in entries.items() if not k.endswith("num_batches_tracked")}

    assert shapes(rebuilt.state_dict()) == shapes(state)
    result = rebuilt.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    randomize_all_(block, 4)
    rebuilt.load_state_dict(block.state_dict(), strict=False)
    x = torch.randn(2, 4, *(5,) * dim)
    with torch.no_grad():
        assert relative_difference(rebuilt.eval()(x), block.eval()(x)) <= 1e-6
    block.switch_to_deploy()
    deployed = getattr(block, cls.deploy_conv_name)
    assert isinstance(deployed, (TRANSPOSED if "transposed" in options_in else CONVS)[dim])
    assert (deployed.bias is None) == (options_in.get("bias", True) is False)


@pytest.mark.parametrize("name", list(BLOCK_CLASSES))
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("form", list(EXTRA_FORMS))
def test_load_main_branch_single_init_and_init_gamma(name, dim, norm, form):
    cls = BLOCK_CLASSES[name]
    if not form_accepted(cls, form, dim, norm):
        return
    options, _ = EXTRA_FORMS[form]
    k = contract_kernel(cls)
    block = randomize_all_(cls(3, 4, k, padding=k // 2, dim=dim, norm=norm, **options).double(), 1).eval()
    stock = TRANSPOSED[dim] if options.get("transposed") else CONVS[dim]
    conv = stock(3, 4, k, padding=k // 2, bias=options.get("bias", True),
                 **{k: v for k, v in options.items() if k in ("stride", "output_padding")}).double()
    follower = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](4).double() if norm != "none" else None
    randomize_all_(conv, 2)
    if follower is not None:
        randomize_all_(follower, 3).eval()
    x = torch.randn(2, 3, *(5,) * dim, dtype=torch.float64)
    with torch.no_grad():
        block.load_main_branch(conv.weight, conv.bias, follower)
        expected = conv(x) if follower is None else follower(conv(x))
        assert relative_difference(block(x), expected) <= 1e-10
        weight, main_norm = block.main_branch()
        assert weight.shape == conv.weight.shape and isinstance(main_norm, nn.Module)
        if norm != "frozen":  # all branch weights 0: the output no longer depends on the input
            block.init_gamma(0.0)
            out = block(x)
            assert torch.allclose(out, out.flatten(2)[..., :1].reshape(*out.shape[:2], *(1,) * dim).expand_as(out),
                                  rtol=0, atol=1e-12)
        block.single_init()  # idempotent after load_main_branch's own, whatever init_gamma did to the others


@pytest.mark.parametrize("kernel,dilation,dim,expected", [
    (3, 1, 2, 1), (5, 2, 2, 4), ((1, 3, 3), 1, 3, (0, 1, 1)), (4, 1, 1, 2), ((3, 5), (2, 1), 2, 2), ((3, 5), 1, 2, (1, 2)),
    ("3", 1, 2, 0)])
def test_dbb_and_orepa_default_padding_is_the_one_contract_rule(kernel, dilation, dim, expected):
    from acnet.block import ReparamBlock
    from acnet.dbb import DiverseBranchBlock
    from acnet.orepa import OREPABlock

    assert ReparamBlock.same_padding(kernel, dilation, dim) == expected
    if expected == 0:
        return
    for cls in (DiverseBranchBlock, OREPABlock):  # padding=None: the block's padding is that rule's
        block = cls(2, 2, kernel, dilation=dilation, dim=dim, padding=None)
        assert block.padding_nd == ((expected,) * dim if isinstance(expected, int) else expected), cls


def test_dbb_and_orepa_check_their_internal_channels_by_one_rule():
    from acnet.dbb import DiverseBranchBlock
    from acnet.orepa import OREPABlock

    for cls in (DiverseBranchBlock, OREPABlock):
        for bad in (0, 3, 2.0, True):
            with pytest.raises(ValueError, match=rf"^{cls.__name__}: internal_channels_1x1_3x3 must be a positive "
                                                 rf"multiple of groups \(2\), got {bad!r}$"):
                cls(4, 4, 3, groups=2, internal_channels_1x1_3x3=bad)


@pytest.mark.parametrize("block_type", [n for n, t in BLOCK_REGISTRY.items() if not t.plain])
def test_the_plugin_and_the_builder_refuse_the_same_geometry_arguments(block_type):
    """One table of the arguments a caller sets from the conv (acnet.block.GEOMETRY_ARGUMENTS), read by both."""
    from acnet import convert_to_acnet
    from acnet.block import GEOMETRY_ARGUMENTS, block_option_names
    from constructor import make_builder

    cls = BLOCK_CLASSES[block_type]
    options = block_option_names(cls)
    assert options and not set(options) & GEOMETRY_ARGUMENTS
    for name in sorted(GEOMETRY_ARGUMENTS - {"deploy"}):  # (deploy: the builder's own argument)
        with pytest.raises(ValueError, match=f"does not take option\\(s\\) \\['{name}'\\]"):
            make_builder(block_type, **{name: 1})
    for name in sorted(GEOMETRY_ARGUMENTS):
        with pytest.raises(ValueError, match=f"{name} cannot be given"):
            convert_to_acnet(nn.Sequential(nn.Conv2d(2, 2, 3)), block_type, **{name: 1})
