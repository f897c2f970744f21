"""Process-group setup for ``torchrun`` / ``torch.distributed.launch`` and small collective helpers.

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (both launchers set it, together
with ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). The local rank comes from ``LOCAL_RANK``
(torchrun, and ``torch.distributed.launch --use-env``) or from the ``--local-rank``/``--local_rank``
argument that ``torch.distributed.launch`` passes otherwise. Backend: NCCL on CUDA, gloo on CPU.
Every helper here is a no-op (or the identity) in a single-process run.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "init_distributed",
    "is_distributed",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_objects",
    "broadcast_object",
    "average_buffers",
    "barrier",
    "cleanup",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: global rank, world size, local rank, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"local rank {local_rank} has no GPU: only {count} CUDA device(s) visible")
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}; choose auto, cpu or cuda")


def init_distributed(device: str = "auto", local_rank_arg: int | None = None,
                     timeout_minutes: float = 30.0) -> DistContext:
    """Read the launcher's environment, pick the device and, for ``WORLD_SIZE`` > 1, join the group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
    if local_rank_arg is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (returned for chaining)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Make every floating-point buffer (BN running mean/var) the mean over ranks.

    Without SyncBN each rank's BN statistics see only its own shard; averaging them before every
    evaluation and checkpoint makes the saved statistics well defined (the same on every rank, the
    mean of the ranks' estimates). Integer buffers (``num_batches_tracked``) are equal on all ranks.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
