"""The tracker base: worker thread, degrade to spool/disabled, masking, summaries.

The backends here are small in-memory subclasses of ``Tracker`` (the class under test);
the real SDK backends are tested in their own distributions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from hookloop.testing import SyncGuard, tiny_loop
from hookloop.tracking import MASK, Tracker, mask_secrets, mask_text


class Memory(Tracker):
    tracker_name = "memory"

    def __init__(self, fail: set[str] = frozenset(), **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail = set(fail)
        self.records: list[tuple] = []
        self.threads: set[str] = set()

    def _do(self, kind: str, *args) -> None:
        self.threads.add(threading.current_thread().name)
        if kind in self.fail or "all" in self.fail:
            raise ConnectionError(f"{kind}: backend down")
        self.records.append((kind, *args))

    def _backend_open(self, info):
        self._do("open", info)

    def _backend_hparams(self, params):
        self._do("hparams", params)

    def _backend_metrics(self, metrics, step):
        self._do("metrics", metrics, step)

    def _backend_text(self, name, text, step):
        self._do("text", name, text, step)

    def _backend_histogram(self, name, values, step):
        self._do("histogram", name, step)

    def _backend_close(self, status):
        self._do("close", status)


def test_records_on_a_worker_thread_and_closes() -> None:
    t = Memory()
    loop = tiny_loop([t], hparams={"batch": 8})
    loop.fit(max_epochs=2)
    kinds = [r[0] for r in t.records]
    assert kinds[0] == "open" and kinds[1] == "hparams" and kinds[-1] == "close"
    assert t.records[-1] == ("close", "success")
    assert [r[2] for r in t.records if r[0] == "metrics"] == [4, 8, 8, 8, 12, 16, 16, 16]
    assert t.threads == {"hookloop-memory"}
    assert t.records[1][1]["batch"] == 8 and t.records[1][1]["optimizer"] == "SGD"
    assert "recorded" in t.report and t.state == "closed"


def test_crash_closes_the_run_as_failed() -> None:
    class Crash:
        def on_train_batch_end(self, loop):
            if loop.state.global_step == 5:
                raise RuntimeError("crash")

    t = Memory()
    with pytest.raises(RuntimeError):
        tiny_loop([Crash(), t]).fit(max_epochs=2)
    assert t.records[-1] == ("close", "failed")


def test_failing_backend_degrades_to_disabled_and_weights_are_identical() -> None:
    ref = tiny_loop()
    ref.fit(max_epochs=2)
    t = Memory(fail={"all"})
    loop = tiny_loop([t])
    with pytest.warns(RuntimeWarning) as warned:
        loop.fit(max_epochs=2)
    messages = [str(w.message) for w in warned]
    assert sum("failed 3 times in a row" in m for m in messages) == 1
    assert any("disabled for the rest of the run" in m for m in messages)
    assert t.state == "disabled" and t.failed["open"] == 1 and sum(t.failed.values()) == 3
    assert "dropped" in t.report and "ConnectionError" in t.report
    for a, b in zip(ref.module.parameters(), loop.module.parameters()):
        assert torch.equal(a, b)


def test_degrade_to_spool(tmp_path: Path) -> None:
    t = Memory(fail={"metrics"}, max_failures=2, spool_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="spooling the rest to"):
        tiny_loop([t]).fit(max_epochs=2)
    lines = [json.loads(x) for x in (tmp_path / "memory-spool.jsonl").read_text().splitlines()]
    assert [x["args"][1] for x in lines if x["kind"] == "metrics"] == [8, 8, 12, 16, 16, 16]
    assert lines[-1]["kind"] == "close" and lines[-1]["args"] == ["success"]
    assert t.spooled["metrics"] == 6 and "spooled" in t.report


def test_hanging_backend_does_not_block_training() -> None:
    release = threading.Event()

    class Hanging(Memory):
        def _backend_open(self, info):
            release.wait(30)

    t = Hanging(close_timeout=0.2)
    loop = tiny_loop([t])
    with pytest.warns(RuntimeWarning, match="did not finish within 0.2s"):
        loop.fit(max_epochs=2)
    release.set()
    assert loop.state.global_step == 16
    assert t.dropped["pending"] > 0


def test_full_queue_drops_instead_of_waiting() -> None:
    release = threading.Event()

    class Slow(Memory):
        def _backend_open(self, info):
            release.wait(30)

    t = Slow(queue_size=2, close_timeout=0.2)
    with pytest.warns(RuntimeWarning):
        tiny_loop([t]).fit(max_epochs=2)
    release.set()
    assert sum(t.dropped.values()) > 0


def test_histograms_of_weights_and_grads() -> None:
    t = Memory(histogram_every_n_epochs=2)
    tiny_loop([t]).fit(max_epochs=4)
    hist = [(r[1], r[2]) for r in t.records if r[0] == "histogram"]
    grads = sorted({s for n, s in hist if n.startswith("grads/")})
    weights = sorted({s for n, s in hist if n.startswith("weights/")})
    assert grads == [8, 24] and weights == [16, 32]  # first step of epochs 1 and 3; their ends
    assert Memory().__dict__.get("on_before_optimizer_step") is None


def test_no_syncs_on_steps_that_do_not_log() -> None:
    t = Memory()
    loop = tiny_loop([t], log_every_n_steps=4)
    with SyncGuard(loop) as guard:
        loop.fit(max_epochs=1)
    assert {e.step for e in guard.events if e.stage == "train"} <= {4, 8}


def test_masking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-123456")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdef")
    cfg = {"lr": 0.1, "api_token": "x", "password": "p", "nested": {"aws_secret_key": "s", "ok": 1},
           "url": "https://u:wandb-secret-123456@host", "note": "tok-abcdef inside"}
    masked = mask_secrets(cfg)
    assert masked == {"lr": 0.1, "api_token": MASK, "password": MASK,
                      "nested": {"aws_secret_key": MASK, "ok": 1},
                      "url": f"https://u:{MASK}@host", "note": f"{MASK} inside"}
    assert mask_text("key wandb-secret-123456") == f"key {MASK}"
    t = Memory()
    loop = tiny_loop([t], hparams={"api_token": "hunter2-token", "seed": 3})
    loop.fit(max_steps=2)
    params = t.records[1][1]
    assert params["api_token"] == MASK and params["seed"] == 3
    assert loop.state_dict()["hparams"]["api_token"] == MASK  # checkpoints hold no secrets


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="histogram_every_n_epochs=0"):
        Memory(histogram_every_n_epochs=0)
    with pytest.raises(ValueError, match="queue_size=0"):
        Memory(queue_size=0)


def test_best_checkpoint_survives_rotation_until_uploaded(tmp_path: Path) -> None:
    release = threading.Event()
    uploaded: list[bytes] = []

    class Uploader(Memory):
        def _backend_open(self, info):
            release.wait(30)  # a slow backend: the file is rotated away before upload

        def _backend_artifact(self, path, metrics):
            uploaded.append(Path(path).read_bytes())

    class Announce:
        def on_train_epoch_end(self, loop, epoch, metrics):
            ckpt = tmp_path / f"epoch{epoch}.pt"
            ckpt.write_bytes(f"weights of epoch {epoch}".encode())
            loop.callers.on_checkpoint_saved(loop, str(ckpt), dict(metrics), True)
            ckpt.unlink()  # best-k rotation deletes it right away
            if epoch == 1:
                release.set()

    t = Uploader()
    tiny_loop([Announce(), t]).fit(max_epochs=2)
    assert uploaded == [b"weights of epoch 0", b"weights of epoch 1"]
    assert t.recorded["artifact"] == 2 and not t.failed
    assert t._staging is None  # staging folder removed at close


def test_shared_backend_helpers() -> None:
    from hookloop.tracking import flatten_config, image_to_hwc_uint8, sdk_installed

    assert flatten_config({"a": 1, "b": {"c": 2, "d": {"e": "x"}}}) == {"a": 1, "b/c": 2, "b/d/e": "x"}
    img = image_to_hwc_uint8(torch.tensor([[[0.0, 1.0]], [[0.5, 2.0]], [[-1.0, 0.25]]]))
    assert img.shape == (1, 2, 3) and img.dtype.name == "uint8"
    assert img[0, 1].tolist() == [255, 255, 64] and img[0, 0].tolist() == [0, 128, 0]
    assert image_to_hwc_uint8(torch.zeros(1, 2, 2)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        image_to_hwc_uint8(torch.zeros(5))
    assert sdk_installed("json") and not sdk_installed("no_such_tracker_sdk")


def test_held_scalars_are_written_in_one_batch_before_close() -> None:
    class Batching(Memory):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.batches: list[int] = []

        def _backend_metrics_batch(self, records):
            self.batches.append(len(records))
            super()._backend_metrics_batch(records)

    t = Batching(metrics_interval=60.0)
    tiny_loop([t]).fit(max_epochs=2)
    assert t.batches == [8]  # every on_log of the fit, in one call, before the close
    kinds = [r[0] for r in t.records]
    assert kinds[-1] == "close" and kinds.count("metrics") == 8
    assert [r[2] for r in t.records if r[0] == "metrics"] == [4, 8, 8, 8, 12, 16, 16, 16]
    assert t.recorded["metrics"] == 8 and "flush" not in t.recorded
    with pytest.raises(ValueError, match="metrics_interval=-1"):
        Memory(metrics_interval=-1)


def test_staging_survives_many_uploads_and_close_is_never_dropped(tmp_path: Path) -> None:
    uploaded: list[str] = []

    class Uploader(Memory):
        def _backend_artifact(self, path, metrics):
            uploaded.append(Path(path).read_text())

    class Announce:
        def on_train_epoch_end(self, loop, epoch, metrics):
            ckpt = tmp_path / "ckpt" / f"e{epoch}.pt"
            ckpt.parent.mkdir(exist_ok=True)
            ckpt.write_text(str(epoch))
            loop.callers.on_checkpoint_saved(loop, str(ckpt), dict(metrics), True)
            ckpt.unlink()
            assert loop.get_plugin("Uploader").wait(10)  # each upload done before the next

    t = Uploader()
    tiny_loop([Announce(), t]).fit(max_epochs=4)
    assert uploaded == ["0", "1", "2", "3"] and not t.failed
    assert not list(tmp_path.glob(".hookloop-upload-*"))  # staged beside, then removed

    release = threading.Event()

    class Slow(Memory):
        def _backend_metrics(self, metrics, step):
            release.wait(0.05)
            super()._backend_metrics(metrics, step)

    slow = Slow(queue_size=2)
    tiny_loop([slow], log_every_n_steps=1).fit(max_epochs=1)
    assert slow.records[-1] == ("close", "success")  # the queue was full; close still went


def test_masking_leaves_ordinary_names_alone() -> None:
    masked = mask_secrets({"max_tokens": 512, "author": "ada", "sort_key": "x", "db_password": "p",
                           "auth": "a", "github_token": "t"})
    assert masked == {"max_tokens": 512, "author": "ada", "sort_key": "x", "db_password": MASK,
                      "auth": MASK, "github_token": MASK}


# ---------------------------------------------------------------- held records, times, lifecycle


class Timed(Memory):
    """Keeps the training-thread time each record was stamped with."""

    def _do(self, kind: str, *args) -> None:
        super()._do(kind, *args)
        if self.records and self.records[-1][0] == kind:
            self.records[-1] = (*self.records[-1], self.record_time, threading.current_thread())


def test_records_logged_before_the_run_opens_are_delivered() -> None:
    class EarlyLogger:
        """Registered before the tracker: its on_fit_start runs before the run opens."""

        def on_fit_start(self, loop):
            loop.log_text("early/fit_start", "from on_fit_start")

    t = Memory()
    loop = tiny_loop([EarlyLogger(), t])
    loop.log_text("early/before_fit", "before fit")
    loop.fit(max_epochs=1)
    texts = [(r[1], r[2]) for r in t.records if r[0] == "text"]
    assert texts == [("early/before_fit", "before fit"), ("early/fit_start", "from on_fit_start")]
    assert t.records[0][0] == "open"  # delivered once the run is open
    assert t.recorded["text"] == 2 and "dropped none" in t.report


def test_held_records_beyond_the_bound_are_counted_as_dropped() -> None:
    t = Memory(held_size=2)
    loop = tiny_loop([t])
    for i in range(5):
        loop.log_text("early", f"text {i}")
    with pytest.warns(RuntimeWarning, match="dropped text=3"):
        loop.fit(max_epochs=1)
    assert [r[2] for r in t.records if r[0] == "text"] == ["text 0", "text 1"]
    assert t.dropped["text"] == 3 and "dropped text=3" in t.report
    with pytest.raises(ValueError, match="held_size=-1"):
        Memory(held_size=-1)


def test_every_record_carries_its_training_thread_time() -> None:
    from hookloop.testing import HookRecorder

    rec = HookRecorder(["on_log", "on_log_text", "on_fit_start"])

    class Text:
        def on_train_epoch_end(self, loop, epoch):
            loop.log_text("epoch", str(epoch))

    t = Timed(metrics_interval=60.0)  # written long after they were logged, in one batch
    loop = tiny_loop([Text(), rec, t])
    loop.fit(max_epochs=2)
    logged = [(c.kwargs["step"], c.kwargs["time"]) for c in rec.calls if c.name == "on_log"]
    written = [(r[2], r[3]) for r in t.records if r[0] == "metrics"]
    assert written == logged and len(set(time for _, time in written)) >= 3
    texts = [c.kwargs["time"] for c in rec.calls if c.name == "on_log_text"]
    assert [r[4] for r in t.records if r[0] == "text"] == texts
    opened, closed = t.records[0], t.records[-1]
    assert opened[0] == "open" and opened[1]["time"] == opened[2]
    assert opened[2] <= written[0][1] <= written[-1][1] <= closed[2]


def test_a_degraded_tracker_still_closes_its_run() -> None:
    t = Memory(fail={"metrics"}, max_failures=2)
    with pytest.warns(RuntimeWarning, match="disabled for the rest of the run"):
        tiny_loop([t]).fit(max_epochs=2)
    assert t.state == "disabled"
    assert t.records[-1] == ("close", "success")
    assert t.recorded["close"] == 1 and t.dropped["metrics"] > 0


def test_backend_errors_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    t = Memory(fail={"metrics"}, max_failures=100)
    with caplog.at_level("DEBUG", logger="hookloop.tracking"), pytest.warns(RuntimeWarning):
        tiny_loop([t]).fit(max_steps=4)
    assert t.last_traceback is not None and "Traceback" in t.last_traceback
    assert "in _do" in t.last_traceback and "ConnectionError" in t.last_traceback
    debug = [r for r in caplog.records if r.levelname == "DEBUG" and r.exc_info]
    assert debug and "metrics failed" in debug[0].getMessage()


def test_a_deliberately_skipped_record_is_dropped_not_recorded() -> None:
    from hookloop.tracking import RecordDropped

    class Skipping(Memory):
        def _backend_text(self, name, text, step):
            raise RecordDropped("text_before_resumed_step")

    t = Skipping()
    loop = tiny_loop([t])
    with pytest.warns(RuntimeWarning, match="text_before_resumed_step=1"):
        loop.fit(max_steps=2)
        loop.log_text("late", "x")  # held for a next fit
        loop.fit(max_steps=4)
    assert "text" not in t.recorded and not t.failed


def test_a_late_worker_never_touches_the_next_fits_run() -> None:
    release = threading.Event()

    class SlowFirstOpen(Timed):
        opened = 0

        def _backend_open(self, info):
            self.opened += 1
            if self.opened == 1:
                release.wait(30)
            super()._backend_open(info)

    t = SlowFirstOpen(close_timeout=0.2)
    loop = tiny_loop([t])
    with pytest.warns(RuntimeWarning, match="did not finish within 0.2s"):
        loop.fit(max_epochs=1)
    release.set()  # the first fit's worker goes on while the second fit runs
    loop.fit(max_epochs=2)
    assert t.wait(30)
    threads = [r[-1] for r in t.records]
    first, second = threads[0], threads[-1]
    assert first is not second and set(threads) == {first, second}
    # the late worker wrote nothing of its fit but its run's opening; that run was closed
    # with its fit's outcome (by the late worker, or by the next one before it opened
    # its own run), and only then did the next run open
    assert {r[0] for r in t.records if r[-1] is first} <= {"open", "close"}
    assert [r[:2] for r in t.records[:2]] == [("open", t.records[0][1]), ("close", "success")]
    assert t.records[2][0] == "open" and t.records[2][-1] is second
    assert [r[0] for r in t.records].count("open") == 2
    assert t.records[-1][:2] == ("close", "success") and t.state == "closed"


# ----------------------------------------------------------------------------- process backend
# CallLogTracker's backend writes every call it gets to a JSON-lines file, with the
# process that made it: these tests read what reached the backend process.


def test_process_backend_calls_run_in_another_process_with_training_times(tmp_path: Path) -> None:
    import os
    import sys

    from hookloop.testing import HookRecorder
    from hookloop.testing.trackers import CallLogTracker, read_call_log

    rec = HookRecorder(["on_log"])
    t = CallLogTracker(tmp_path / "calls.jsonl", backend="process")
    loop = tiny_loop([rec, t])
    loop.fit(max_epochs=2)
    calls = read_call_log(tmp_path / "calls.jsonl")
    assert t.backend_mode() == "process" and t.backend_identity is not None
    assert {c["pid"] for c in calls} == {t.backend_identity["pid"]} != {os.getpid()}
    assert [c["kind"] for c in calls][:2] == ["open", "hparams"] and calls[-1]["kind"] == "close"
    assert calls[-1]["args"] == ["success"] and t.state == "closed" and "dropped none" in t.report
    # the backend saw this process's command line and folder, and the training times
    assert calls[0]["argv"] == sys.argv and calls[0]["cwd"] == os.getcwd()
    logged = [(c.kwargs["step"], c.kwargs["time"]) for c in rec.of("on_log")]
    assert [(c["args"][1], c["time"]) for c in calls if c["kind"] == "metrics"] == logged
    assert t.recorded["metrics"] == len(logged)


def test_process_backend_failures_degrade_and_the_run_is_still_closed(tmp_path: Path) -> None:
    from hookloop.testing.trackers import CallLogTracker, read_call_log

    t = CallLogTracker(tmp_path / "calls.jsonl", fail={"metrics"}, drop={"text"}, backend="process")
    loop = tiny_loop([t])
    loop.log_text("note", "dropped on purpose")
    with pytest.warns(RuntimeWarning, match="failed 3 times in a row"):
        loop.fit(max_epochs=2)
    assert t.state == "disabled" and t.failed["metrics"] == 3
    assert t.dropped["text_skipped"] == 1 and "text" not in t.recorded
    assert t.last_error == "ConnectionError: metrics: backend down"
    assert t.last_traceback and "Traceback" in t.last_traceback and "_write" in t.last_traceback
    calls = read_call_log(tmp_path / "calls.jsonl")
    assert [c["kind"] for c in calls] == ["open", "hparams", "close"] and calls[-1]["args"] == ["success"]


def test_process_backend_hang_is_bounded_and_the_late_close_comes(tmp_path: Path) -> None:
    import time

    from hookloop.testing.trackers import CallLogTracker, read_call_log

    t = CallLogTracker(tmp_path / "calls.jsonl", sleep={"open": 3.0}, close_timeout=0.2,
                       backend="process")
    loop = tiny_loop([t])
    with pytest.warns(RuntimeWarning, match="did not finish within 0.2s"):
        loop.fit(max_epochs=2)
    assert loop.state.global_step == 16 and t.dropped["pending"] > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the late worker closes the run it opened
        kinds = [c["kind"] for c in read_call_log(tmp_path / "calls.jsonl")]
        if "close" in kinds:
            break
        time.sleep(0.1)
    assert kinds == ["open", "close"]


def test_a_tracker_the_backend_process_cannot_import_runs_on_its_worker_thread(tmp_path: Path) -> None:
    import os

    from hookloop.testing.trackers import CallLogTracker, read_call_log

    class Local(CallLogTracker):  # defined in a function: no process can import it
        pass

    t = Local(tmp_path / "calls.jsonl", backend="process")
    tiny_loop([t]).fit(max_steps=4)
    calls = read_call_log(tmp_path / "calls.jsonl")
    assert t.backend_identity is None and {c["pid"] for c in calls} == {os.getpid()}
    assert calls[-1]["kind"] == "close" and t.state == "closed"
    with pytest.raises(ValueError, match="backend='elsewhere'"):
        CallLogTracker(tmp_path / "x", backend="elsewhere")


KILLED_SCRIPT = """
import os, signal, sys
from hookloop.plugins import hookimpl
from hookloop.testing import tiny_loop
from hookloop.testing.trackers import CallLogTracker

