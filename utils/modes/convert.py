"""``do_acnet.py --convert SRC DST [--format ours|acnet|dbb]``: training-time weights -> deploy weights.

The class count is the weights' own (an ImageFolder set may have any number of classes). With a
format other than ``ours`` the file gets the original repository's deploy names (SRC may then be
deploy weights already). DST is written atomically, read back and checked against SRC's model.
"""
from __future__ import annotations

from pathlib import Path

import torch

import constructor
from acnet import save_hdf5
from acnet.fileio import save_torch
from constructor.original_formats import EXPORT_USAGE, export_original, families_of, their_arch_name
from utils.command import Command
from utils.engine.distributed import DistContext
from utils.engine.evaluation import load_model_for_eval
from utils.engine.posttrain import convert_weights, describe_logit_diff
from utils.engine.trainer import cpu_state_dict
from utils.errors import UsageError
from utils.modes.registry import ConvertOptions

__all__ = ["run_convert", "convert_file"]


def run_convert(cmd: Command, ctx: DistContext, run_start: float) -> None:
    """The ``--convert SRC DST [--format F]`` mode (global rank 0 only)."""
    options: ConvertOptions = cmd.options
    convert_file(cmd.arch, cmd.block_type, options.src, options.dst, cmd.input_size, options.format)


def convert_file(arch: str, block_type: str, src: str, dst: str, input_size: int, fmt: str) -> None:
    """Convert ``src`` into ``dst`` and print the check (:class:`UsageError`: a command line that cannot run)."""
    if fmt != "ours":
        if fmt not in families_of(arch):
            raise UsageError(f"--format {fmt}: the DBB repository has no {arch}; export it with --format acnet")
    train_model = load_model_for_eval(arch, block_type, src, "cpu")
    deploy_keys = set(constructor.build_model(arch, block_type, deploy=True).state_dict())
    already_deploy = set(train_model.state_dict()) == deploy_keys
    if already_deploy and fmt == "ours":
        raise UsageError(f"--convert: {src} already holds deploy weights (nothing to convert)")
    deploy_model = train_model if already_deploy else convert_weights(train_model)
    state = cpu_state_dict(deploy_model)
    if fmt != "ours":  # the deploy names of the original repository
        try:
            state, scheme = export_original(arch, fmt, block_type, state)
        except ValueError as exc:
            raise UsageError(f"--format {fmt}: {exc}") from None
    if Path(dst).suffix in (".pth", ".pt"):
        save_torch(state, dst)
    else:
        save_hdf5(state, dst)
    check = load_model_for_eval(arch, block_type, dst, "cpu")
    with torch.no_grad():
        x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        reference = train_model(x)
        diff = (reference - check(x)).abs().max().item()
    print(f"converted {src} -> {dst} ({len(state)} tensors); deploy vs training-time logits on a random batch: "
          f"{describe_logit_diff(diff, reference.abs().max().item())}", flush=True)
    if fmt != "ours":
        usage = EXPORT_USAGE[fmt].format(arch=arch, their=their_arch_name(arch, fmt),
                                         their_type=scheme.info["their_block_type"])
        print(f"{dst} holds {scheme.description}: {usage}", flush=True)
