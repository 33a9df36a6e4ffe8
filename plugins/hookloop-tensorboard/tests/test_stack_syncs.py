"""TensorBoard and the progress bar together add no host-device sync to a step that
does not log (checked with the core's SyncGuard, which intercepts the sync points of
every device on the CPU too)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hookloop_tensorboard import TensorBoard

from hookloop.testing import HookRecorder, SyncGuard, tiny_loop

progress = pytest.importorskip("hookloop_progress")


def _run(plugins: list[Any]) -> tuple[list[tuple[str, Any, Any]], set[int], Any]:
    rec = HookRecorder(["on_log"])
    loop = tiny_loop([*plugins, rec], log_every_n_steps=3)
    with SyncGuard(loop) as guard:
        loop.fit(max_epochs=2)
    return [(e.op, e.step, e.stage) for e in guard.events], {s for s, _ in rec.logged()}, loop


def test_tensorboard_and_progress_add_no_syncs(tmp_path: Path, read_events: Any) -> None:
    base_events, log_steps, _ = _run([])
    tb = TensorBoard(tmp_path)
    bar = progress.Progress(file=io.StringIO(), mode="bar", refresh_interval=0.001)
    events, stack_log_steps, loop = _run([tb, bar])

    assert stack_log_steps == log_steps == {3, 6, 8, 9, 12, 15, 16}
    assert events == base_events  # the plugins add no sync anywhere
    assert {step for _, step, _ in events} <= log_steps  # none on a step that does not log
    for plan_hook in ("on_train_batch_start", "on_before_backward", "on_after_backward",
                      "on_before_optimizer_step", "on_train_batch_end"):
        assert loop.pm.plan()[plan_hook] == ["HookRecorder"], plan_hook
    # and the tracker did record
    assert [e.step for e in read_events(tmp_path).Scalars("train/loss")] == [3, 6, 9, 12, 15]
    assert len(bar.lines) == 2
