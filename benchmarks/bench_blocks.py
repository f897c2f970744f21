"""Training-mode cost of ACB and DBB relative to a plain conv+BN of the same shape.

Times forward + backward (parameter AND input gradients) in training mode (batch-statistics BN) of:
  conv+BN   the plain unit (``acnet.ConvBN``),
  ACB       ``acnet.ACBlock`` (fast training path),
  ACB-orig  the original three-branch forward (each branch conv -> BN, then two adds),
  DBB       ``acnet.DiverseBranchBlock`` (fast training path),
  DBB-orig  the original DBB forward (four branches, padded BNs, three adds).
Runs alternate between implementations (one timed run of each per round, the order rotating every
round) and the table reports the median conv+BN time and, per implementation, the median over rounds
of its time divided by the conv+BN time of the same round, so slow drifts of a shared machine's speed
cancel out.

A second table gives the other forms (``dim=1``, ``dim=3``, ``norm="frozen"``, ``norm="none"`` with and
without bias, an even 2x2 stride-2 kernel, ``transposed=True``): the fwd+bwd time of ACB / DBB / OREPA in
that form divided by the time of the plain unit it replaces (Conv1d + BatchNorm1d, Conv3d + BatchNorm3d,
Conv2d + frozen BN, Conv2d with or without bias, ConvTranspose2d / 3d + BN or without bias), alternated
and paired the same way.

    python benchmarks/bench_blocks.py                 # the six reference shapes, 2 threads
    python benchmarks/bench_blocks.py --rounds 15 --shapes 128,16,32,3 32,256,14,3
    python benchmarks/bench_blocks.py --no-forms      # the 2-d BN table only (also with --shapes)
    python benchmarks/bench_blocks.py --forms-only    # the other forms' table only
    python benchmarks/bench_blocks.py --families-only # the families table only (also with --shapes)

A third table gives the other families of the registry (RepVGG, MobileOne, and every block type registered
beside ACB / DBB / OREPA: :func:`family_types`): each block's fwd+bwd time over the plain unit it replaces
-- conv+BN for a block with a BN form, the plain conv with bias for a BN-free-only block -- on the same
shapes (channels in = out, stride 1: RepVGG's and MobileOne's identity branch is there) plus a depthwise
and a pointwise shape (MobileOne's two kinds of blocks), alternated and paired the same way.
    python benchmarks/bench_blocks.py --families-only --tiny   # a smoke run of the families' tables

A fourth table times the cases the families are for beside the 3x3 grid: ECB BN-free over the plain conv
with bias and ECB + BN, dilated re-param over a depthwise 7x7 / 13x13 conv+BN (UniRepLKNet's branches).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acnet.acb import ACBlock  # noqa: E402
from acnet.block import ConvBN  # noqa: E402
from acnet.dbb import DiverseBranchBlock  # noqa: E402
from acnet.norms import FrozenBatchNorm  # noqa: E402
from acnet.orepa import OREPABlock  # noqa: E402
from acnet.registry import BLOCK_REGISTRY  # noqa: E402

DEFAULT_SHAPES = [(128, 16, 32, 3), (128, 32, 16, 3), (128, 64, 8, 3), (32, 64, 56, 3), (32, 256, 14, 3),
                  (128, 32, 16, 5)]
ORIGINAL_ACB = [2.52, 2.30, 2.01, 2.04, 1.83, 1.76]
ORIGINAL_DBB = [6.34, 5.15, 4.14, 4.10, 2.88, None]


def original_acb_forward(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """The original ACBlock training forward: three conv -> BN branches and two adds."""
    ver_in, hor_in = block._side_inputs(x)
    square = block.square_bn(block.square_conv(x))
    vertical = block.ver_bn(block.ver_conv(ver_in))
    horizontal = block.hor_bn(block.hor_conv(hor_in))
    return square + vertical + horizontal


def original_dbb_forward(block: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """The original DBB training forward: each branch as a chain of modules, padded BNs via F.pad + fills."""
    def padded_bn(layer, y):
        out = layer.bn(y)
        p = layer.pad_pixels
        bn = layer.bn
        value = (bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps))
        out = F.pad(out, [p] * 4)
        value = value.view(1, -1, 1, 1)
        out[:, :, 0:p, :] = value
        out[:, :, -p:, :] = value
        out[:, :, :, 0:p] = value
        out[:, :, :, -p:] = value
        return out

    out = block.dbb_origin.bn(block.dbb_origin.conv(x))
    if hasattr(block, "dbb_1x1"):
        out = out + block.dbb_1x1.bn(block.dbb_1x1.conv(x))
    avg = block.dbb_avg
    if hasattr(avg, "conv"):
        pooled = F.avg_pool2d(padded_bn(avg.bn, avg.conv(x)), block.kernel_size, block.stride, 0)
    else:
        pooled = F.avg_pool2d(x, block.kernel_size, block.stride, block.padding)
    out = out + avg.avgbn(pooled)
    kxk = block.dbb_1x1_kxk
    first = kxk.idconv1(x) if hasattr(kxk, "idconv1") else kxk.conv1(x)
    out = out + kxk.bn2(kxk.conv2(padded_bn(kxk.bn1, first)))
    return block.nonlinear(out)


def make_step(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
              grad_out: torch.Tensor) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        out = forward(x)
        torch.autograd.grad(out, [x, *params], grad_out)

    return step


def time_alternated(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Per step, its time (ms) in each round: one run of every step a round, the order rotating every
    round (so slow drifts of a shared machine's speed hit every step alike), after ``warmup`` untimed runs."""
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def bench_shape(shape: Tuple[int, int, int, int], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Per implementation, its step time (ms) in each round."""
    n, c, hw, k = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    conv_bn = ConvBN(c, c, k, padding=k // 2).train()
    acb = ACBlock(c, c, k, padding=k // 2).train()
    dbb = DiverseBranchBlock(c, c, k, padding=k // 2).train()
    grad_out = torch.randn(n, c, hw, hw)
    steps = {
        "conv+BN": make_step(conv_bn, conv_bn, x, grad_out),
        "ACB": make_step(acb, acb, x, grad_out),
        "ACB-orig": make_step(lambda t: original_acb_forward(acb, t), acb, x, grad_out),
        "DBB": make_step(dbb, dbb, x, grad_out),
        "DBB-orig": make_step(lambda t: original_dbb_forward(dbb, t), dbb, x, grad_out),
    }
    return time_alternated(steps, rounds, warmup)


#: The other forms: (label, dim, norm, input shape N,C,*spatial, kernel, options). ``options``: the block's
#: ``stride`` / ``padding`` (default ``K // 2``) / ``transposed`` / ``output_padding`` / ``bias``, which the
#: plain unit takes too (a ConvTranspose for a transposed form, a conv without bias for ``bias=False``).
FORM_SHAPES = [
    ("1-D BN", 1, "batch", (32, 64, 512), 3, {}),
    ("3-D BN", 3, "batch", (4, 32, 8, 28, 28), 3, {}),
    ("3-D BN (1,3,3)", 3, "batch", (4, 32, 8, 28, 28), (1, 3, 3), {}),
    ("2-D frozen", 2, "frozen", (32, 64, 28, 28), 3, {}),
    ("2-D BN-free", 2, "none", (32, 64, 28, 28), 3, {}),
    ("2-D BN-free, no bias", 2, "none", (32, 64, 28, 28), 3, dict(bias=False)),
    ("3-D frozen", 3, "frozen", (4, 32, 8, 28, 28), 3, {}),
    ("2-D BN-free 2x2 s2", 2, "none", (32, 64, 56, 56), 2, dict(stride=2, padding=0)),
    ("2-D transposed BN", 2, "batch", (32, 64, 28, 28), 3, dict(stride=2, transposed=True, output_padding=1)),
    ("2-D transp. no bias", 2, "none", (32, 64, 28, 28), 3,
     dict(stride=2, transposed=True, output_padding=1, bias=False)),
    ("3-D transposed BN", 3, "batch", (4, 32, 8, 14, 14), 3, dict(stride=2, transposed=True, output_padding=1)),
]


def _padding(kernel, options: Dict) -> object:
    if "padding" in options:
        return options["padding"]
    return tuple((k - 1) // 2 for k in kernel) if isinstance(kernel, tuple) else (kernel - 1) // 2


def plain_unit(dim: int, norm: str, channels: int, kernel, options: Dict | None = None) -> nn.Module:
    """The conv (+ norm) a user's model holds where a block of this form goes."""
    options = dict(options or {})
    padding = _padding(kernel, options)
    transposed, bias = options.get("transposed", False), options.get("bias", True)
    cls = ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d) if transposed
           else (nn.Conv1d, nn.Conv2d, nn.Conv3d))[dim - 1]
    extra = dict(output_padding=options.get("output_padding", 0)) if transposed else {}
    conv = cls(channels, channels, kernel, stride=options.get("stride", 1), padding=padding,
               bias=norm == "none" and bias, **extra)
    if norm == "none":
        return conv
    follower = FrozenBatchNorm(channels) if norm == "frozen" else (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](channels)
    return nn.Sequential(conv, follower)


