"""The default step's short path (one optimizer, nothing between forward, backward and
step) does exactly what the general path does: same parameters, same logs, same
counters, same errors; a plugin on a backward or optimizer hook takes the general path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hookloop import Loop
from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder


class SkipOddSteps:
    @hookimpl
    def on_train_batch_start(self, loop: Loop, batch_idx: int) -> None:
        if batch_idx % 2:
            loop.skip_optimizer_step()


class CountBackward:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def on_after_backward(self, loop: Loop) -> None:
        self.calls += 1


def run(plain: bool, *plugins: Any) -> tuple[Loop, HookRecorder]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)) for _ in range(10)]
    rec = HookRecorder(["on_log", "on_train_batch_end"])
    loop = Loop(net, opt, data, loss_fn=nn.functional.mse_loss, log_every_n_steps=3, autoload=False,
                scheduler=torch.optim.lr_scheduler.StepLR(opt, 4), scheduler_interval="step",
                plugins=[rec, *plugins])
    if not plain:
        loop._plain = lambda: False  # type: ignore[method-assign]
    loop.fit(max_epochs=2)
    return loop, rec


@pytest.mark.parametrize("extra", [(), (SkipOddSteps,)])
def test_the_short_path_equals_the_general_path(extra: tuple[type, ...]) -> None:
    fast, fast_rec = run(True, *(cls() for cls in extra))
    slow, slow_rec = run(False, *(cls() for cls in extra))
    for a, b in zip(fast.module.parameters(), slow.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fast.state.global_step == slow.state.global_step == (20 if not extra else 10)
    assert fast_rec.logged() == slow_rec.logged() and fast_rec.logged()
    assert fast.optimizers[0].state_dict()["param_groups"] == slow.optimizers[0].state_dict()["param_groups"]


def test_a_backward_hook_takes_the_general_path() -> None:
    counter = CountBackward()
    loop, _ = run(True, counter)
    assert counter.calls == 20 and loop.state.global_step == 20


def test_the_short_path_keeps_the_general_errors() -> None:
    net = nn.Linear(4, 1)
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), [torch.randn(2, 4)],
                loss_fn=nn.functional.mse_loss, autoload=False)
    with pytest.raises(TypeError, match="the default step expects batches"):
        loop.fit(max_epochs=1)
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), [(torch.randn(2, 4), torch.randn(2, 1))],
                loss_fn=lambda out, y: (out - y) ** 2, autoload=False)
    with pytest.raises(ValueError, match="must produce a scalar loss tensor; got \\(2, 1\\)"):
        loop.fit(max_epochs=1)


@pytest.mark.parametrize("plain", [True, False])
def test_the_last_loss_lives_until_the_next_forward_and_no_longer(plain: bool) -> None:
    """As in a hand-written loop, the previous step's loss (and so its graph, which
    holds the parameters' gradient accumulators for autograd to reuse) is alive while
    the next step's forward runs; after the fit nothing keeps any step's graph."""
    import gc
    import weakref

    losses: list[weakref.ref[torch.Tensor]] = []
    alive_at_forward: list[bool] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if losses:
            alive_at_forward.append(losses[-1]() is not None)
        loss = nn.functional.mse_loss(out, y)
        losses.append(weakref.ref(loss))
        return loss

    net = nn.Linear(4, 1)
    data = [(torch.randn(3, 4), torch.randn(3, 1)) for _ in range(4)]
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), data, loss_fn=loss_fn, autoload=False)
    if not plain:
        loop._plain = lambda: False  # type: ignore[method-assign]
    loop.fit(max_epochs=2)
    gc.collect()
    assert alive_at_forward == [True, True, True, False, True, True, True]  # the epoch's end lets go
    assert all(ref() is None for ref in losses)
