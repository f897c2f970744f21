"""Process-group setup for ``torchrun`` / ``torch.distributed.launch`` and small collective helpers.

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (both launchers set it, together
with ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). ``RANK`` is the global rank (0 .. world size - 1
over all nodes): global rank 0 alone writes the run's files. The local rank (the process's index on
its node, which picks its GPU) comes from ``LOCAL_RANK`` (torchrun, and ``torch.distributed.launch
--use-env``) or from the ``--local-rank``/``--local_rank`` argument that ``torch.distributed.launch``
passes otherwise. Backend: NCCL on CUDA, gloo on CPU. Every helper here is a no-op (or the identity)
in a single-process run.

Multi-node (``torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT``): the
output directory must be one that every node sees (ranks read ``finish.hdf5`` / ``latest.pth`` back;
:func:`ranks_not_seeing` checks it), and :func:`in_turn` lets a dataset download happen once per
shared folder instead of in every process at the same time.
"""
from __future__ import annotations

import datetime
import inspect
import os
import secrets
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from acnet.fastpath import as_nchw, nhwc_faulty

__all__ = [
    "DistContext",
    "init_distributed",
    "is_distributed",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_objects",
    "broadcast_object",
    "average_buffers",
    "data_parallel",
    "barrier",
    "cleanup",
    "in_turn",
    "ranks_not_seeing",
]

T = TypeVar("T")


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


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def data_parallel(model: nn.Module, device_ids: list[int] | None) -> DistributedDataParallel:
    """``model`` in DDP without buffer syncing in ``forward`` (each rank keeps its own BN statistics until
    :func:`average_buffers`), every gradient in exactly its parameter's strides (:func:`_own_strides`).

    ``forward_sync_buffers=False`` (torch >= 2.13; older: the deprecated ``broadcast_buffers=False``) also
    broadcasts the buffers once at construction, when they are equal on every rank anyway (a fresh
    model or the same loaded state). DDP lays its gradient buckets out in the parameters' strides, so
    the weights that :func:`acnet.fastpath.run_conv` gives NCHW strides in place on its first CPU
    forward get them here, before DDP reads them.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, _CONVS) and isinstance(weight, nn.Parameter)
                and weight.device.type == "cpu" and nhwc_faulty(module)):
            weight.data = as_nchw(weight.data)
    for param in model.parameters():
        if param.requires_grad and 1 in param.shape:
            param.register_hook(_own_strides(param))
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _own_strides(param: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook giving a gradient of ``param``'s memory order ``param``'s exact strides (a view).

    The stride of a size-1 dimension addresses nothing: autograd keeps a gradient whose strides match
    its parameter's on every other dimension, whatever the size-1 ones say, but DDP's reducer compares
    all strides with its bucket view (made from the parameter's) and warns "Grad strides do not match
    bucket view strides" once per process. Channels-last kernels (C, C', 1, 1) whose gradient comes
    through a composed kernel (DBB's identity-based 1x1, OREPA's branches) and depthwise (C, 1, k, k)
    kernels are such cases. A gradient of another memory order is left to autograd (it copies it).
    """
    ref = weakref.ref(param)  # the hook is stored on the parameter: no reference cycle

    def hook(grad: torch.Tensor) -> torch.Tensor:
        owner = ref()
        if owner is None or grad.layout != torch.strided or grad.shape != owner.shape:
            return grad
        strides = owner.stride()
        if grad.stride() == strides or any(size != 1 and a != b
                                           for size, a, b in zip(owner.shape, grad.stride(), strides)):
            return grad
        return grad.as_strided(owner.shape, strides, grad.storage_offset())

    return hook


def in_turn(fn: Callable[[], T], ctx: DistContext, failure: Callable[[list], Exception]) -> T:
    """``fn()`` on global rank 0 first, then on every other node's local rank 0, then on the other ranks.

    Each phase ends when every rank knows whether it succeeded: a download into a folder that all nodes
    share happens once (rank 0's), into a node-local folder once per node, and no two processes of a
    node write the same files at once. If ``fn`` raises on some ranks, they re-raise it and every other
    rank raises ``failure(failed_ranks)`` at the end of that phase (nobody waits for a dead rank).
    """
    if not ctx.distributed:
        return fn()
    my_phase = 0 if ctx.rank == 0 else 1 if ctx.local_rank == 0 else 2
    result, error = None, None
    for phase in range(3):
        if phase == my_phase:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, after telling the other ranks
                error = exc
        failed = [rank for rank, bad in enumerate(all_gather_objects(error is not None)) if bad]
        if error is not None:
            raise error
        if failed:
            raise failure(failed)
    return result  # type: ignore[return-value]


def ranks_not_seeing(folder: str | os.PathLike) -> list[int]:
    """The ranks that do not see what rank 0 sees at ``folder`` (``[]``: it is shared, or cannot be told).

    Rank 0 writes a random token into ``folder``, or into its nearest existing parent (nothing is
    created), and every rank reads it back through the same path. Collective: call it on every rank.
    """
    if not is_distributed():
        return []
    probe: str | None = None
    token = secrets.token_hex(8)
    if dist.get_rank() == 0:
        path = Path(folder)
        existing = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
        candidate = existing / f".shared_folder_check_{token}"
        try:
            candidate.write_text(token, encoding="utf-8")
            probe = str(candidate)
        except OSError:  # not writable here: no check
            probe = None
    probe, token = broadcast_object((probe, token))
    if probe is None:
        return []
    try:
        seen = Path(probe).read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    blind = [rank for rank, ok in enumerate(all_gather_objects(seen)) if not ok]
    if dist.get_rank() == 0:
        Path(probe).unlink(missing_ok=True)
    return blind


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