def bench_form(dim: int, norm: str, shape: Tuple[int, ...], kernel, rounds: int, warmup: int,
               options: Dict | None = None) -> Dict[str, List[float]]:
    """Per implementation (the plain unit, ACB, DBB, OREPA in this form), its step time (ms) in each round."""
    torch.manual_seed(0)
    options = dict(options or {})
    channels = shape[1]
    x = torch.randn(*shape, requires_grad=True)
    padding = _padding(kernel, options)
    modules = {"plain": plain_unit(dim, norm, channels, kernel, options).train()}
    asked = {k: options[k] for k in ("transposed", "bias") if k in options}
    stride = options.get("stride", 1)
    for name, cls in (("ACB", ACBlock), ("DBB", DiverseBranchBlock), ("OREPA", OREPABlock)):
        if cls.unsupported(dim=dim, kernel_size=(kernel,) * dim if isinstance(kernel, int) else kernel,
                           stride=(stride,) * dim, padding=(padding,) * dim if isinstance(padding, int) else padding,
                           dilation=(1,) * dim, groups=1, padding_mode="zeros", norm=norm, **asked) is None:
            modules[name] = cls(channels, channels, kernel, padding=padding, dim=dim, norm=norm,
                                **{k: v for k, v in options.items() if k != "padding"}).train()
    out_shape = modules["plain"](x).shape
    grad_out = torch.randn(*out_shape)
    steps = {name: make_step(m, m, x, grad_out) for name, m in modules.items()}
    return time_alternated(steps, rounds, warmup)


