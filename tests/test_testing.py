"""The test helpers themselves: the sync guard sees every thread and leaves torch as it
found it; a resumed run compares equal to an uninterrupted one, and the comparison
fails, naming the path, when anything a resume must restore differs."""

from __future__ import annotations

import dataclasses
import random
import threading
import timeit
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hookloop.testing import (
    HookRecorder,
    RunSnapshot,
    SyncGuard,
    assert_same_run,
    run_differences,
    snapshot_run,
    tiny_loop,
)

# ------------------------------------------------------------------------- sync guard

SYNC_OPS = ["item", "cpu", "tolist", "__float__", "__bool__"]


def _sync_five_ways(t: torch.Tensor) -> None:
    t.item()
    t.cpu()
    t.tolist()
    float(t)
    bool(t)


def _originals() -> dict[str, Any]:
    names = ["item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__",
             "__index__", "__format__", "nonzero", "to", "unique", "equal"]
    out = {f"Tensor.{n}": torch.Tensor.__dict__.get(n, "<inherited>") for n in names}
    out.update({f"Tensor.{n}.resolved": getattr(torch.Tensor, n) for n in names})
    for n in ("nonzero", "masked_select", "unique", "equal", "allclose", "is_nonzero"):
        out[f"torch.{n}"] = getattr(torch, n)
    return out


def test_guard_counts_threads_started_before_and_inside_it() -> None:
    go = threading.Event()
    t = torch.ones(())

    def worker() -> None:
        go.wait(5)
        _sync_five_ways(t)

    before = threading.Thread(target=worker, name="started-before")
    before.start()
    with SyncGuard() as guard:
        inside = threading.Thread(target=worker, name="started-inside")
        inside.start()
        go.set()
        before.join(5)
        inside.join(5)
    by_thread: dict[str, list[str]] = {}
    for e in guard.events:
        by_thread.setdefault(e.thread, []).append(e.op)
    assert by_thread == {"started-before": SYNC_OPS, "started-inside": SYNC_OPS}
    assert guard.count == 10
    assert guard.threads() == {"started-before", "started-inside"}
    assert all(e.where.startswith(f"{__file__}:") and e.where.endswith("_sync_five_ways")
               for e in guard.events), [e.where for e in guard.events]
    assert all(e.stack and e.stack[0] == e.where for e in guard.events)


def test_guard_records_the_loop_position_for_other_threads_too() -> None:
    class Background:
        """Syncs from a thread of its own at every step, as a careless tracker would."""

        def __init__(self) -> None:
            self.queue: list[torch.Tensor] = []

        def on_train_batch_end(self, outputs: Any) -> None:
            self.queue.append(outputs["loss"])
            thread = threading.Thread(target=self._drain, name="uploader")
            thread.start()
            thread.join(5)

        def _drain(self) -> None:
            while self.queue:
                self.queue.pop().item()

    loop = tiny_loop([Background()], log_every_n_steps=1000)
    with SyncGuard(loop) as guard:
        loop.fit(max_steps=3)
    uploads = [(e.op, e.step, e.stage) for e in guard.events if e.thread == "uploader"]
    assert uploads == [("item", 1, "train"), ("item", 2, "train"), ("item", 3, "train")]


def test_every_sync_point_is_counted_once() -> None:
    t = torch.tensor([0.0, 1.0, 1.0])
    s = torch.tensor(2.5)
    with SyncGuard() as guard:
        _ = f"{s:.2f}"  # Tensor.__format__ calls item(): counted once
        int(s)
        t.numpy()
        t.nonzero()
        torch.nonzero(t)
        t.unique()  # calls torch.unique: counted once
        torch.unique(t)
        torch.masked_select(t, t > 0)
        torch.equal(t, t)
        torch.allclose(t, t)
        torch.is_nonzero(s)
        t.to("cpu")
        t.to(device="cpu")
        t.to(t.device)  # already there: not a copy
        t.to(torch.float64)  # a cast: not a copy to the host
        _ = t + 1  # no sync
    assert [e.op for e in guard.events] == [
        "__format__", "__int__", "numpy", "nonzero", "nonzero", "unique", "unique",
        "masked_select", "equal", "allclose", "is_nonzero", "to", "to"]


