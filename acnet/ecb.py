"""The Edge-oriented Convolution Block (ECB; ECBSR, Zhang et al., ACM MM 2021), fused into one KxK conv.

Branches, summed (no BN in any of them: the paper's block is BN-free), with the original's names
(xindongzhang/ECBSR ``models/ecb.py``):

* ``conv3x3``: the KxK conv with bias (the main branch);
* ``conv1x1_3x3``: 1x1 conv ``(k0, b0)`` to ``mid_channels`` (``int(out * depth_multiplier)``), then a KxK
  conv ``(k1, b1)``;
* ``conv1x1_sbx`` / ``conv1x1_sby`` (3-d: also ``conv1x1_sbz``): 1x1 conv ``(k0, b0)``, then the fixed
  Sobel mask along the width / height / depth times a learned per-channel ``scale``, plus ``bias``
  (:func:`acnet.transforms.sobel_kernel`; a 1-d block has only ``sbx``, the derivative ``[1, 0, -1]``);
* ``conv1x1_lpl``: the same with the Laplacian mask (:func:`acnet.transforms.laplacian_kernel`);
* ``with_idt``: the identity, where the block keeps the map (in == out, stride 1, odd K, "same" padding;
  otherwise off, as the original turns it off when in != out).

The intermediate map of each 1x1-then-mask / 1x1-then-KxK branch is padded with ``b0`` (the 1x1 conv's
value on a zero input; ECBSR's "explicitly padding with bias"), so each branch equals one conv on the
zero-padded input at every pixel (:func:`acnet.transforms.fuse_1x1_kxk`,
:func:`acnet.transforms.fuse_1x1_depthwise`); with a reflect / replicate / circular ``padding_mode`` the
intermediate map is padded in that mode (a 1x1 conv commutes with those paddings). The 3-tap masks sit
at the centre of a larger kernel (``(K - 1) // 2``; K >= 3 on every axis), read with the block's dilation.

Then ``bn``, the conv's own norm, kept after the sum (the block is ECB followed by what followed the conv):
``"batch"``: a ``BatchNorm{dim}d``; ``"frozen"``: a frozen BN; ``"none"`` (the paper's form): a learnable
per-channel scale and shift (an original ECB is this form with scale 1 and shift 0; ``bias=False``: no
bias anywhere, the maps padded with zeros). ``nonlinear`` (the original's ``act``, default identity) is
applied last and kept by the deploy form ``ecb_reparam`` (ECBSR's ``PlainSR`` ``conv3x3`` + ``act``).
No transposed form (``unsupported()`` says so).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import norms, transforms
from .block import IntOrTuple, ReparamBlock, stored_dim_option, apply_input_window, branch_window
from .fastpath import conv_nd, match_layout
from .schemes import NamingScheme, Rule

__all__ = ["ECBlock", "ECBSeqConv", "ECB_EDGE_BRANCHES", "ecbsr_scheme", "ecbsr_state_to_ours",
           "ecbsr_state_from_ours"]

#: The edge branches by dimension: ``(name, mask kind, axis)`` (2-d: ECBSR's sbx, sby, lpl).
ECB_EDGE_BRANCHES: Dict[int, Tuple[Tuple[str, str, int], ...]] = {
    1: (("conv1x1_sbx", "sobel", 0), ("conv1x1_lpl", "laplacian", 0)),
    2: (("conv1x1_sbx", "sobel", 1), ("conv1x1_sby", "sobel", 0), ("conv1x1_lpl", "laplacian", 0)),
    3: (("conv1x1_sbx", "sobel", 2), ("conv1x1_sby", "sobel", 1), ("conv1x1_sbz", "sobel", 0),
        ("conv1x1_lpl", "laplacian", 0)),
}


class ECBSeqConv(nn.Module):
    """The parameters of one sequential ECB branch (the original's ``SeqConv3x3``; its forward is the block's).

    ``kind="conv"``: ``k0`` ``(mid, C/g, 1..)``, ``b0``, ``k1`` ``(O, mid/g, *K)``, ``b1``; a mask kind
    (``"sobel"`` with ``axis``, ``"laplacian"``): ``k0`` ``(O, C/g, 1..)``, ``b0``, ``scale`` ``(O, 1, 1..)``,
    ``bias`` ``(O,)`` and the fixed ``mask`` ``(O, 1, 3..)`` (a persistent buffer: the original stores it).
    ``bias=False``: no ``b0`` / ``b1`` / ``bias``. Initial values as the original's.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, kernel: Sequence[int], groups: int, dim: int,
                 mid_channels: int = 0, axis: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.kind, self.axis = kind, axis
        conv = norms.conv_class(dim)
        width = mid_channels if kind == "conv" else out_channels
        first = conv(in_channels, width, 1, groups=groups, bias=bias)
        self.k0 = first.weight
        self.b0 = first.bias
        if kind == "conv":
            second = conv(width, out_channels, tuple(kernel), groups=groups, bias=bias)
            self.k1 = second.weight
            self.b1 = second.bias
            return
        self.scale = nn.Parameter(torch.randn(out_channels, 1, *(1,) * dim) * 1e-3)
        self.bias = nn.Parameter(torch.randn(out_channels) * 1e-3) if bias else None
        mask = transforms.sobel_kernel(dim, axis) if kind == "sobel" else transforms.laplacian_kernel(dim)
        self.register_buffer("mask", mask.expand(out_channels, 1, *mask.shape).clone())

    def taps(self) -> Tensor:
        """The depthwise kernel ``scale * mask`` ``(O, 1, 3..)`` of a mask branch."""
        return self.scale * self.mask.to(self.scale.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", axis={self.axis}" if self.kind == "sobel" else "")


