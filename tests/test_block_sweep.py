"""Crash sweep: every block type trains (forward + backward) on every small geometry and layout.

PyTorch's CPU weight gradient of a 1x1 strided conv on NHWC data with few input channels crashes
or corrupts the heap (see ``acnet.fastpath.NHWC_STRIDED_1X1_MIN_CHANNELS``); a block that sent such a conv to
oneDNN killed the whole process. Each case here runs in a worker subprocess
(``benchmarks/isolated.py``), so a crash or a hang fails its case and the sweep goes on.

Cases: every block type acnet exports (:func:`block_types`) x input channels 1..16 x stride 1, 2
x kernel 1, 3, 5 where the block accepts it (and 3 with dilation 2 for a few channel counts)
x groups 1 and depthwise x input layout NCHW, channels_last, and channels_last with the module
converted too (``module.to(memory_format=torch.channels_last)``, which makes even 1x1 weights
NHWC-strided). Each case trains on a 1x1, a 5x7 and a 64x64 map (the large one is where the oneDNN fault shows), checks every output and
gradient is finite, checks the eval-mode block equals its deploy conv, then trains the deployed
block once.

The other forms (``dim=1``, ``dim=3``, ``norm="frozen"``, ``norm="none"``) run a reduced grid
(:func:`form_cases`): input channels 3 and 16, strides 1 and 2, kernels 1 and 3, groups 1 and
depthwise; NCHW and channels_last with the module converted too (channels_last_3d in 3-d; 1-d cases NCL
only); maps 1, 7 and 64 (1-d), 1x1x1, 3x5x4 and 16x16x16 (3-d).
"""
from __future__ import annotations

import inspect
import itertools
import shutil
from typing import Any, Dict, List

import pytest
import torch

import acnet
from acnet.block import ReparamBlock
from acnet.fastpath import branch_input, layout_of, nhwc_faulty, run_conv
from benchmarks.bench_blocks import DEFAULT_SHAPES
from benchmarks.isolated import failures, run_isolated

CHANNELS = range(1, 17)
STRIDES = (1, 2)
KERNELS = (1, 3, 5)
LAYOUTS = ("nchw", "channels_last", "channels_last_module")
DILATED_CHANNELS = (1, 2, 3, 8, 15, 16)  # a 3x3 dilation-2 case for these input channel counts
SIZES = ((2, 1, 1), (2, 5, 7), (2, 64, 64))  # (batch, height, width)
FORM_SIZES = {1: ((2, 1), (2, 7), (2, 64)), 2: SIZES, 3: ((2, 1, 1, 1), (2, 3, 5, 4), (2, 16, 16, 16))}
FORM_CHANNELS = (3, 16)  # one count the oneDNN fault concerns (2..15), one just above
#: The reduced grid's forms: (dim, norm).
FORMS = ((1, "batch"), (3, "batch"), (2, "frozen"), (2, "none"), (1, "none"), (3, "frozen"))
OUT_CHANNELS = 8  # groups=1 cases; depthwise cases keep the channel count
CASE_TIMEOUT_S = 60.0
#: Blocks with a strided 1x1 conv (the unit itself, DBB's 1x1 branch, OREPA's 1x1 kernels): the full channel sweep.
FAULT_PRONE_BLOCKS = ("ConvBN", "ACBlock", "DiverseBranchBlock", "OREPABlock")


def block_types() -> Dict[str, type]:
    """Every concrete :class:`ReparamBlock` class acnet exports, by class name (a new block is picked up)."""
    found = {}
    for name in acnet.__all__:
        obj = getattr(acnet, name)
        if isinstance(obj, type) and issubclass(obj, ReparamBlock) and not inspect.isabstract(obj):
            found[obj.__name__] = obj
    return dict(sorted(found.items()))