path, at_step, sleep_open = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])


class Die:
    @hookimpl
    def on_train_batch_start(self, loop):
        if loop.state.global_step == at_step:
            if at_step:
                loop.get_plugin("calllog").wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


tracker = CallLogTracker(path, sleep={"open": sleep_open}, backend="process")
tiny_loop([Die(), tracker]).fit(max_epochs=2)
"""


def _killed(tmp_path: Path, at_step: int, sleep_open: float) -> list[dict]:
    """Run KILLED_SCRIPT (SIGKILLed before step ``at_step``), then wait for its backend
    process to close the run; returns the calls it wrote."""
    import subprocess
    import sys
    import time

    from hookloop.testing.trackers import read_call_log

    script, path = tmp_path / "killed.py", tmp_path / "calls.jsonl"
    script.write_text(KILLED_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(path), str(at_step), str(sleep_open)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    deadline = time.monotonic() + 60
    calls = read_call_log(path)
    while time.monotonic() < deadline and not any(c["kind"] == "close" for c in calls):
        time.sleep(0.1)
        calls = read_call_log(path)
    return calls


def test_a_killed_training_process_leaves_its_run_closed_as_killed(tmp_path: Path) -> None:
    calls = _killed(tmp_path, at_step=6, sleep_open=0.0)
    kinds = [c["kind"] for c in calls]
    assert kinds[:2] == ["open", "hparams"] and kinds.count("metrics") == 1  # step 4
    assert calls[-1]["kind"] == "close" and calls[-1]["args"] == ["killed"]


def test_a_run_killed_before_its_first_step_is_still_opened(tmp_path: Path) -> None:
    # killed before step 0, while the backend process still starts (and its open is
    # slow): the open call, handed over on the training thread at fit start, is still
    # made; what the worker thread had not sent yet (the hyperparameters) is lost
    calls = _killed(tmp_path, at_step=0, sleep_open=1.0)
    assert [c["kind"] for c in calls] == ["open", "close"]
    assert calls[-1]["args"] == ["killed"]


def test_a_forked_child_does_not_keep_the_backend_process_alive(tmp_path: Path) -> None:
    # a DataLoader worker forked during the fit gets copies of every descriptor; those
    # of the backend process's sockets are closed in it, or the backend process would
    # not see the fit's channels end, nor the training process go
    import multiprocessing
    import time

    from hookloop import _tracker_host
    from hookloop.testing.trackers import CallLogTracker, read_call_log

    children = []

    class Fork:
        def on_train_batch_end(self, loop):
            if loop.state.global_step == 2:
                child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
                child.start()
                children.append(child)

    t = CallLogTracker(tmp_path / "calls.jsonl", backend="process")
    loop = tiny_loop([Fork(), t])
    try:
        loop.fit(max_steps=4)
        loop.close()
        identity = t.backend_identity
        assert identity is not None and children and children[0].is_alive()
        _tracker_host.shutdown()
        # the training process lives, so wait_for_exit would not wait: poll the pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _tracker_host._alive(identity):
            time.sleep(0.1)
        assert not _tracker_host._alive(identity), "the backend process outlived its channels"
        assert children[0].is_alive()
        assert read_call_log(tmp_path / "calls.jsonl")[-1]["args"] == ["success"]
    finally:
        for child in children:
            child.kill()
            child.join()
