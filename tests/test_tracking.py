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
