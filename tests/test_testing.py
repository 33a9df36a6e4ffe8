"""The test helpers themselves: the sync guard sees every thread and leaves torch as it
found it."""

from __future__ import annotations

import threading
import timeit
from typing import Any

import pytest
import torch

from hookloop.testing import SyncGuard, tiny_loop

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