def test_patches_are_restored_exactly_also_when_the_block_raises() -> None:
    original = _originals()
    with pytest.raises(RuntimeError, match="boom"), SyncGuard() as guard:
        assert torch.Tensor.__dict__.get("item") is not original["Tensor.item"]
        torch.ones(()).item()
        raise RuntimeError("boom")
    assert guard.count == 1
    assert _originals() == original
    with SyncGuard() as after:
        pass
    torch.ones(()).item()  # outside any guard: not counted
    assert after.count == 0 and _originals() == original


def test_nested_guards_each_count_what_happens_inside_them() -> None:
    original = _originals()
    t = torch.ones(())
    with SyncGuard() as outer:
        t.item()
        with SyncGuard() as inner:
            t.tolist()
        t.cpu()
        assert _originals() != original  # still counting for the outer guard
    assert [e.op for e in outer.events] == ["item", "tolist", "cpu"]
    assert [e.op for e in inner.events] == ["tolist"]
    assert _originals() == original


def test_guard_does_not_count_its_own_bookkeeping() -> None:
    class State:
        """A loop state whose step is read through a tensor."""

        stage = "train"

        @property
        def global_step(self) -> int:
            return int(torch.tensor(7))

    class Tensorish:
        """A loop whose bookkeeping syncs: that must not count."""

        state = State()

    with SyncGuard(Tensorish()) as guard:
        torch.ones(()).item()
    assert [(e.op, e.step) for e in guard.events] == [("item", 7)]


def test_guard_is_cheap_enough_for_a_fit_of_hundreds_of_steps() -> None:
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(100)]
    loop = tiny_loop(train_data=data, log_every_n_steps=50, val_data=None)
    with SyncGuard(loop) as guard:
        loop.fit(max_epochs=3)
    assert {e.step for e in guard.events} == {50, 100, 150, 200, 250, 300}
    # the cost per call, best of a few repeats (robust to a busy machine)
    t = torch.ones(3)

    def per_call(fn: Any) -> float:
        return min(timeit.repeat(fn, number=500, repeat=5)) / 500

    plain_to, plain_item = per_call(lambda: t.to(t.device)), per_call(lambda: t[0].item())
    with SyncGuard() as guard:
        guarded_to, guarded_item = per_call(lambda: t.to(t.device)), per_call(lambda: t[0].item())
    assert guard.count == 2500
    assert guarded_to - plain_to < 50e-6 and guarded_item - plain_item < 200e-6


# ------------------------------------------------------------------ resume comparison


class Tally:
    """A plugin with state: batches seen and the sum of their losses."""

    def __init__(self) -> None:
        self.batches = 0
        self.loss_sum = torch.zeros(())

    def on_train_batch_end(self, outputs: Any) -> None:
        self.batches += 1
        self.loss_sum += outputs["loss"]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "loss_sum": self.loss_sum.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]
        self.loss_sum = state["loss_sum"].clone()


