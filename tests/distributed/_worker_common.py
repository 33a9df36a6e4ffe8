"""Shared pieces of the torchrun worker scripts (run as ``torchrun ... worker_x.py OUT``).

Every worker calls :func:`init` first: once the process group is up and a first
barrier passed, it writes the handshake file ``OUT/started.rank<N>``. The launch helper
(``_launch.py``) reads these to tell a failure of the set-up (rendezvous, port clash,
process-group creation: retried once) from a failure of the worker's own code (never
retried). Every worker ends through :func:`run`, which destroys the process group in a
``finally``: a gloo process group left to the interpreter's exit is torn down while its
C++ threads may still be joinable, which aborts the process (``terminate called without
an active exception``, SIGABRT).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from hookloop.plugins import hookimpl

IN, OUT_F = 4, 1


def out_dir() -> Path:
    return Path(sys.argv[1])


HANDSHAKE = "started.rank{rank}"


def init() -> tuple[int, int]:
    """Initialise the process group from torchrun's environment (gloo), check it with a
    barrier, then write the handshake file ``OUT/started.rank<N>``."""
    if not tdist.is_initialized():
        tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    tdist.barrier()
    (out_dir() / HANDSHAKE.format(rank=rank)).write_text("up\n")
    return rank, world


def destroy() -> None:
    """Destroy the process group if there is one (safe to call twice)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def run(*scenarios: Callable[[], None], barrier: bool = True) -> None:
    """Run ``scenarios`` in order (with a barrier after each when ``barrier``), and
    destroy the process group in a ``finally``, whatever happens."""
    try:
        for fn in scenarios:
            fn()
            if barrier:
                tdist.barrier()
    finally:
        destroy()


def dump(name: str, data: dict[str, Any]) -> None:
    path = out_dir() / f"{name}.rank{tdist.get_rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, OUT_F))


def global_batches(n: int, size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, IN, generator=g), torch.randn(size, OUT_F, generator=g)) for _ in range(n)]


def shard(batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int) -> list[Any]:
    """This rank's contiguous slice of every global batch."""
    out = []
    for x, y in batches:
        per = x.shape[0] // world
        out.append((x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
    return out


def params(module: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).tolist()


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def same_on_all_ranks(obj: Any) -> bool:
    gathered: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


class Recorder:
    """Records what the hooks see on this rank."""

    def __init__(self) -> None:
        self.logs: list[list[Any]] = []
        self.seen: dict[str, Any] = {}
        self.epoch_ends: list[list[Any]] = []
        self.batches: list[list[Any]] = []

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        s = loop.state
        self.seen = {"rank": s.rank, "world_size": s.world_size, "is_global_zero": s.is_global_zero,
                     "model": type(loop.model).__name__, "module": type(loop.module).__name__}

    @hookimpl
    def on_log(self, metrics: Any, step: int) -> None:
        self.logs.append([step, dict(sorted(metrics.items()))])

    @hookimpl
    def on_train_batch_start(self, loop: Any, batch: Any, batch_idx: int) -> None:
        if len(batch) > 2:
            self.batches.append([loop.state.epoch, batch[2].tolist()])

    @hookimpl
    def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
        s = loop.state
        self.epoch_ends.append([epoch, s.global_step, s.epoch_batches_done, s.should_stop])
