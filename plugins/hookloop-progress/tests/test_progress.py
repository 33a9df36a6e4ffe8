"""The progress plugin: line mode off a terminal, a live tqdm bar on one, no syncs."""

from __future__ import annotations

import io
import os
import pty
import threading
from typing import Any

import pytest
from hookloop_progress import Progress, format_metrics

from hookloop.plugins import PluginManager, hookimpl
from hookloop.testing import HookRecorder, SyncGuard, tiny_loop

PER_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward",
                  "on_before_optimizer_step", "on_train_batch_end")


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_not_a_terminal_writes_one_line_per_epoch() -> None:
    buf = io.StringIO()
    rec = HookRecorder(["on_train_epoch_end"])
    loop = tiny_loop([("progress", {"file": buf}), rec])
    assert isinstance(loop.get_plugin("progress"), Progress)
    loop.fit(max_epochs=3)

    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert loop.get_plugin("progress").lines == lines
    for epoch, (line, call) in enumerate(zip(lines, rec.of("on_train_epoch_end"), strict=True)):
        label, steps, step, shown = line.split(" | ")
        assert label == f"epoch {epoch + 1}/3"
        assert steps.startswith("8 steps in ") and steps.endswith(" steps/s)")
        assert step == f"global step {8 * (epoch + 1)}"
        assert shown == format_metrics(call.kwargs["metrics"])
        assert "train/loss_epoch=" in shown and "val/acc=" in shown


def test_bar_mode_shows_steps_rate_eta_and_latest_metrics() -> None:
    buf = io.StringIO()
    progress = Progress(file=buf, mode="bar", refresh_interval=0.005)
    tiny_loop([progress]).fit(max_epochs=2)
    text = buf.getvalue()
    frames = [f for f in text.replace("\n", "\r").split("\r") if f.startswith("epoch 1/2:")]
    assert frames, text
    final = [f for f in frames if "8/8" in f]
    assert final, frames
    # steps, ETA (elapsed<remaining), rate, and the metrics of the last log intervals
    assert "<" in final[-1] and "step/s" in final[-1]
    assert "train/loss=" in final[-1] and "val/acc=" in final[-1]
    lines = [line.split("\r")[-1] for line in text.split("\n")]
    summaries = [line for line in lines if " | global step " in line]
    assert [s.split(" | ")[0] for s in summaries] == ["epoch 1/2", "epoch 2/2"]
    assert progress.bar_mode and progress._ticker is None


def test_terminal_is_detected_and_gets_a_bar() -> None:
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(slave, "w") as tty:
        progress = Progress(file=tty)
        tiny_loop([progress]).fit(max_epochs=1)
        tty.flush()
        assert progress.bar_mode
    reader.join(5)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "8/8" in text and "epoch 1/1 | 8 steps" in text


def test_adds_no_host_device_syncs() -> None:
    """Same sync points with and without the bar (ticking as fast as it can), and none
    of them on a step that does not log."""

    def run(plugins: list[Any]) -> tuple[list[Any], set[int]]:
        rec = HookRecorder(["on_log"])
        loop = tiny_loop([*plugins, rec], log_every_n_steps=3)
        with SyncGuard(loop) as guard:
            loop.fit(max_epochs=2)
        return [(e.op, e.step, e.stage) for e in guard.events], {s for s, _ in rec.logged()}

    base_events, log_steps = run([])
    events, _ = run([Progress(file=io.StringIO(), mode="bar", refresh_interval=0.0005)])
    assert events == base_events
    assert {step for _, step, _ in events} <= log_steps
    assert log_steps == {3, 6, 8, 9, 12, 15, 16}
    assert all(pm == [] for h, pm in _plan(Progress()).items() if h in PER_STEP_HOOKS)


def _plan(plugin: Any) -> dict[str, list[str]]:
    pm = PluginManager()
    pm.register(plugin)
    return pm.plan()


def test_crash_is_reported_and_bar_closed() -> None:
    class Crash:
        @hookimpl
        def on_train_batch_end(self, loop: Any) -> None:
            if loop.state.global_step == 5:
                raise RuntimeError("boom")

    for mode in ("lines", "bar"):
        buf = io.StringIO()
        progress = Progress(file=buf, mode=mode)
        with pytest.raises(RuntimeError, match="boom"):
            tiny_loop([Crash(), progress]).fit(max_epochs=2)
        assert progress.lines == ["epoch 1/2 | stopped at global step 5: RuntimeError: boom"]
        assert progress._bar is None and progress._ticker is None


def test_metric_selection_and_max_steps() -> None:
    buf = io.StringIO()
    tiny_loop([Progress(file=buf, metrics=["val/acc"], digits=2)]).fit(max_steps=12)
    lines = [line.split(" | ") for line in buf.getvalue().splitlines()]
    assert [(p[0], p[1].split(" in ")[0], p[2]) for p in lines] == [
        ("epoch 1", "8 steps", "global step 8"),
        ("epoch 2", "4 steps", "global step 12"),
    ]
    assert all(len(p) == 4 and p[3].startswith("val/acc=") for p in lines)


def test_rank_zero_only_and_options() -> None:
    pm = PluginManager()
    pm.register(Progress())
    pm.set_rank(1)
    assert all("progress" not in names for names in pm.plan().values())
    with pytest.raises(ValueError, match="mode"):
        Progress(mode="fancy")
    assert format_metrics({"b": 1.234567, "a": 2.0}, digits=3) == "a=2 b=1.23"