class ForgetfulTally(Tally):
    """Saves its state but does not restore it: a broken resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Crash(Exception):
    """The process died."""


class CrashAt:
    """Saves ``loop.state_dict()`` like a checkpoint plugin would (after every other
    plugin), then the process dies."""

    def __init__(self, path: Path, *, step: int | None = None, epoch: int | None = None) -> None:
        self.path, self.step, self.epoch = path, step, epoch

    def on_train_batch_end(self, loop: Any) -> None:
        if loop.state.global_step == self.step:
            self._die(loop)

    def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
        if epoch == self.epoch:
            self._die(loop)

    def _die(self, loop: Any) -> None:
        torch.save(loop.state_dict(), self.path)
        raise Crash


def _noisy_step(loop: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    loss = nn.functional.cross_entropy(loop.model(x), y)
    # every global RNG takes part in the result
    loss = loss * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))
    loop.log("train/loss", loss)
    return loss


def _build(kind: str, plugins: list[Any]) -> Any:
    random.seed(0)
    np.random.seed(0)
    if kind == "plain":  # SGD with momentum over a list of batches
        return tiny_loop(plugins, log_every_n_steps=4)
    # dropout, batch norm buffers, Adam, a scheduler, a shuffling DataLoader with its own
    # generator and a step drawing from python, numpy and torch RNGs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return tiny_loop(plugins, model=model, optimizer=optimizer, train_data=loader,
                     scheduler=scheduler, step_fn=_noisy_step, log_every_n_steps=3)


EPOCHS = 3
CRASHES = {"step 6": {"step": 6}, "log step 12": {"step": 12}, "epoch end": {"epoch": 0}}


def _uninterrupted(kind: str) -> RunSnapshot:
    rec = HookRecorder(["on_log"])
    loop = _build(kind, [Tally(), rec])
    loop.fit(max_epochs=EPOCHS)
    return snapshot_run(loop, rec)


def _crashed_and_resumed(kind: str, crash: dict[str, int], tmp_path: Path,
                         tally: type[Tally] = Tally) -> RunSnapshot:
    path = tmp_path / "crash.pt"
    crashed_rec = HookRecorder(["on_log"])
    crashed = _build(kind, [tally(), crashed_rec, CrashAt(path, **crash)])
    with pytest.raises(Crash):
        crashed.fit(max_epochs=EPOCHS)
    ckpt = torch.load(path, weights_only=True)
    rec = HookRecorder(["on_log"])
    loop = _build(kind, [tally(), rec])
    loop.fit(max_epochs=EPOCHS, resume=ckpt)
    snap = snapshot_run(loop, rec)
    assert snap.log is not None
    return dataclasses.replace(snap, log=crashed_rec.logged() + snap.log)


@pytest.mark.parametrize("crash", list(CRASHES))
@pytest.mark.parametrize("kind", ["plain", "noisy"])
def test_a_resumed_run_ends_where_the_uninterrupted_run_does(
    kind: str, crash: str, tmp_path: Path
) -> None:
    expected = _uninterrupted(kind)
    assert expected.log and expected.counters["global_step"] == 8 * EPOCHS
    assert_same_run(expected, _crashed_and_resumed(kind, CRASHES[crash], tmp_path))


def test_a_plugin_that_does_not_restore_its_state_is_caught(tmp_path: Path) -> None:
    expected = _uninterrupted("plain")
    resumed = _crashed_and_resumed("plain", {"step": 6}, tmp_path, tally=ForgetfulTally)
    resumed = dataclasses.replace(resumed, plugins={"Tally": resumed.plugins["ForgetfulTally"]})
    with pytest.raises(AssertionError) as err:
        assert_same_run(expected, resumed)
    text = str(err.value)
    assert "plugins.Tally.batches: 24 != 18" in text
    assert "plugins.Tally.loss_sum: max abs diff" in text
    assert "parameters" not in text and "optimizers" not in text


# ------------------------------------------------------------------ negative controls


@pytest.fixture(scope="module")
def run() -> tuple[Any, HookRecorder]:
    rec = HookRecorder(["on_log"])
    loop = _build("noisy", [Tally(), rec])
    loop.fit(max_epochs=2)
    return loop, rec


@pytest.fixture
def snap(run: tuple[Any, HookRecorder]) -> RunSnapshot:
    return snapshot_run(*run)


def _changed(snap: RunSnapshot) -> RunSnapshot:
    """A deep copy to perturb."""
    rng = dict(snap.rng)
    copy = dataclasses.replace(
        snap,
        parameters={k: v.clone() for k, v in snap.parameters.items()},
        optimizers=[dict(o, state={k: {n: t.clone() if isinstance(t, torch.Tensor) else t
                                       for n, t in s.items()}
                                   for k, s in o["state"].items()}) for o in snap.optimizers],
        plugins={k: dict(v) for k, v in snap.plugins.items()},
        log=[(s, dict(m)) for s, m in snap.log or []],
        rng=rng,
    )
    assert run_differences(snap, copy) == []
    return copy


def _failure(a: RunSnapshot, b: RunSnapshot, **kwargs: Any) -> str:
    with pytest.raises(AssertionError) as err:
        assert_same_run(a, b, **kwargs)
    return str(err.value)


def test_the_same_snapshot_compares_equal(snap: RunSnapshot) -> None:
    assert_same_run(snap, snap)
    assert set(snap.rng) == {"python", "torch", "numpy", "loader"}
    assert set(snap.rng["loader"]) == {"loader", "sampler"}
    assert "1.running_mean" in snap.buffers and snap.schedulers[0]["last_epoch"] == 2


def test_a_perturbed_parameter_fails(snap: RunSnapshot) -> None:
    other = _changed(snap)
    other.parameters["0.weight"][1, 2] += 0.5
    text = _failure(snap, other)
    assert "in 1 place(s)" in text
    assert "parameters.0.weight: max abs diff 0.5 (1 of 64 elements differ)" in text
    assert_same_run(snap, other, atol=0.6)  # a tolerance lets it pass
    assert "parameters.0.weight" in _failure(snap, other, atol=0.4)
    assert_same_run(snap, other, ignore=["parameters.0.weight"])


def test_a_different_optimizer_state_fails(snap: RunSnapshot) -> None:
    other = _changed(snap)
    other.optimizers[0]["state"][3]["exp_avg"].mul_(2)
    other.optimizers[0]["state"][0]["step"] += 1
    text = _failure(snap, other)
    assert "optimizers[0].state.3.exp_avg: max abs diff" in text
    assert "optimizers[0].state.0.step: max abs diff 1" in text


def test_a_changed_rng_fails(run: tuple[Any, HookRecorder], snap: RunSnapshot) -> None:
    torch.rand(1)
    np.random.rand()
    other = snapshot_run(*run)  # the same run, a few draws later
    text = _failure(snap, other)
    assert "rng.torch: max abs diff" in text and "rng.numpy.pos: " in text
    assert "rng.python" not in text and "rng.loader" not in text
    assert _failure(snap, other, ignore=["rng.numpy"]).count("\n") == 1
    assert_same_run(snap, other, ignore=["rng"])


def test_a_plugin_state_difference_fails(snap: RunSnapshot) -> None:
    other = _changed(snap)
    other.plugins["Tally"]["batches"] += 1
    other.plugins["Tally"]["extra"] = 1
    text = _failure(snap, other)
    assert "plugins.Tally.batches: 16 != 17" in text
    assert "plugins.Tally.extra: only in the second run" in text
    assert "plugins.Tally.batches" in _failure(snap, other, ignore=["plugins.Tal"])  # not a prefix
    assert_same_run(snap, other, ignore=["plugins.Tally"])


def test_a_log_stream_difference_fails_with_its_first_differing_entry(snap: RunSnapshot) -> None:
    assert snap.log is not None
    other = _changed(snap)
    assert other.log is not None
    step, metrics = other.log[2]
    key = next(iter(metrics))
    other.log[2] = (step, {**metrics, key: metrics[key] + 1e-9})
    other.log[4] = (step + 100, other.log[4][1])
    text = _failure(snap, other)
    assert "in 1 place(s)" in text and text.count("log[") == 1
    assert f"log[2]: step {step} " in text
    shorter = dataclasses.replace(_changed(snap), log=snap.log[:-1])
    assert f"log: {len(snap.log)} entries != {len(snap.log) - 1}" in _failure(snap, shorter)
    assert "log: recorded in only one run" in _failure(snap, dataclasses.replace(snap, log=None))


def test_every_difference_is_listed(snap: RunSnapshot) -> None:
    other = _changed(snap)
    other.parameters["4.bias"].add_(1)
    other.plugins["Tally"]["batches"] = 0
    other.rng["python"] = dict(other.rng["python"], gauss=0.5)
    text = _failure(snap, other)
    assert "in 3 place(s)" in text
    for path in ("parameters.4.bias", "plugins.Tally.batches", "rng.python.gauss"):
        assert path in text


def test_nan_equals_nan_and_shapes_and_types_are_compared(snap: RunSnapshot) -> None:
    nan = dataclasses.replace(snap, plugins={"p": {"t": torch.tensor([float("nan"), 1.0]),
                                                   "f": float("nan")}})
    assert_same_run(nan, nan)
    other = dataclasses.replace(snap, plugins={"p": {"t": torch.tensor([float("nan")]),
                                                     "f": torch.tensor(1.0)}})
    text = _failure(nan, other)
    assert "plugins.p.t: shape (2,) != (1,)" in text and "plugins.p.f: float != Tensor" in text