def _zeros_like_channels(t: Tensor, n: int) -> Tensor:
    return t.new_zeros(n)


class ECBlock(ReparamBlock):
    """Edge-oriented Convolution Block for any conv geometry (module docstring); deploy form ``ecb_reparam``.

    Arguments: the conv's geometry (``padding`` default: "same", the original's), ``depth_multiplier`` (the
    1x1-KxK branch's width ``int(out_channels * depth_multiplier)``, rounded up to a multiple of ``groups``;
    ``mid_channels`` sets it directly), ``with_idt``, ``nonlinear``; ``dim`` / ``norm`` / ``bias`` the form.
    """

    deploy_conv_name = "ecb_reparam"
    signature = "conv1x1_lpl.mask"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple = 3,
        stride: IntOrTuple = 1,
        padding: Optional[IntOrTuple] = None,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        depth_multiplier: float = 2.0,
        with_idt: bool = False,
        nonlinear: Optional[nn.Module] = None,
        mid_channels: Optional[int] = None,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        dim: int = 2,
        norm: str = "batch",
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:  # "same" padding (the block contract's rule)
            padding = self.same_padding(kernel_size, dilation, dim)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding,
                            bias=bias)
        if mid_channels is None:
            if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, (int, float)) \
                    or not depth_multiplier > 0:
                raise ValueError(f"ECBlock: depth_multiplier must be a number > 0, got {depth_multiplier!r}")
            mid_channels = max(int(out_channels * depth_multiplier), 1)
            mid_channels = -(-mid_channels // groups) * groups
        if isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1 \
                or mid_channels % groups:
            raise ValueError(f"ECBlock: mid_channels must be a positive multiple of groups ({groups}), "
                             f"got {mid_channels!r}")
        self.depth_multiplier, self.mid_channels = depth_multiplier, mid_channels
        k, s, p, d = self.kernel_nd, self.stride_nd, self.padding_nd, self.dilation_nd
        self.with_idt = bool(with_idt) and in_channels == out_channels and all(v == 1 for v in s) and all(
            ki % 2 == 1 and pi == di * (ki // 2) for ki, pi, di in zip(k, p, d))
        if deploy:
            self.ecb_reparam = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
            return
        self.conv3x3 = norms.conv_class(dim)(in_channels, out_channels, k, stride=s, padding=p, dilation=d,
                                             groups=groups, bias=bias, padding_mode=padding_mode)
        self.conv1x1_3x3 = ECBSeqConv("conv", in_channels, out_channels, k, groups, dim, mid_channels, bias=bias)
        for name, kind, axis in ECB_EDGE_BRANCHES[dim]:
            setattr(self, name, ECBSeqConv(kind, in_channels, out_channels, k, groups, dim, axis=axis, bias=bias))
        self.bn = norms.make_norm(norm, out_channels, dim, main=True, eps=bn_eps, momentum=bn_momentum, bias=bias)
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear  # the original's act, after the sum
        self._mask_offsets = tuple(c - 1 for c in transforms.centre_offsets(k))
        self._mask_window = branch_window(k, (3,) * dim, self._mask_offsets, p, d)
        self._kxk_window = tuple((pi, pi) for pi in p)

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm,
                    transposed: bool = False, bias: bool = True) -> Optional[str]:
        reason = super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm,
                                     transposed=transposed, bias=bias)
        if reason is not None:
            return reason
        if transposed:
            return "ECB has no transposed form (its 1x1-then-mask branches are built for a conv)"
        if min(kernel_size) < 3:
            return (f"ECB on a {'x'.join(map(str, kernel_size))} kernel: its Sobel / Laplacian masks need a kernel "
                    "of at least 3 on every axis")
        return None

    # --- state ------------------------------------------------------------------------------
    def _edges(self) -> Tuple[ECBSeqConv, ...]:
        return tuple(getattr(self, name) for name, _, _ in ECB_EDGE_BRANCHES[self.dim])

    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(conv3x3.weight, bn)``: after :meth:`single_init` the block is ``bn(conv3x3(x) [+ x])``."""
        if self.deployed:
            raise RuntimeError("ECBlock: the block is deployed; its branches are gone")
        return self.conv3x3.weight, self.bn

    def single_init(self) -> None:
        """``k1``, ``b1`` of the 1x1-KxK branch and every edge branch's ``scale`` and ``bias`` 0: those branches
        add exactly zero (``k1`` / ``scale`` still get gradients); a trainable ``bn`` weight 1."""
        with torch.no_grad():
            seq = self.conv1x1_3x3
            seq.k1.zero_()
            if seq.b1 is not None:
                seq.b1.zero_()
            for edge in self._edges():
                edge.scale.zero_()
                if edge.bias is not None:
                    edge.bias.zero_()
            if norms.trainable_norm(self.bn):
                self.bn.weight.fill_(1.0)

    @torch.no_grad()
    def load_main_branch(self, conv_weight: Tensor, conv_bias: Optional[Tensor], norm: Optional[nn.Module]) -> None:
        """As the contract says; ``conv3x3.bias`` is set to 0 (the conv bias goes into ``bn``) and, with the
        identity branch, the identity is taken off the centre tap of ``conv3x3``."""
        super().load_main_branch(conv_weight, conv_bias, norm)
        if self.conv3x3.bias is not None:
            self.conv3x3.bias.zero_()
        if self.with_idt:
            self.conv3x3.weight.sub_(self._identity_kernel(self.conv3x3.weight))

    def init_gamma(self, gamma_value: float) -> None:
        """Set ``bn``'s weight (the one norm) to ``gamma_value`` (a frozen one is left as it is)."""
        with torch.no_grad():
            for n in self._trainable_norms([self.bn]):
                n.weight.fill_(gamma_value)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        options: Dict[str, object] = {}
        if "conv1x1_3x3.k0" in state:
            options["mid_channels"] = int(state["conv1x1_3x3.k0"].shape[0])
        if "with_idt" in state:
            options["with_idt"] = bool(state["with_idt"])
        options.update(stored_dim_option(state, "conv3x3.weight"))
        if "bn.weight" in state and "bn.running_mean" not in state:
            options["norm"] = "none"
            if "bn.bias" not in state:
                options["bias"] = False
        return options

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # the identity branch is stored as a flag
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.with_idt and not self.deployed:  # (a deployed block's kernel holds the identity)
            destination[prefix + "with_idt"] = torch.ones((), dtype=torch.bool)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "with_idt"
        flag = state_dict.get(key)
        if self.deployed:
            pass
        elif flag is not None and bool(flag) != self.with_idt:
            error_msgs.append(f"{key}: the stored block has with_idt={bool(flag)}, this one {self.with_idt}")
        elif flag is None and self.with_idt and strict:
            missing_keys.append(key)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != key} if flag is not None
                                      else state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # --- forward ----------------------------------------------------------------------------
    def _padded(self, u: Tensor, window, value: Optional[Tensor]) -> Tensor:
        """``u`` (a 1x1 conv's output) padded / cropped by ``window``; zeros mode pads with ``value`` per channel."""
        if self.padding_mode != "zeros":  # pad as the KxK conv pads its input, then crop to the window
            full = tuple((p, p) for p in self.padding_nd)
            u = apply_input_window(u, full, self.padding_mode)
            return apply_input_window(u, tuple((b - p, a - p) for (b, a), p in zip(window, self.padding_nd)))
        if value is None:
            return apply_input_window(u, window)
        crop = tuple((min(b, 0), min(a, 0)) for b, a in window)
        if any(b or a for b, a in crop):
            u = apply_input_window(u, crop)
        pads = []
        for b, a in reversed(window):
            pads += [max(b, 0), max(a, 0)]
        if not any(pads):
            return u
        out = F.pad(u, pads)
        fill = value.to(out.dtype).reshape(1, -1, *([1] * self.dim))
        for axis, (b, a) in enumerate(window):
            for border in ((slice(None, b),) if b > 0 else ()) + ((slice(out.shape[2 + axis] - a, None),)
                                                                  if a > 0 else ()):
                index = [slice(None)] * out.dim()
                index[2 + axis] = border
                out[tuple(index)] = fill
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(self.ecb_reparam(x))
        s, d, g = self.stride_nd, self.dilation_nd, self.groups
        out = self.conv3x3(x)
        seq = self.conv1x1_3x3
        mid = conv_nd(x, seq.k0, seq.b0, 1, 0, 1, g)
        out = out + conv_nd(self._padded(mid, self._kxk_window, seq.b0), seq.k1, seq.b1, s, 0, d, g)
        for edge in self._edges():
            mid = conv_nd(x, edge.k0, edge.b0, 1, 0, 1, g)
            out = out + conv_nd(self._padded(mid, self._mask_window, edge.b0), edge.taps(), edge.bias, s, 0, d,
                                self.out_channels)
        if self.with_idt:
            out = out + x
        return self.nonlinear(match_layout(self.bn(out), x))

    # --- fusion -----------------------------------------------------------------------------
    def _identity_kernel(self, like: Tensor) -> Tensor:
        return transforms.identity_kernel(self.out_channels, self.groups, self.kernel_nd, dim=self.dim,
                                          dtype=like.dtype, device=like.device)

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``conv3x3 + fuse_1x1_kxk(conv1x1_3x3) + sum place(fuse_1x1_depthwise(edge)) [+ identity]``, then ``bn``."""
        if self.deployed:
            return self._deployed_kernel_bias()
        weight, n = self.conv3x3.weight, self.out_channels
        zero = weight.new_zeros(n)
        kernels = [weight]
        biases = [self.conv3x3.bias if self.conv3x3.bias is not None else zero]
        seq = self.conv1x1_3x3
        mid_zero = weight.new_zeros(self.mid_channels)
        k, b = transforms.fuse_1x1_kxk(seq.k0, seq.b0 if seq.b0 is not None else mid_zero, seq.k1,
                                       seq.b1 if seq.b1 is not None else zero, groups=self.groups)
        kernels.append(k)
        biases.append(b)
        for edge in self._edges():
            k, b = transforms.fuse_1x1_depthwise(edge.k0, edge.b0 if edge.b0 is not None else zero, edge.taps(),
                                                 edge.bias if edge.bias is not None else zero)
            kernels.append(transforms.place_kernel(k, self.kernel_nd, self._mask_offsets))
            biases.append(b)
        if self.with_idt:
            kernels.append(self._identity_kernel(weight))
            biases.append(zero)
        kernel, bias = transforms.add_branches(kernels, biases)
        return norms.fuse_norm(kernel, self.bn, bias)

    def switch_to_deploy(self) -> None:
        """Fuse into ``ecb_reparam`` and drop the branches (idempotent); ``nonlinear`` stays."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in ["conv3x3", "conv1x1_3x3", "bn"] + [name for name, _, _ in ECB_EDGE_BRANCHES[self.dim]]:
            delattr(self, name)
        self.ecb_reparam = fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mid_channels={self.mid_channels}, with_idt={self.with_idt}"