#: The families table's extra shapes (N, C, HW, K, groups): MobileOne's depthwise 3x3 and pointwise 1x1 blocks.
FAMILY_EXTRA_SHAPES = [(32, 128, 28, 3, 128), (32, 128, 28, 1, 1)]
#: The block types the first two tables have columns for.
TABLED_TYPES = ("acb", "dbb", "orepa")


def family_types() -> List[str]:
    """Every pluggable block type of the registry beside ACB / DBB / OREPA (RepVGG, MobileOne, ...), in order."""
    return [name for name, spec in BLOCK_REGISTRY.items() if not spec.plain and name not in TABLED_TYPES]


def family_form(name: str, kernel: int, groups: int) -> str | None:
    """The norm form a family block is timed in: ``"batch"`` where it has one, else ``"none"`` (BN-free); None
    when it has no form for this kernel."""
    cls = BLOCK_REGISTRY[name].block_class
    for norm in ("batch", "none"):
        if cls.unsupported(dim=2, kernel_size=(kernel, kernel), stride=(1, 1), padding=((kernel - 1) // 2,) * 2,
                           dilation=(1, 1), groups=groups, padding_mode="zeros", norm=norm) is None:
            return norm
    return None


def bench_family(shape: Tuple[int, ...], rounds: int, warmup: int) -> Dict[str, List[float]]:
    """Per family block type (and the plain units ``conv+BN`` / ``conv``), its step time (ms) in each round."""
    n, c, hw, k, *rest = shape
    groups = rest[0] if rest else 1
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    padding = (k - 1) // 2
    modules: Dict[str, nn.Module] = {"conv+BN": ConvBN(c, c, k, padding=padding, groups=groups).train(),
                                     "conv": nn.Conv2d(c, c, k, padding=padding, groups=groups).train()}
    for name in family_types():
        norm = family_form(name, k, groups)
        if norm is not None:
            modules[name] = BLOCK_REGISTRY[name].block_class(c, c, k, padding=padding, groups=groups,
                                                             norm=norm).train()
    grad_out = torch.randn(n, c, hw, hw)
    steps = {name: make_step(m, m, x, grad_out) for name, m in modules.items()}
    return time_alternated(steps, rounds, warmup)


def family_shapes(args: argparse.Namespace, shapes: List[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """The families table's shapes: ``--shapes``, else the reference shapes and the extra ones; ``--tiny``: 2x8x8."""
    chosen = shapes if args.shapes else DEFAULT_SHAPES + FAMILY_EXTRA_SHAPES
    return [(2, s[1], 8, *s[3:]) for s in chosen] if args.tiny else chosen


def print_families(args: argparse.Namespace, shapes: List[Tuple[int, ...]]) -> None:
    """The third table: every other family's fwd+bwd time over the plain unit it replaces."""
    names = family_types()
    if not names:
        return
    width = max(8, *(len(n) + 3 for n in names))
    header = f"{'N,C,HW,K,groups':>18} | {'conv+BN ms':>10} | " + " ".join(f"{n + '/pl':>{width}}" for n in names)
    print()
    print("other families: fwd+bwd over the plain unit they replace (conv+BN; the plain conv for a BN-free-only "
          "block, marked *)")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        times = bench_family(shape, args.rounds, args.warmup)
        cells = []
        for name in names:
            if name not in times:
                cells.append(f"{'-':>{width}}")
                continue
            bn_free = family_form(name, shape[3], shape[4] if len(shape) > 4 else 1) == "none"
            ratio = paired_ratio(times, name, "conv" if bn_free else "conv+BN")
            cells.append(f"{f'{ratio:.2f}' + ('*' if bn_free else ''):>{width}}")
        groups = shape[4] if len(shape) > 4 else 1
        print(f"{','.join(map(str, (*shape[:4], groups))):>18} | {statistics.median(times['conv+BN']):10.1f} | "
              + " ".join(cells), flush=True)


#: The newer families (issue 28), each over the plain unit it replaces: (label, block type, norm, input shape,
#: kernel, block options). ECB over the plain conv with bias (its BN-free form: the paper's), and over conv+BN;
#: dilated large-kernel re-param over a depthwise KxK conv+BN (UniRepLKNet's default branches).
FAMILY_CASES = [
    ("ECB BN-free 3x3", "ecb", "none", (32, 64, 28, 28), 3, {}),
    ("ECB + BN 3x3", "ecb", "batch", (32, 64, 28, 28), 3, {}),
    ("dilated 7x7 dw", "dilated", "batch", (32, 64, 28, 28), 7, dict(groups=64)),
    ("dilated 13x13 dw", "dilated", "batch", (32, 64, 28, 28), 13, dict(groups=64)),
]


def bench_family_case(block_type: str, norm: str, shape: Tuple[int, ...], kernel: int, rounds: int, warmup: int,
                 options: Dict | None = None) -> Dict[str, List[float]]:
    """Step times (ms) per round of the plain unit (``plain``: conv+BN, or a conv with bias for ``norm="none"``)
    and of the block type in that form (``block``), alternated."""
    torch.manual_seed(0)
    options = dict(options or {})
    channels, groups = shape[1], options.get("groups", 1)
    x = torch.randn(*shape, requires_grad=True)
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups, bias=norm == "none")
    plain = (conv if norm == "none" else nn.Sequential(conv, nn.BatchNorm2d(channels))).train()
    block = BLOCK_REGISTRY[block_type].block_class(channels, channels, kernel, padding=kernel // 2, norm=norm,
                                                   **options).train()
    grad_out = torch.randn(*plain(x).shape)
    return time_alternated({"plain": make_step(plain, plain, x, grad_out), "block": make_step(block, block, x, grad_out)},
                           rounds, warmup)


def print_family_cases(args: argparse.Namespace) -> None:
    """The fourth table: ECB and dilated re-param fwd+bwd over the plain unit they replace, at their shapes."""
    header = f"{'family':>18} | {'N,C,H,W':>14} | {'K':>3} | {'plain ms':>8} | {'block/plain':>11}"
    print()
    print("newer families: fwd+bwd over the plain unit (conv with bias for the BN-free ECB, else conv+BN)")
    print(header)
    print("-" * len(header))
    for label, block_type, norm, shape, kernel, options in FAMILY_CASES:
        if args.tiny:
            shape = (2, shape[1], 8, 8)
        times = bench_family_case(block_type, norm, shape, kernel, args.rounds, args.warmup, options)
        print(f"{label:>18} | {','.join(map(str, shape)):>14} | {kernel:>3} | {statistics.median(times['plain']):8.1f} | "
              f"{paired_ratio(times, 'block', 'plain'):11.2f}", flush=True)


def paired_ratio(times: Dict[str, List[float]], name: str, baseline: str = "conv+BN") -> float:
    """Median over rounds of ``time(name) / time(baseline)`` measured in the same round."""
    return statistics.median(t / b for t, b in zip(times[name], times[baseline]))


def geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per implementation (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="N,C,HW,K (default: the six reference shapes); N,C,HW,K,groups: the families table only")
    parser.add_argument("--no-forms", action="store_true", help="skip the table of the 1-D / 3-D / frozen / BN-free forms")
    parser.add_argument("--forms-only", action="store_true", help="only the table of the other forms")
    parser.add_argument("--no-families", action="store_true", help="skip the table of the other families")
    parser.add_argument("--families-only", action="store_true",
                        help="only the table of the other families (RepVGG, MobileOne, ...)")
    parser.add_argument("--tiny", action="store_true", help="the families' tables on 2x8x8 maps (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    if args.families_only:
        print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} alternated rounds; ratios: median of per-round ratios")
        print_families(args, family_shapes(args, shapes))
        print_family_cases(args)
        return 0
    if args.forms_only:
        print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} alternated rounds; ratios: median of per-round ratios")
        print_forms(args)
        return 0

    header = (f"{'N,C,HW,K':>16} | {'conv+BN ms':>10} | {'ACB/cb':>6} {'orig':>6} {'paper':>6} | "
              f"{'DBB/cb':>6} {'orig':>6} {'paper':>6}")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} alternated rounds; ratios: median of per-round ratios")
    print(header)
    print("-" * len(header))
    ratios: Dict[str, List[float]] = {"ACB": [], "ACB-orig": [], "DBB": [], "DBB-orig": []}
    for shape in [s for s in shapes if len(s) == 4]:  # N,C,HW,K,groups shapes are for the families table
        times = bench_shape(shape, args.rounds, args.warmup)
        row = {name: paired_ratio(times, name) for name in ratios}
        for name, value in row.items():
            ratios[name].append(value)
        ref = shape in DEFAULT_SHAPES and DEFAULT_SHAPES.index(shape)
        paper_acb = ORIGINAL_ACB[ref] if ref is not False else None
        paper_dbb = ORIGINAL_DBB[ref] if ref is not False else None
        fmt = lambda v: f"{v:6.2f}" if v is not None else f"{'-':>6}"  # noqa: E731
        print(f"{','.join(map(str, shape)):>16} | {statistics.median(times['conv+BN']):10.1f} | {row['ACB']:6.2f} {row['ACB-orig']:6.2f} "
              f"{fmt(paper_acb)} | {row['DBB']:6.2f} {row['DBB-orig']:6.2f} {fmt(paper_dbb)}", flush=True)
    print("-" * len(header))
    print(f"{'geometric mean':>16} | {'':>10} | {geomean(ratios['ACB']):6.2f} {geomean(ratios['ACB-orig']):6.2f} "
          f"{'2.06':>6} | {geomean(ratios['DBB']):6.2f} {geomean(ratios['DBB-orig']):6.2f} {'4.37*':>6}")
    print("targets: ACB/conv+BN geomean <= 1.8, DBB/conv+BN geomean <= 3.5, no row slower than the original "
          "(* the original DBB geomean is over the first five shapes)")
    if not args.no_forms and not args.shapes:  # the forms table accompanies the reference shapes
        print_forms(args)
    if not args.no_families:
        print_families(args, family_shapes(args, shapes))
        print_family_cases(args)
    return 0


def print_forms(args: argparse.Namespace) -> None:
    """The second table: every other form's fwd+bwd time over its plain unit's."""
    header = f"{'form':>20} | {'N,C,*spatial':>16} | {'K':>7} | {'plain ms':>8} | {'ACB/pl':>6} {'DBB/pl':>6} {'OREPA/pl':>8}"
    print()
    print("other forms: fwd+bwd over the plain unit they replace (Conv1d/3d + BN, Conv2d + frozen BN, Conv2d with or "
          "without bias, ConvTranspose2d/3d + BN or without bias)")
    print(header)
    print("-" * len(header))
    for label, dim, norm, shape, kernel, options in FORM_SHAPES:
        times = bench_form(dim, norm, shape, kernel, args.rounds, args.warmup, options)
        cells = [f"{paired_ratio(times, name, 'plain'):{width}.2f}" if name in times else f"{'-':>{width}}"
                 for name, width in (("ACB", 6), ("DBB", 6), ("OREPA", 8))]
        k = "x".join(map(str, kernel)) if isinstance(kernel, tuple) else str(kernel)
        print(f"{label:>20} | {','.join(map(str, shape)):>16} | {k:>7} | {statistics.median(times['plain']):8.1f} | "
              + " ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
