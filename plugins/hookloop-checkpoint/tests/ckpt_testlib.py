"""Shared by the tests and by the worker processes they start: a loop with dropout,
shuffling, a scheduler and python/numpy randomness, so that every RNG matters."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hookloop_checkpoint._io import MANIFEST_NAME
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hookloop import Loop

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ckpt_worker.py"


class Noisy(nn.Module):
    """Dropout plus python/numpy randomness in forward."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return self.net(x) * scale


def make_loop(plugins: list[Any] = (), width: int = 16, **kwargs: Any) -> Loop:
    """A seeded loop: 10 batches per epoch from a shuffling DataLoader, AdamW, StepLR."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(80, 4, generator=gen)
    y = (x.sum(1) > 0).long() + (x[:, 0] > 1).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    model = Noisy(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    kwargs.setdefault("log_every_n_steps", 3)
    return Loop(model, opt, loader, val_data=[(x[:16], y[:16])], loss_fn=nn.functional.cross_entropy,
                scheduler=sched, plugins=list(plugins), autoload=False, **kwargs)


def scramble_rng() -> None:
    """A fresh process would start from other RNG states."""
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)


def assert_same_run(a: Loop, b: Loop) -> None:
    """Parameters, optimizer and scheduler state, and every RNG: bit-identical."""
    for (name, pa), pb in zip(a.module.named_parameters(), b.module.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    sa, sb = a.optimizers[0].state_dict(), b.optimizers[0].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        for k, v in sa["state"][key].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][key][k])), (key, k)
    assert a.schedulers[0].state_dict() == b.schedulers[0].state_dict()
    assert a.state.global_step == b.state.global_step
    assert a.state.epoch == b.state.epoch


def rng_now() -> tuple[Any, ...]:
    """The global RNG states, comparable with ==/torch.equal."""
    return (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist())


def scripted(values: list[float], name: str = "val/score"):
    """A validation step that logs ``values[epoch]`` as ``name``."""

    def val_step(loop, batch):
        loop.log(name, values[loop.state.epoch])

    return val_step


def manifest(d: Path) -> dict:
    """The checkpoint folder's manifest, parsed."""
    return json.loads((d / MANIFEST_NAME).read_text())