# --------------------------------------------------------------------------------------------
# the original's block state dicts (xindongzhang/ECBSR models/ecb.py ECB; deploy: models/plainsr.py Conv3X3)
# --------------------------------------------------------------------------------------------
def ecbsr_scheme(block: ECBlock) -> NamingScheme:
    """ECBSR's ``ECB`` names for a training-form ``block`` (``norm="none"``; their names are ours, but for
    ``act.*`` = our ``nonlinear.*``), or ``PlainSR``'s ``Conv3X3`` (``conv3x3``, ``act``) for a deployed one.
    Our ``bn`` (scale 1, shift 0 for an original block) has no place there: :func:`ecbsr_state_to_ours` /
    :func:`ecbsr_state_from_ours` add it / fold it."""
    ours = {k: tuple(v.shape) for k, v in block.state_dict().items() if k != "with_idt"}
    pairs = []
    for key in ours:
        if key.startswith("nonlinear."):
            pairs.append(("act." + key[len("nonlinear."):], key))
        elif key.startswith("ecb_reparam."):
            pairs.append(("conv3x3." + key[len("ecb_reparam."):], key))
        elif not key.startswith("bn."):
            pairs.append((key, key))
    rules = tuple(Rule("copy", (theirs,), (own,)) for theirs, own in pairs)
    kind = "PlainSR Conv3X3" if block.deployed else "ECB"
    return NamingScheme(f"ecbsr/{kind}", f"ECBSR's {kind}", rules, {t: ours[o] for t, o in pairs},
                        {o: ours[o] for _, o in pairs})


