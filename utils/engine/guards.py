"""Checks that keep a run from silently doing something other than what the command asked.

* :func:`check_batch_fits`: a global batch larger than the training set (every epoch would be one
  smaller batch than the recipe and the log state);
* :func:`amp_cpu_warning`: bf16 autocast on a CPU without native bf16 instructions, which emulates
  bf16 and trains several times slower than float32;
* :func:`interrupted_message`: what a Ctrl-C left behind and how to resume, in one line.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from utils.errors import TrainingSetupError

__all__ = ["check_batch_fits", "cpu_has_native_bf16", "amp_cpu_warning",
           "resume_argv", "interrupted_message"]

#: Flags in /proc/cpuinfo of CPUs with native bf16 arithmetic (x86 AVX512-BF16 / AMX, Arm BF16).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_CONTI_FLAGS = ("-c", "--conti-or-fs", "--conti_or_fs")


def check_batch_fits(batch_size: int, num_train: int, world_size: int) -> None:
    """Raise :class:`utils.errors.TrainingSetupError` when the global batch is larger than the training set (after sharding)."""
    if batch_size > num_train:
        largest = num_train - num_train % world_size
        raise TrainingSetupError(f"the global batch size {batch_size} is larger than the training set ({num_train} images): "
                    f"every epoch would be one batch of {num_train}, not {batch_size} as the recipe and the log "
                    f"would state; pass --batch-size {largest} or less (a multiple of the {world_size} rank(s)) "
                    "or train on more images")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has native bf16 instructions (a flag of :data:`NATIVE_BF16_FLAGS`); ``None``: unknown."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None  # not Linux: cannot tell
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[-1].split()}
    return bool(flags & set(NATIVE_BF16_FLAGS))


def amp_cpu_warning(device_type: str, amp: bool) -> str | None:
    """The warning for ``--amp`` on a CPU that would emulate bf16, else ``None``."""
    if not amp or device_type != "cpu" or cpu_has_native_bf16() is not False:
        return None
    return ("--amp on a CPU without native bf16 (no avx512_bf16, amx_bf16 or bf16 flag in /proc/cpuinfo): "
            "bf16 autocast is emulated there and runs several times slower than float32 (about 7x measured "
            "on such a CPU); drop --amp (the CPU default) unless you mean to test bf16 numerics")


def resume_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with any ``-c/--conti-or-fs`` option replaced by ``-c continue``."""
    result: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _CONTI_FLAGS:
            skip = True
        elif not any(token.startswith(flag + "=") for flag in _CONTI_FLAGS[1:]) and not (
                token.startswith("-c") and token[2:] in ("fs", "continue", "restart", "=fs", "=continue", "=restart")):
            result.append(token)
    return [*result, "-c", "continue"]


def interrupted_message(argv: Sequence[str], run_dir: Path, where: str | None, saved: str | None) -> str:
    """One line after Ctrl-C: where the run stopped, what ``latest.pth`` holds, and how to go on.

    ``where``: e.g. ``"in epoch 3/10 at iteration 25"`` (``None``: outside the training loop);
    ``saved``: what the last resumable state holds (``None``: nothing saved by this process).
    """
    stopped = f"interrupted {where}" if where else "interrupted"
    command = shlex.join(["python", "do_acnet.py", *resume_argv(argv)])
    if (run_dir / "finish.hdf5").is_file():
        return (f"{stopped}: training had finished ({run_dir / 'finish.hdf5'} is complete); run the same command "
                "again to redo the post-training steps")
    if not (run_dir / "latest.pth").is_file():
        return f"{stopped}: no epoch was completed, so there is nothing to resume; run the same command again"
    holds = saved or "the state of the last completed epoch"
    return f"{stopped}; {run_dir / 'latest.pth'} holds {holds}; resume with: {command}"