def make_block(case: Dict[str, Any]) -> ReparamBlock:
    """The case's block: padding ``case["padding"]``, by default ``dilation * (K // 2)`` (the 'same' padding
    of an odd kernel); the transposed / bias-free forms when the case asks for them."""
    cls = block_types()[case["block"]]
    k, d = case["kernel"], case.get("dilation", 1)
    form = dict(dim=case.get("dim", 2), norm=case.get("norm", "batch"))
    if case.get("transposed"):
        form.update(transposed=True, output_padding=case.get("output_padding", 0))
    if not case.get("bias", True):
        form["bias"] = False
    return cls(case["cin"], case["cout"], k, case["stride"], padding=case.get("padding", d * (k // 2)), dilation=d,
               groups=case["groups"], **form)


def sweep_cases() -> List[Dict[str, Any]]:
    """Every valid case (a geometry the block's constructor refuses is not a case)."""
    cases = []
    for name in block_types():
        # the newer families (ECB, dilated) hold no strided 1x1 conv (the oneDNN fault's geometry): fewer channel counts
        for cin in CHANNELS if name in FAULT_PRONE_BLOCKS else DILATED_CHANNELS:
            for groups in sorted({1, cin}):
                cout = OUT_CHANNELS if groups == 1 else cin
                for stride in STRIDES:
                    for kernel, dilation in [(k, 1) for k in KERNELS] + [(3, 2)] * (cin in DILATED_CHANNELS):
                        case = dict(block=name, cin=cin, cout=cout, kernel=kernel, stride=stride, groups=groups,
                                    dilation=dilation)
                        try:
                            make_block(case)
                        except ValueError:
                            continue
                        cases.extend(dict(case, layout=layout) for layout in LAYOUTS)
    return cases


def form_kernels(name: str) -> tuple:
    """The reduced grid's kernels: 1 and 3, or 5 and 7 for a block with no form below 5 (the dilated
    large-kernel block)."""
    try:
        make_block(dict(block=name, cin=4, cout=4, kernel=3, stride=1, groups=1))
    except ValueError:
        return (5, 7)
    return (1, 3)


def form_cases() -> List[Dict[str, Any]]:
    """The reduced grid of the 1-d / 3-d / frozen / BN-free forms (a refused geometry is not a case)."""
    cases = []
    for name in block_types():
        for dim, norm in FORMS:
            layouts = ("nchw",) if dim == 1 else ("nchw", "channels_last_module")
            for cin in FORM_CHANNELS:
                for groups in sorted({1, cin}):
                    for stride, kernel in itertools.product(STRIDES, form_kernels(name)):
                        case = dict(block=name, cin=cin, cout=OUT_CHANNELS if groups == 1 else cin, kernel=kernel,
                                    stride=stride, groups=groups, dilation=1, dim=dim, norm=norm)
                        try:
                            make_block(case)
                        except ValueError:
                            continue
                        cases.extend(dict(case, layout=layout) for layout in layouts)
    return cases


#: The issue-27 grid: (transposed, stride, output_padding) x kernel x padding x input channels x layout, every
#: block type, the batch and the bias-free (bias=False) forms. Input channels 3 sit in the oneDNN fault's range
#: (the 1x1 stride-2 branch of DBB, a 1x1 stride-2 ConvBN / OREPA), 16 just above it (1x1 kernels only); the
#: transposed 1x1 with an output_padding crashes on NHWC data at any channel count (``nhwc_faulty_geometry``).
ISSUE27_GEOMETRIES = ((False, 1, 0), (False, 2, 0), (True, 1, 0), (True, 2, 0), (True, 2, 1))
ISSUE27_KERNELS = (1, 2, 3, 4)
ISSUE27_SIZES = ((2, 4, 5), (2, 64, 64))


def issue27_cases() -> List[Dict[str, Any]]:
    """The transposed x stride x padding x output_padding x channels grid (a refused geometry is not a case)."""
    cases = []
    for name in block_types():
        kernels = ISSUE27_KERNELS if form_kernels(name)[0] == 1 else (5,)
        for (transposed, stride, output_padding), kernel, cin, (norm, bias) in itertools.product(
                ISSUE27_GEOMETRIES, kernels, FORM_CHANNELS, (("batch", True), ("none", False))):
            for padding in (sorted({0, (kernel - 1) // 2}) if kernel < 5 else (1, 2)):  # (5: the 4x5 map needs 1)
                if cin == 16 and kernel != 1 and kernels is ISSUE27_KERNELS:
                    continue  # above the conv fault's channel range: only the 1x1 kernels (the fault's own)
                if kernel in (4, 5) and stride == 1:
                    continue  # a 4x4 kernel: the stride-2 down- / up-sampler is the case that matters
                case = dict(block=name, cin=cin, cout=OUT_CHANNELS, kernel=kernel, stride=stride, groups=1,
                            dilation=1, padding=padding, transposed=transposed, output_padding=output_padding,
                            norm=norm, bias=bias)
                try:
                    make_block(case)
                except ValueError:
                    continue
                # NCHW input runs NHWC inside the block too; the input layout matters for the strided ones
                layouts = ("channels_last_module",) if not bias else \
                    ("nchw", "channels_last") if stride == 2 and cin == 3 else ("channels_last",)
                cases.extend(dict(case, layout=layout) for layout in layouts)
    return cases


def _memory_format(dim: int) -> torch.memory_format:
    return torch.channels_last_3d if dim == 3 else torch.channels_last


def _input(case: Dict[str, Any], n: int, *spatial: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, case["cin"], *spatial, generator=gen)
    if case["layout"] != "nchw":
        x = x.contiguous(memory_format=_memory_format(case.get("dim", 2)))
    return x.requires_grad_()


def _train_step(block: torch.nn.Module, x: torch.Tensor, gen: torch.Generator, what: str) -> torch.Tensor:
    block.zero_grad(set_to_none=True)
    out = block(x)
    out.backward(torch.randn(out.shape, generator=gen))
    grads = [x.grad] + [p.grad for p in block.parameters() if p.requires_grad]
    if not torch.isfinite(out).all() or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise AssertionError(f"{what}: non-finite output or missing / non-finite gradient")
    return out


def run_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Worker side: train, check, deploy, train the deployed block (raises on a wrong result)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    block = make_block(case).train()
    dim = case.get("dim", 2)
    if case["layout"] == "channels_last_module":
        block = block.to(memory_format=_memory_format(dim))
    sizes = ISSUE27_SIZES if "padding" in case else FORM_SIZES[dim]
    for n, *spatial in sizes:
        x = _input(case, n, *spatial, gen=gen)
        _train_step(block, x, gen, f"training on {n}x{'x'.join(map(str, spatial))}")
    block.eval()
    with torch.no_grad():
        expected = block(x)
        fused = run_conv(block.make_deploy_conv(), x)  # a stock conv of a faulty geometry crashes on NHWC too
    diff = ((fused - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not diff < 1e-4:
        raise AssertionError(f"eval-mode block and its deploy conv differ by {diff:.2e} (relative)")
    # the input's memory format: channels-last strided and not also NCHW-contiguous (1 channel, 1x1 maps: both)
    fmt = _memory_format(dim)
    fmt = fmt if x.is_contiguous(memory_format=fmt) and not x.is_contiguous() else torch.contiguous_format
    if not expected.is_contiguous(memory_format=fmt):
        raise AssertionError(f"the block's output is not in its input's memory format ({fmt})")
    block.switch_to_deploy()
    block.train()
    _train_step(block, _input(case, *sizes[-1], gen=gen), gen, "training the deployed block")
    return {"relative_diff": diff}


def test_every_block_trains_on_every_small_geometry_without_crashing():
    cases = sweep_cases()
    assert set(block_types()) >= {"ConvBN", "ACBlock", "DiverseBranchBlock"}
    assert {c["block"] for c in cases} == set(block_types())  # every block has cases
    results = run_isolated("test_block_sweep:run_case", cases, CASE_TIMEOUT_S)
    bad = failures(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad)


def test_every_block_form_trains_on_a_reduced_grid_without_crashing():
    cases = form_cases()
    # every block type has cases in every form it accepts (ACB: no 1-d form)
    assert {(c["block"], c["dim"], c["norm"]) for c in cases} == {
        (name, dim, norm) for name in block_types() for dim, norm in FORMS if not (name == "ACBlock" and dim == 1)}
    results = run_isolated("test_block_sweep:run_case", cases, CASE_TIMEOUT_S)
    bad = failures(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad)


def test_every_issue27_form_trains_on_its_grid_without_crashing():
    cases = issue27_cases()
    assert {c["block"] for c in cases} == set(block_types())
    assert any(c["transposed"] and c["kernel"] == 1 and c["stride"] == 2 and c["cin"] == 3 and c["layout"] != "nchw"
               for c in cases)  # the oneDNN fault's region, transposed
    results = run_isolated("test_block_sweep:run_case", cases, CASE_TIMEOUT_S)
    bad = failures(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} cases failed:\n" + "\n".join(bad)


# --- the layout rule itself (in-process: these never reach the faulty kernel) -----------------
def test_blocks_with_a_strided_1x1_conv_on_few_channels_compute_nchw():
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    dbb = acnet.DiverseBranchBlock(3, 8, 3, stride=2)  # its dbb_1x1 branch: 1x1, stride 2, 3 inputs
    assert nhwc_faulty(dbb.dbb_1x1.conv) and not dbb.branches_nhwc()
    assert layout_of(branch_input(x, dbb.branches_nhwc())) == torch.contiguous_format  # the branches run NCHW
    assert layout_of(dbb(x)) == torch.channels_last  # and the output has the input's layout, as a conv's
    transposed = acnet.DiverseBranchBlock(16, 8, 1, stride=2, transposed=True, output_padding=1)
    assert nhwc_faulty(transposed.dbb_origin.conv) and not transposed.branches_nhwc()  # 1x1ᵀ with output_padding
    assert not nhwc_faulty(acnet.DiverseBranchBlock(16, 8, 3, stride=2, transposed=True, output_padding=1).dbb_1x1.conv)
    for block in (acnet.DiverseBranchBlock(16, 8, 3, stride=2), acnet.DiverseBranchBlock(3, 8, 3, stride=1),
                  acnet.ACBlock(3, 8, 3, stride=2, padding=1)):
        assert block.branches_nhwc()  # only the faulty geometry leaves the NHWC fast path
        assert layout_of(block(torch.randn(2, block.in_channels, 16, 16))) == torch.contiguous_format


def test_run_conv_gives_a_faulty_conv_nchw_input_and_weight():
    conv = torch.nn.Conv2d(3, 8, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
    assert conv.weight.stride() == (3, 1, 3, 3)  # the 1x1 kernel is NHWC-strided, PyTorch would pick NHWC
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = torch.nn.functional.conv2d(x.detach().contiguous(), conv.weight.detach().clone(), stride=2)
    out = run_conv(conv, x)
    assert conv.weight.stride() == (3, 1, 1, 1) and layout_of(out) == torch.contiguous_format
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()  # gradients reach the parameter and the input as usual
    assert conv.weight.grad is not None and x.grad.shape == x.shape
    Conv2d = torch.nn.Conv2d
    assert nhwc_faulty(Conv2d(15, 8, 1, stride=3))
    for fine in (Conv2d(16, 8, 1, stride=2), Conv2d(4, 8, 1, stride=2, groups=2), Conv2d(3, 8, 1), Conv2d(3, 8, 3, stride=2)):
        assert not nhwc_faulty(fine)


def test_the_benchmarked_shapes_stay_on_the_nhwc_path():
    for batch, channels, hw, k in DEFAULT_SHAPES:
        for block in (acnet.ACBlock(channels, channels, k, padding=k // 2),
                      acnet.DiverseBranchBlock(channels, channels, k)):
            assert block.branches_nhwc()
            assert layout_of(branch_input(torch.randn(1, channels, hw, hw), block.branches_nhwc())) == torch.channels_last


def run_compiled_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Worker side: train the case's block through ``torch.compile`` (the compiler picks layouts itself)."""
    block = make_block(case).train().to(memory_format=torch.channels_last)
    compiled = torch.compile(block)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # heap corruption shows after a few steps
        _train_step(compiled, _input(case, *SIZES[-1], gen=gen), gen, "training the compiled block")
    return {}


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_a_compiled_block_keeps_the_faulty_conv_off_nhwc():
    # the ConvBN 1x1 downsampling crashed under torch.compile until run_conv ran eagerly there
    cases = [dict(block="ConvBN", cin=3, cout=8, kernel=1, stride=2, groups=1, dilation=1, layout="channels_last_module")]
    results = run_isolated("test_block_sweep:run_compiled_case", cases, 300.0)
    assert not failures(cases, results), failures(cases, results)
