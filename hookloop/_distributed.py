"""The few torch.distributed calls the loop needs, in one place."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

__all__ = ["DistInfo", "all_gather_object", "all_reduce_sum", "barrier", "check_optimizers",
           "check_timeout", "destroy", "drop_unsynced_grads", "is_sharded", "no_sync", "set_epoch",
           "setup", "unwrap", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    """Whether the loop runs distributed, and where."""

    active: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the loop initialised the process group (and destroys it)


def check_timeout(timeout: float | timedelta | None) -> timedelta | None:
    """``timeout`` (seconds or a ``timedelta``) as a positive ``timedelta``; ``None`` stays
    ``None`` (torch's default). Anything else raises ``ValueError``."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        value = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if timeout != timeout or timeout in (float("inf"), float("-inf")):  # NaN, infinite
            raise ValueError(f"dist_timeout must be a finite number of seconds; got {timeout!r}")
        value = timedelta(seconds=timeout)
    else:
        raise ValueError(f"dist_timeout must be seconds (int or float) or a datetime.timedelta; "
                         f"got {type(timeout).__name__}")
    if value <= timedelta(0):
        raise ValueError(f"dist_timeout must be positive; got {timeout!r}")
    return value


def check_optimizers(optimizers: list[Any]) -> None:
    """Refuse optimizers whose state the loop cannot checkpoint: a
    ``ZeroRedundancyOptimizer`` shards its state over the ranks, and ``state_dict()``
    needs a ``consolidate_state_dict`` collective on every rank first."""
    if not tdist.is_available():
        return
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # a build without it
        return
    for opt in optimizers:
        if isinstance(opt, ZeroRedundancyOptimizer):
            raise NotImplementedError(
                "hookloop does not support torch.distributed.optim.ZeroRedundancyOptimizer yet "
                "(its state is sharded over the ranks; the loop's checkpoints take the full "
                "optimizer state from rank 0). Use a plain torch.optim optimizer (e.g. AdamW) "
                "with DDP; see 'Not supported yet' in docs/distributed.md"
            )


def setup(mode: str | bool, device: torch.device, timeout: timedelta | None = None) -> DistInfo:
    """Use an initialised process group, or initialise one from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) when ``mode == "auto"``, with ``timeout``
    (torch's default when ``None``). A ``timeout`` with a process group initialised
    elsewhere is an error: it belongs in that ``init_process_group`` call."""
    if mode is False or mode == "off" or not tdist.is_available():
        return DistInfo()
    if mode not in ("auto", True):
        raise ValueError(f"distributed={mode!r}; expected 'auto' or False")
    owns = False
    if not tdist.is_initialized():
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in env and "RANK" in env:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if timeout is None:
                tdist.init_process_group(backend=backend)
            else:
                tdist.init_process_group(backend=backend, timeout=timeout)
            owns = True
        else:
            return DistInfo()
    elif timeout is not None:
        raise ValueError(
            "dist_timeout applies only to a process group the loop creates; this process "
            "group was initialised before the loop: pass the timeout to "
            "torch.distributed.init_process_group(timeout=...) instead")
    world = tdist.get_world_size()
    if world <= 1:
        return DistInfo(owns_group=owns)
    return DistInfo(True, tdist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), owns)


def destroy() -> None:
    """Destroy the default process group (if it still exists)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``
    applied to it, the root): its parameters are ``DTensor`` shards."""
    cls = _fsdp2_class()
    return cls is not None and isinstance(model, cls)


def _is_fsdp1(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return type(model).__name__ == "FullyShardedDataParallel"
    return isinstance(model, FullyShardedDataParallel)


def _sharded_submodule(model: nn.Module) -> str | None:
    """The name of a submodule sharded with FSDP (1 or 2), ``None`` if there is none."""
    cls = _fsdp2_class()
    for name, sub in model.named_modules():
        if (cls is not None and isinstance(sub, cls)) or _is_fsdp1(sub):
            return name or "<root>"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (``model`` itself otherwise,
    also for a model sharded with ``fully_shard``, which changes the module in place)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel unless it already is one or is sharded
    with FSDP2 (``fully_shard``): both are used as they are. FSDP1
    (``FullyShardedDataParallel``) and a model whose submodules are sharded but whose
    root is not are refused."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) or is_sharded(model):
        return model
    if _is_fsdp1(model):
        raise NotImplementedError(
            "hookloop does not support FullyShardedDataParallel (FSDP1); shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead, see docs/distributed.md")
    inner = _sharded_submodule(model)
    if inner is not None:
        raise ValueError(
            f"submodule {inner!r} of the model is sharded with FSDP but the model itself is not: "
            f"apply torch.distributed.fsdp.fully_shard to the root module too (after its "
            f"submodules), see docs/distributed.md")
    if device.type == "cuda":
        return DDP(model, device_ids=[device.index if device.index is not None else 0])
    return DDP(model)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The context in which a backward accumulates gradients without synchronising
    them: DDP's ``no_sync()``, or ``set_requires_gradient_sync(False)`` for a model
    sharded with FSDP2 (set back to ``True`` on exit); a null context otherwise."""
    if is_sharded(model):
        return _fsdp_no_sync(model)
    fn = getattr(model, "no_sync", None)
    return fn() if callable(fn) else contextlib.nullcontext()


def drop_unsynced_grads(model: nn.Module) -> None:
    """Drop the gradients that FSDP2 holds unsharded after backwards run with
    ``set_requires_gradient_sync(False)`` (an accumulation window that never reached its
    synchronising micro-batch). ``optimizer.zero_grad`` does not reach them: they live
    on FSDP's unsharded parameters, and the next synchronising backward would add them.
    FSDP2 has no public call for this; the attributes are those of torch 2.13, and a
    torch without them leaves nothing to drop."""
    cls = _fsdp2_class()
    if cls is None:
        return
    for sub in model.modules():
        if not isinstance(sub, cls):
            continue
        state = getattr(sub, "_get_fsdp_state", lambda: None)()
        group = getattr(state, "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", ()):
            if hasattr(fsdp_param, "unsharded_accumulated_grad"):
                fsdp_param.unsharded_accumulated_grad = None
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None


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
