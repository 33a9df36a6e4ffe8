"""The few torch.distributed calls the loop needs, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

__all__ = ["DistInfo", "all_gather_object", "all_reduce_sum", "barrier", "destroy", "set_epoch",
           "setup", "unwrap", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    """Whether the loop runs distributed, and where."""

    active: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the loop initialised the process group (and destroys it)


def setup(mode: str | bool, device: torch.device) -> DistInfo:
    """Use an initialised process group, or initialise one from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) when ``mode == "auto"``."""
    if mode is False or mode == "off" or not tdist.is_available():
        return DistInfo()
    if mode not in ("auto", True):
        raise ValueError(f"distributed={mode!r}; expected 'auto' or False")
    owns = False
    if not tdist.is_initialized():
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in env and "RANK" in env:
            backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(backend=backend)
            owns = True
        else:
            return DistInfo()
    world = tdist.get_world_size()
    if world <= 1:
        return DistInfo(owns_group=owns)
    return DistInfo(True, tdist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), owns)


def destroy() -> None:
    """Destroy the default process group (if it still exists)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # an older torch without FSDP2
        return type(model).__name__ == "FullyShardedDataParallel"
    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel unless it already is. Sharded models
    (FSDP) are refused: the loop's accumulation and state protocol are DDP's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        return model
    if _is_fsdp(model):
        raise NotImplementedError(
            "hookloop does not support FSDP models yet (gradient accumulation uses DDP's "
            "no_sync and checkpoints hold full state dicts); see docs/distributed.md"
        )
    if device.type == "cuda":
        return DDP(model, device_ids=[device.index if device.index is not None else 0])
    return DDP(model)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (in place) and return it."""
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object per rank, in rank order."""
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank."""
    tdist.barrier()


def set_epoch(data: Any, epoch: int) -> None:
    """Call ``set_epoch`` on a distributed sampler of ``data`` (a DataLoader), if any."""
    for obj in (getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None),
                                                         "sampler", None), data):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)
            return