def ecbsr_state_to_ours(block: ECBlock, state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our state dict for ``block`` (``norm="none"``) from an original ECB's (or PlainSR Conv3X3's) block state dict."""
    if block.norm != "none":
        raise ValueError("ecbsr_state_to_ours: an original ECB has no norm; build the block with norm='none'")
    result = ecbsr_scheme(block).to_ours(state)
    if not block.deployed:
        result["bn.weight"] = torch.ones(block.out_channels, dtype=block.conv3x3.weight.dtype)
        if block.bn.bias is not None:
            result["bn.bias"] = torch.zeros(block.out_channels, dtype=block.conv3x3.weight.dtype)
        if block.with_idt:
            result["with_idt"] = torch.ones((), dtype=torch.bool)
    return result


@torch.no_grad()
def ecbsr_state_from_ours(block: ECBlock) -> Dict[str, Tensor]:
    """The original ECB's state dict (PlainSR Conv3X3's for a deployed block) equal to ``block``
    (``norm="none"``): our ``bn`` scale ``a`` and shift ``c`` are folded exactly into the branches
    (``conv3x3``: ``a * W``, ``a * b + c``, plus ``(a - 1) * identity`` when ``with_idt``; ``k1``, ``b1``,
    ``scale``, ``bias`` times ``a``)."""
    if block.norm != "none":
        raise ValueError("ecbsr_state_from_ours: an original ECB has no norm; only norm='none' blocks export")
    state = {k: v.detach().clone() for k, v in block.state_dict().items() if k != "with_idt"}
    if not block.deployed:
        a = state.pop("bn.weight")
        c = state.pop("bn.bias", torch.zeros_like(a))
        view = a.reshape(-1, *([1] * (block.dim + 1)))
        weight = state["conv3x3.weight"] * view
        if block.with_idt:
            weight = weight + (view - 1) * block._identity_kernel(weight)
        state["conv3x3.weight"] = weight
        if "conv3x3.bias" in state:
            state["conv3x3.bias"] = state["conv3x3.bias"] * a + c
        elif bool(c.ne(0).any()):
            raise ValueError("ecbsr_state_from_ours: bn has a shift but the block no biases")
        state["conv1x1_3x3.k1"] = state["conv1x1_3x3.k1"] * view
        if "conv1x1_3x3.b1" in state:
            state["conv1x1_3x3.b1"] = state["conv1x1_3x3.b1"] * a
        for name, _, _ in ECB_EDGE_BRANCHES[block.dim]:
            state[f"{name}.scale"] = state[f"{name}.scale"] * view
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"] * a
    return ecbsr_scheme(block).from_ours(state)
