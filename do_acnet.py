#!/usr/bin/env python
"""Train an ACNet/DBB/OREPA/baseline model, convert it and test the deploy weights (the original's entry point).

Train (CIFAR-10 ResNet-56 with ACBs; baseline with -b base; DBB with -b dbb; OREPA with -b orepa)::

    python do_acnet.py -a src56 -b acb
    python do_acnet.py -a cfqkbnc -b acb --dataset synthetic --epochs 3      # offline smoke run, ~10 s on CPU

Distributed (the global batch is split over the ranks; NCCL on CUDA, gloo on CPU)::

    torchrun --nproc_per_node=8 do_acnet.py -a sres18 -b acb
    python -m torch.distributed.launch --nproc_per_node=8 do_acnet.py -a sres18 -b acb
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        do_acnet.py -a sres50 -b dbb --output-dir /shared/acnet_exps     # multi-node: a shared --output-dir

Outputs go to ``<output-dir>/<arch>_<block>_train/`` (``<arch>_<block>_<dataset>_train/`` when the
dataset is not the arch's own; ``..._s<seed>_train/`` for a --seed other than 0): log.txt, recipe.json,
init.hdf5, finish.hdf5, finish_deploy.hdf5, latest.pth (resumable, every epoch), summary.json,
tensorboard/. ``-c continue`` resumes from latest.pth; when finish.hdf5 exists training is skipped and
only the post-training steps run (a command whose recipe differs from the finished run's is refused).
Ctrl-C stops with exit status 130 and the resume command.

Standalone tools (no training)::

    python do_acnet.py -a src56 -b acb --eval-only weights.hdf5        # any form: training-time or deploy, hdf5 or .pth
    python do_acnet.py -a src56 -b acb --convert finish.hdf5 deploy.hdf5
    python do_acnet.py -a src56 -b acb --export-onnx finish.hdf5 src56.onnx [--quantize int8]   # ONNX (+ int8 PTQ)
    python do_acnet.py -a src56 -b acb --qat --init-weights finish.hdf5 --epochs 5                # int8 QAT
"""
from __future__ import annotations

import logging
import sys
import time

from utils.command import block_kwargs
from utils.errors import USER_ERRORS, UsageError, exit_status, exit_with_error
from utils.modes.cli import build_parser as _build_parser, check_args, command_from_args
from utils.modes.registry import MODES, get_mode

__all__ = ["main", "build_parser", "block_kwargs", "MODES"]


def build_parser():
    """The command line (utils/modes/cli.py: the common options and every mode's, utils/modes/registry.py)."""
    return _build_parser(description=__doc__)


def fail(message: str, rank: int, world_size: int, status: int = 1):
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    exit_with_error("do_acnet.py", f"{prefix}{message}", status)


def interrupted(cmd, exc: KeyboardInterrupt) -> str:
    """The one line for Ctrl-C: the mode's own (``Mode.on_interrupt``), else where the run stopped and how to go
    on (utils.engine.guards.interrupted_message)."""
    # the engine imports torch: only after a Ctrl-C, so that parsing (and -h) stays torch-free
    from utils.engine.guards import interrupted_message

    note = get_mode(cmd.mode).on_interrupt
    if note is not None:
        return note
    return interrupted_message(list(cmd.argv), cmd.paths().root, getattr(exc, "where", None),
                               getattr(exc, "saved", None))


def main(argv: list[str] | None = None) -> None:
    run_start = time.perf_counter()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    try:  # everything that needs no data and no model: nothing is written before it passes
        mode = check_args(args)
        cmd = command_from_args(args, mode, argv, script=__file__)
    except (UsageError, ValueError) as exc:
        parser.error(str(exc))  # the one-line usage hint, the error line, status 2
    # torch (the process group) only for a command that can run: -h and every refusal above stay torch-free
    from utils.engine.distributed import cleanup, init_distributed

    try:
        ctx = init_distributed(cmd.device, cmd.local_rank)
    except (UsageError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    try:
        if ctx.is_main or not mode.main_rank_only:
            mode.run(cmd, ctx, run_start)
    except USER_ERRORS as exc:  # one line; status 2 for a refusal (utils.errors.REFUSALS), else 1
        if ctx.is_main and isinstance(exc, UsageError):  # a command line that cannot run: the usage hint too
            parser.print_usage_hint()
        fail(str(exc), ctx.rank, ctx.world_size, status=exit_status(exc))
    except KeyboardInterrupt as exc:  # Ctrl-C: every file written is complete (atomic writes)
        fail(interrupted(cmd, exc), ctx.rank, ctx.world_size, status=130)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
