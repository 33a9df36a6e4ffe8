"""The freezing plugins under DDP: ``torchrun --nproc_per_node=2 worker_freeze.py OUT``.

Each scenario trains the README's transfer-learning set-up (an optimizer over the head
only; the plugin freezes the backbone and unfreezes it later) on this rank's half of
every global batch, then trains the same model in this process alone on the whole
global batches (``distributed=False``). It writes ``OUT/<scenario>.rank<r>.json`` with
the final parameters of both, so the test can require the ranks to agree bit for bit
*and* to match the single-process run (a broadcast cannot hide wrong training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _worker_common import dump, global_batches, init, params, run, shard
from _worker_common import same_on_all_ranks as same
from hookloop_freeze import Freeze, GradualUnfreeze, freeze_modules
from torch import nn

from hookloop import Loop

RANK, WORLD = init()


class Net(nn.Module):
    """A backbone (no BatchNorm: per-rank batch statistics would differ from the
    global batch's) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train(plugin: Callable[[], Any], *, distributed: bool, pre_freeze: bool = False,
          epochs: int = 3) -> tuple[Loop, list[float]]:
    model = Net()
    if pre_freeze:  # the user froze the backbone before building the loop
        freeze_modules(model, ["backbone"])
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9)
    data = global_batches(6, 8)
    loop = Loop(model, optimizer, shard(data, RANK, WORLD) if distributed else data,
                loss_fn=F.mse_loss, log_every_n_steps=3, autoload=False,
                distributed="auto" if distributed else False, plugins=[plugin()])
    loop.fit(max_epochs=epochs)
    return loop, params(loop.module)


def scenario(name: str, plugin: Callable[[], Any], **kwargs: Any) -> Callable[[], None]:
    def go() -> None:
        ddp, got = train(plugin, distributed=True, **kwargs)
        _, want = train(plugin, distributed=False, **kwargs)
        groups = [g["lr"] for g in ddp.optimizers[0].param_groups]
        dump(name, {
            "params": got, "reference": want, "same_on_ranks": same(got),
            "max_diff": max(abs(a - b) for a, b in zip(got, want)),
            "moved": max(abs(a - b) for a, b in zip(got, params(Net()))),
            "backbone_trainable": all(p.requires_grad for p in ddp.module.backbone.parameters()),
            "wrapped": type(ddp.model).__name__, "lrs": groups, "global_step": ddp.state.global_step,
        })
    return go


run(
    scenario("freeze", lambda: Freeze(["backbone"], unfreeze_at_epoch=1, lr_scale=0.1)),
    scenario("freeze_by_step", lambda: Freeze(["backbone"], unfreeze_at_step=4, lr_scale=0.5)),
    scenario("gradual", lambda: GradualUnfreeze(["backbone.2", "backbone.0"], every_n_epochs=1,
                                                lr_scale=[0.5, 0.25]), epochs=4),
    scenario("pre_frozen", lambda: Freeze(["backbone"], unfreeze_at_epoch=1, lr_scale=0.1),
             pre_freeze=True),
    scenario("growth", lambda: Freeze(["backbone"], unfreeze_at_epoch=1, lr=0.01, lr_growth=2.0,
                                      align_with_head=True), epochs=4),
)
