"""The CPU float32 training path: branches computed in channels_last, same numbers as the plain branch form.

The float64 tests elsewhere compare the fast path with the reference exactly; float64 has no oneDNN
kernels, so the branches stay NCHW there. These tests drive the float32 path (NCHW input, NCHW output
gradient, as a user's first layer sees them) against the float64 reference.
"""
from __future__ import annotations

import copy

import pytest
import torch

from acnet.acb import ACBlock
from acnet.fastpath import branch_input, layout_of
from acnet.dbb import DiverseBranchBlock
from test_acb import randomize_ as randomize_acb
from test_acb import reference_train_forward as acb_reference
from test_dbb import randomize_ as randomize_dbb
from test_dbb import reference_forward as dbb_reference


def _check_against_float64(block: torch.nn.Module, reference_forward, cin: int, hw: tuple[int, int]) -> None:
    reference = copy.deepcopy(block).double()
    gen = torch.Generator().manual_seed(5)
    x64 = torch.randn(4, cin, *hw, generator=gen, dtype=torch.float64) * 3 + 1
    x = x64.float().requires_grad_()
    x_ref = x64.clone().requires_grad_()
    for _ in range(2):  # two steps: the running statistics accumulate
        out = block(x)
        expected = reference_forward(reference, x_ref)
        assert out.is_contiguous()  # the branches ran NHWC; the output has the input's layout, as a conv's
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(grad.float())  # an NCHW gradient into the NCHW output (NHWC inside)
        expected.backward(grad)
    assert x.grad.is_contiguous()  # the input's gradient has the input's layout
    scale = x_ref.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-3, atol=1e-4 * scale)
    # absolute tolerance from the largest gradient: a per-channel scale right before a BN (e.g. a
    # depthwise 1x1) has a gradient that is zero in exact arithmetic, i.e. rounding noise in both
    grad_scale = max(p.grad.abs().max().item() for p in reference.parameters())
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-3, atol=1e-5 * grad_scale, msg=name)
    for (name, b), b_ref in zip(block.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b.double(), b_ref.double(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("k,stride,padding,groups,cin,cout", [
    (3, 1, 1, 1, 3, 5), (3, 2, 0, 1, 4, 4), (5, 1, 2, 2, 4, 6), (3, 1, 1, 4, 4, 4),
])
def test_acb_float32_training_matches_float64_reference(k, stride, padding, groups, cin, cout):
    block = randomize_acb(ACBlock(cin, cout, k, stride, padding, groups=groups), 11).train()
    _check_against_float64(block, acb_reference, cin, (9, 8))


@pytest.mark.parametrize("k,stride,groups,cin,cout,internal", [
    (3, 1, 1, 3, 4, None), (3, 2, 4, 4, 4, None), (5, 1, 2, 4, 2, 6),
])
def test_dbb_float32_training_matches_float64_reference(k, stride, groups, cin, cout, internal):
    block = randomize_dbb(DiverseBranchBlock(cin, cout, k, stride, groups=groups,
                                             internal_channels_1x1_3x3=internal), 12).train()
    _check_against_float64(block, dbb_reference, cin, (9, 8))


def test_branch_input_layout_rule():
    x = torch.randn(2, 3, 8, 9)
    assert layout_of(branch_input(x)) == torch.channels_last
    assert branch_input(x.double()).is_contiguous()  # float64: no oneDNN kernels, left NCHW
    cl = x.contiguous(memory_format=torch.channels_last)
    assert branch_input(cl).data_ptr() == cl.data_ptr()  # already NHWC: no copy
    flat = torch.randn(2, 3)
    assert branch_input(flat) is flat
    small = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)  # 16 < NHWC_MIN_PIXELS
    assert branch_input(small).is_contiguous()
