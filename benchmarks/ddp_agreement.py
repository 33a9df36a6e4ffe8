"""What the checkpoint plugin's rank agreement costs a DDP step (2 CPU processes, gloo).

Under DDP the checkpoint plugin exchanges its signal/time flags every
``agree_every_n_steps`` steps: a non-blocking all-reduce on a gloo side group, collected
at the next step. This runs a tiny MLP (32-64-64-1, batch 32 per rank) under
``torchrun --nproc-per-node 2`` with no checkpoint plugin and with the plugin at
``agree_every_n_steps`` 1, 10 and 100 (it never saves: no schedule, no final save),
interleaved over rounds, and prints the time per step after a warm-up with its spread,
and each variant over no plugin.

Run: ``torchrun --nproc-per-node 2 benchmarks/ddp_agreement.py [--steps N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn import functional as F

from hookloop import Loop
from hookloop.plugins import hookimpl

WARMUP = 50


class StepClock:
    """Stamps every optimizer step after the warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    @hookimpl
    def on_train_batch_end(self, loop: Loop) -> None:
        if loop.state.global_step >= WARMUP:
            self.times.append(time.perf_counter())


def one_fit(steps: int, every: int | None, folder: str) -> float:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    clock = StepClock()
    plugins: list[Any] = [clock]
    if every is not None:
        plugins.append(("checkpoint", {"dirpath": folder, "every_n_epochs": None, "save_last": False,
                                       "top_k": 1, "agree_every_n_steps": every}))
    with Loop(net, torch.optim.SGD(net.parameters(), lr=0.01), [(x, y)] * steps, loss_fn=F.mse_loss,
              plugins=plugins, autoload=False, log_every_n_steps=1000) as loop:
        loop.fit(max_epochs=1)
    span = clock.times[-1] - clock.times[0]
    return span / (len(clock.times) - 1) * 1e6


def vote_cost(n: int = 2000) -> float:
    """us per vote: start the side group's all-reduce, then wait for it (both ranks)."""
    from hookloop_checkpoint._agreement import Agreement

    agreement = Agreement(1)
    agreement.start()
    tdist.barrier()
    t0 = time.perf_counter()
    for step in range(n):
        agreement.step(step, None, False)
    agreement.drop()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tdist.init_process_group("gloo")
    variants: list[int | None] = [None, 1, 10, 100]
    got: dict[int | None, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                got[v].append(one_fit(args.steps, v, folder))
    vote = vote_cost()
    if tdist.get_rank() == 0:
        base = got[None]
        print(f"DDP tiny MLP, 2 CPU processes (gloo), {args.steps} steps x {args.rounds} rounds, "
              "us/step after warm-up: median [min..max]; over no plugin paired by round")
        for v in variants:
            ts = got[v]
            name = "no checkpoint plugin" if v is None else f"checkpoint, agree_every_n_steps={v}"
            over = [100 * (t / b - 1) for t, b in zip(ts, base, strict=True)]
            extra = "" if v is None else (f"  {statistics.median(over):+.1f}% "
                                          f"[{min(over):+.1f}..{max(over):+.1f}]")
            print(f"  {name:<38} {statistics.median(ts):8.1f} [{min(ts):.1f}..{max(ts):.1f}]{extra}")
        print(f"one vote alone (start, then collect at the next call), back to back: {vote:.1f} us")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
