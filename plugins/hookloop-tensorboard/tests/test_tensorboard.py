"""The TensorBoard tracker against the real SummaryWriter, read back with TensorBoard's
EventAccumulator."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hookloop_tensorboard import INSTALL_HINT, TensorBoard, flatten_hparams
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from hookloop.plugins import PluginManager, hookimpl
from hookloop.testing import HookRecorder, tiny_loop, tmpfs_mount_prefix, unmount
from hookloop.tracking import MASK


def _scalars(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _texts(acc: Any, name: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{name}/text_summary")]


def _hparams(acc: Any) -> dict[str, Any]:
    content = acc.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}


def _weights(loop: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loop.module.state_dict().items()}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Media:
    """Logs the model summary, a tensor image and a matplotlib figure every epoch."""

    @hookimpl
    def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
        from matplotlib.figure import Figure

        loop.log_text("model/summary", f"epoch {epoch}: {loop.module}")
        loop.log_image("samples/tensor", torch.linspace(0, 1, 3 * 8 * 10).reshape(3, 8, 10))
        fig = Figure(figsize=(2, 1), dpi=50)
        fig.add_subplot().plot([0, 1, 2], [epoch, 1, 0])
        loop.log_image("samples/figure", fig)


def test_entry_point_scalars_at_global_steps(tmp_path: Path, read_events: Any) -> None:
    rec = HookRecorder(["on_log"])
    loop = tiny_loop([("tensorboard", {"log_dir": tmp_path / "tb"}), rec])
    assert isinstance(loop.get_plugin("tensorboard"), TensorBoard)
    loop.fit(max_epochs=2)

    expected: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in rec.logged():
        for name, value in metrics.items():
            expected.setdefault(name, []).append((step, value))
    assert {"train/loss", "train/loss_epoch", "val/loss", "val/acc"} <= expected.keys()
    assert [s for s, _ in expected["train/loss"]] == [4, 8, 12, 16]

    acc = read_events(tmp_path / "tb")
    assert set(expected) <= set(acc.Tags()["scalars"])
    for name, points in expected.items():
        got = _scalars(acc, name)
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name
    assert loop.get_plugin("tensorboard").state == "closed"


def test_hparams_text_images_histograms_and_status(tmp_path: Path, read_events: Any) -> None:
    tb = TensorBoard(tmp_path, histogram_every_n_epochs=1)
    hparams = {"batch_size": 8, "optim": {"momentum": 0.9, "nesterov": False}, "note": None}
    loop = tiny_loop([Media(), tb], hparams=hparams)
    loop.fit(max_epochs=2)
    acc = read_events(tmp_path)

    hp = _hparams(acc)
    start = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert start["batch_size"].number_value == 8
    assert start["optim/momentum"].number_value == pytest.approx(0.9)
    assert start["optim/nesterov"].bool_value is False
    assert start["note"].string_value == "None"
    assert start["optimizer"].string_value == "SGD"
    assert start["lr"].number_value == pytest.approx(0.1)
    end = hp["_hparams_/session_end_info"].session_end_info
    assert end.status == api_pb2.Status.Value("STATUS_SUCCESS")
    assert _texts(acc, "hookloop/status") == [(16, "success")]

    texts = _texts(acc, "model/summary")
    assert [s for s, _ in texts] == [8, 16]
    assert texts[0][1].startswith("epoch 0: Sequential(")

    tensor_images = acc.Images("samples/tensor")
    assert [(e.step, e.width, e.height) for e in tensor_images] == [(8, 10, 8), (16, 10, 8)]
    assert tensor_images[0].encoded_image_string.startswith(b"\x89PNG")
    figures = acc.Images("samples/figure")
    assert [(e.step, e.width, e.height) for e in figures] == [(8, 100, 50), (16, 100, 50)]

    # weights at each epoch's end; gradients at each epoch's first optimizer step
    for name, p in loop.module.named_parameters():
        for kind, steps in (("weights", [8, 16]), ("grads", [0, 8])):
            events = acc.Histograms(f"{kind}/{name}")
            assert [e.step for e in events] == steps, (kind, name)
            assert events[-1].histogram_value.num == p.numel()
    last = acc.Histograms("weights/0.bias")[-1].histogram_value
    assert last.min == pytest.approx(loop.module[0].bias.min().item())
    assert last.max == pytest.approx(loop.module[0].bias.max().item())


def test_secrets_are_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_key = "wandbkey-5f2c9e1d7a"
    mlflow_token = "mlflowtok-88c1e2b7"
    hp_token = "hparam-token-31415926"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", mlflow_token)

    class Leaky:
        @hookimpl
        def on_fit_start(self, loop: Any) -> None:
            loop.log_text("env", f"key={wandb_key} token={mlflow_token}")

    hparams = {
        "api_token": hp_token,
        "db": {"password": "hunter2-hunter2", "host": "db.local"},
        "tracking_uri": f"https://user:{mlflow_token}@tracker.local",
        "comment": f"uses {wandb_key}",
    }
    tb = TensorBoard(tmp_path / "tb")
    tiny_loop([Leaky(), tb], hparams=hparams).fit(max_epochs=1)

    blobs = b"".join(p.read_bytes() for p in (tmp_path / "tb").rglob("*") if p.is_file())
    assert blobs, "nothing was written"
    for secret in (wandb_key, mlflow_token, hp_token, "hunter2-hunter2"):
        assert secret.encode() not in blobs, secret
    assert MASK.encode() in blobs
    assert b"db.local" in blobs  # non-secret values still arrive
    assert list(tmp_path.rglob("*.jsonl")) == []


def test_log_dir_is_a_file_training_unharmed(tmp_path: Path) -> None:
    """A real fault: the log directory path is an existing file, so the writer cannot
    open and every later call fails."""
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    tb = TensorBoard(blocker)
    with pytest.warns(RuntimeWarning) as caught:
        loop = tiny_loop([tb])
        loop.fit(max_epochs=2)
    messages = [str(w.message) for w in caught]
    degraded = [m for m in messages if "failed 3 times in a row" in m]
    assert len(degraded) == 1 and "FileExistsError" in degraded[0]
    assert "disabled for the rest of the run" in degraded[0]
    assert tb.state == "disabled"
    assert tb.recorded == {} and tb.failed["open"] == 1
    assert "dropped" in tb.report and "metrics=" in tb.report
    assert blocker.read_text() == "not a directory"

    baseline = tiny_loop([])
    baseline.fit(max_epochs=2)
    _assert_identical(_weights(loop), _weights(baseline))


def test_log_dir_under_a_file_spools_locally(tmp_path: Path) -> None:
    """A real fault (the parent of the log directory is a file); with ``spool_dir`` the
    records after the failures go to a local JSON-lines file."""
    (tmp_path / "blocker").write_text("x")
    tb = TensorBoard(tmp_path / "blocker" / "runs", spool_dir=tmp_path / "spool")
    with pytest.warns(RuntimeWarning) as caught:
        tiny_loop([tb]).fit(max_epochs=1)
    assert sum("spooling the rest" in str(w.message) for w in caught) == 1
    assert "NotADirectoryError" in str(caught[0].message)
    assert tb.state == "spooling"
    lines = (tmp_path / "spool" / "tensorboard-spool.jsonl").read_text().splitlines()
    assert any('"kind": "metrics"' in line for line in lines)
    assert any('"kind": "close"' in line and "success" in line for line in lines)


class DiskFullTensorBoard(TensorBoard):
    """Fault injected by subclass: the real writer hands events to its own background
    thread and never raises a disk-full error back to the caller, so a write that
    fails mid-run cannot be produced from outside. Here every scalar write raises."""

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise OSError(28, "No space left on device")


def test_backend_failing_mid_run_bit_identical_weights(tmp_path: Path) -> None:
    tb = DiskFullTensorBoard(tmp_path, max_failures=2)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        loop = tiny_loop([tb])
        loop.fit(max_epochs=3)
    assert tb.state == "disabled"
    assert tb.recorded["open"] == 1 and tb.failed["metrics"] == 2
    assert "last error: OSError" in tb.report
    baseline = tiny_loop([])
    baseline.fit(max_epochs=3)
    _assert_identical(_weights(loop), _weights(baseline))


def test_hanging_backend_does_not_block_training(tmp_path: Path) -> None:
    """Fault injected by subclass: opening the writer hangs (as a stuck network file
    system would)."""
    release = threading.Event()

    class Hanging(TensorBoard):
        def _backend_open(self, loop_info: dict[str, Any]) -> None:
            release.wait(30)
            super()._backend_open(loop_info)

    tb = Hanging(tmp_path, close_timeout=0.2)
    rec = HookRecorder(["on_log"])
    try:
        with pytest.warns(RuntimeWarning, match="did not finish"):
            loop = tiny_loop([tb, rec])
            loop.fit(max_epochs=2)
    finally:
        release.set()
    assert [s for s, _ in rec.logged()][-1] == 16
    assert loop.state.global_step == 16


class Snapshot:
    """Keeps a serialised loop state at the end of the first epoch."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    @hookimpl
    def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
        if epoch == 0:
            buf = io.BytesIO()
            torch.save(loop.state_dict(), buf)
            buf.seek(0)
            self.state = torch.load(buf, weights_only=True)


class CrashAt:
    """Raises once the loop reaches a given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_batch_end(self, loop: Any) -> None:
        if loop.state.global_step >= self.step:
            raise RuntimeError("simulated crash")


def test_crash_is_flushed_marked_failed_and_resume_has_no_duplicates(
    tmp_path: Path, read_events: Any
) -> None:
    log_dir = tmp_path / "tb"
    snap = Snapshot()
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_loop([snap, CrashAt(14), TensorBoard(log_dir)]).fit(max_epochs=3)
    assert snap.state is not None and snap.state["loop"]["global_step"] == 8

    acc = read_events(log_dir)  # flushed on the crash
    assert [s for s, _ in _scalars(acc, "train/loss")] == [4, 8, 12]
    end = _hparams(acc)["_hparams_/session_end_info"].session_end_info
    assert end.status == api_pb2.Status.Value("STATUS_FAILURE")
    assert _texts(acc, "hookloop/status") == [(12, "failed")]

    rec = HookRecorder(["on_log"])
    resumed = tiny_loop([TensorBoard(log_dir), rec])
    resumed.fit(max_epochs=3, resume=snap.state)

    acc = read_events(log_dir)
    loss = _scalars(acc, "train/loss")
    assert [s for s, _ in loss] == [4, 8, 12, 16, 20, 24]
    run2 = {s: m["train/loss"] for s, m in rec.logged() if "train/loss" in m}
    assert [v for s, v in loss if s > 8] == pytest.approx([run2[s] for s in (12, 16, 20, 24)], rel=1e-6)
    assert [s for s, _ in _scalars(acc, "val/loss")] == [8, 16, 24]
    assert [s for s, _ in _scalars(acc, "train/loss_epoch")] == [8, 16, 24]
    # the status history (text is not purged by this reader): crashed, then finished
    assert _texts(acc, "hookloop/status") == [(12, "failed"), (24, "success")]

    # the resumed run is bit-identical to one that never crashed
    straight = tiny_loop([])
    straight.fit(max_epochs=3)
    _assert_identical(_weights(resumed), _weights(straight))


def test_model_graph(tmp_path: Path, read_events: Any) -> None:
    tb = TensorBoard(tmp_path, log_graph=True)
    loop = tiny_loop([tb])
    loop.fit(max_epochs=1)
    graph = read_events(tmp_path).Graph()
    ops = {n.op for n in graph.node}
    assert "aten::linear" in ops and "aten::relu" in ops
    assert tb.failed == {}
    assert loop.module.training


def test_flatten_hparams() -> None:
    flat = flatten_hparams({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": torch.tensor(2.5)})
    assert flat == {"a/b": 1, "a/c/d": "x", "e": "[1, 2]", "f": 2.5}


def test_rank_zero_only() -> None:
    tb = TensorBoard()
    assert tb.hookloop_rank_zero_only is True
    pm = PluginManager()
    pm.register(tb)
    assert "tensorboard" in pm.plan()["on_log"]
    pm.set_rank(1)
    assert "tensorboard" not in pm.plan()["on_log"]
    assert "tensorboard" not in pm.plan()["on_fit_start"]


def test_missing_sdk_has_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError) as info:
        TensorBoard()
    assert str(info.value) == INSTALL_HINT and "pip install hookloop-tensorboard" in INSTALL_HINT


def test_sdk_imported_lazily() -> None:
    code = (
        "import sys, hookloop, hookloop.tracking, hookloop_tensorboard\n"
        "from hookloop_tensorboard import TensorBoard\n"
        "TensorBoard()\n"
        "assert 'tensorboard' not in sys.modules, 'imported eagerly'\n"
        "assert 'torch.utils.tensorboard' not in sys.modules, 'imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_step_hooks_not_implemented() -> None:
    per_step = ("on_train_batch_start", "on_before_backward", "on_after_backward",
                "on_before_optimizer_step", "on_train_batch_end")
    pm = PluginManager()
    pm.register(TensorBoard(log_graph=True))
    plan = pm.plan()
    assert all(plan[h] == [] for h in per_step)


def test_best_checkpoint_is_recorded_as_text(tmp_path: Path, read_events: Any) -> None:
    class Announce:
        """Announces checkpoints the way the checkpoint plugin does (through the hook)."""

        @hookimpl
        def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
            loop.callers.on_checkpoint_saved(loop, f"ckpt/epoch{epoch}.pt", {"val/loss": 0.5 - epoch / 10},
                                           epoch == 1)

    tiny_loop([Announce(), TensorBoard(tmp_path)]).fit(max_epochs=2)
    assert _texts(read_events(tmp_path), "checkpoint/best") == [(16, "`ckpt/epoch1.pt` (val/loss=0.4)")]


# ---------------------------------------------------------------- through TensorBoard's server

ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def _session_status(server: Any) -> list[str]:
    body = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": [],
            "startIndex": 0, "sliceSize": 100}
    groups = server.get("/data/plugin/hparams/session_groups", body)["sessionGroups"]
    return [s["status"] for g in groups for s in g["sessions"]]


class Tutorial:
    """Every SummaryWriter call of PyTorch's TensorBoard tutorial, through hookloop's
    logging calls: the graph, an image, a histogram and a point cloud at fit start."""

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        gen = torch.Generator().manual_seed(0)
        loop.log_graph(torch.rand(2, 4, generator=gen))
        loop.log_image("samples/grid", torch.rand(3, 8, 8, generator=gen))
        loop.log_histogram("weights/first", loop.module[0].weight)
        vertices = torch.rand(1, 12, 3, generator=gen)
        colors = (torch.rand(1, 12, 3, generator=gen) * 255).to(torch.uint8)
        loop.log_mesh("cloud", vertices, None, colors)


def test_every_dashboard_shows_what_was_logged(tmp_path: Path, tensorboard_server: Any) -> None:
    log_dir = tmp_path / "tb"
    tb = TensorBoard(log_dir)
    loop = tiny_loop([Tutorial(), tb])
    loop.log_text("notes/before_fit", "logged before the run opened")
    loop.fit(max_epochs=1)
    assert not tb.failed and not tb.dropped, tb.report

    server = tensorboard_server(log_dir)
    plugins = server.get("/data/plugins_listing")
    for name in ("scalars", "images", "histograms", "distributions", "graphs", "text", "mesh", "hparams"):
        assert plugins[name]["enabled"], name
    points = server.get("/data/plugin/scalars/scalars?run=.&tag=train/loss")
    assert [p[1] for p in points] == [4, 8]
    assert server.get("/data/plugin/images/tags")["."]["samples/grid"]["samples"] == 1
    hist = server.get("/data/plugin/histograms/histograms?run=.&tag=weights/first")
    assert len(hist) == 1 and sum(b[2] for b in hist[0][2]) == 4 * 16
    assert len(server.get("/data/plugin/distributions/distributions?run=.&tag=weights/first")) == 1
    graph = server.get("/data/plugin/graphs/graph?run=.")
    assert "aten::linear" in graph and "aten::relu" in graph
    assert "notes/before_fit/text_summary" in server.get("/data/plugin/text/tags")["."]
    text = server.get("/data/plugin/text/text?run=.&tag=notes/before_fit/text_summary")
    assert "logged before the run opened" in text[0]["text"]
    assert server.get("/data/plugin/mesh/tags")["."]["cloud"]["samples"] == 1
    assert _session_status(server) == ["STATUS_SUCCESS"]


def test_wall_times_are_the_training_threads(tmp_path: Path, read_events: Any) -> None:
    rec = HookRecorder(["on_log", "on_log_text", "on_fit_start"])

    class Text:
        @hookimpl
        def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
            loop.log_text("epoch", str(epoch))

    tiny_loop([Text(), rec, TensorBoard(tmp_path)]).fit(max_epochs=2)
    acc = read_events(tmp_path)
    logged = {(c.kwargs["step"], c.kwargs["time"]) for c in rec.of("on_log")
              if "train/loss" in c.kwargs["metrics"]}
    assert sorted((e.step, e.wall_time) for e in acc.Scalars("train/loss")) == sorted(logged)
    texts = [c.kwargs["time"] for c in rec.of("on_log_text")]
    assert [e.wall_time for e in acc.Tensors("epoch/text_summary")] == texts


def test_a_resumed_run_shows_its_final_outcome(tmp_path: Path, tensorboard_server: Any) -> None:
    log_dir = tmp_path / "tb"
    snap = Snapshot()
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_loop([snap, CrashAt(14), TensorBoard(log_dir)]).fit(max_epochs=3)
    tiny_loop([TensorBoard(log_dir)]).fit(max_epochs=3, resume=snap.state)
    assert _session_status(tensorboard_server(log_dir)) == ["STATUS_SUCCESS"]


KILL_SCRIPT = """
import json, os, signal, sys
import torch
from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder, tiny_loop
from hookloop_tensorboard import TensorBoard

log_dir, ckpt, phase = sys.argv[1:4]


class SaveThenDie:
    @hookimpl
    def on_train_epoch_end(self, loop, epoch):
        if epoch == 0:
            torch.save(loop.state_dict(), ckpt)

    @hookimpl
    def on_train_batch_end(self, loop):
        if loop.state.global_step == 14:  # step 12 was logged after the checkpoint
            tracker = loop.get_plugin("tensorboard")
            tracker.wait(60)  # every record is flushed to the event file as it is written
            os.kill(os.getpid(), signal.SIGKILL)


rec = HookRecorder(["on_log"])
if phase == "crash":
    tiny_loop([SaveThenDie(), TensorBoard(log_dir), rec]).fit(max_epochs=3)
else:
    tiny_loop([TensorBoard(log_dir), rec]).fit(max_epochs=3, resume=torch.load(ckpt, weights_only=True))
print("LOGGED", json.dumps({s: m["train/loss"] for s, m in rec.logged() if "train/loss" in m}))
"""


def _kill_then_resume(tmp_path: Path) -> tuple[Path, dict[int, float]]:
    """Run a fit in a subprocess SIGKILLed at step 14 (checkpoint at step 8, step 12
    logged and flushed), resume it in a new process; the log directory and the
    ``train/loss`` each process logged."""
    import json
    import os

    script, log_dir, ckpt = tmp_path / "kill.py", tmp_path / "tb", tmp_path / "epoch0.pt"
    script.write_text(KILL_SCRIPT)
    args = [sys.executable, str(script), str(log_dir), str(ckpt)]
    env = {**os.environ, "HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    crashed = subprocess.run([*args, "crash"], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = subprocess.run([*args, "resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("LOGGED "))
    run2 = {int(s): v for s, v in json.loads(line[len("LOGGED "):]).items()}
    return log_dir, run2


def _all_points(server: Any, tag: str, count: int) -> list[Any]:
    """The scalars of ``tag`` once the server has loaded at least ``count`` (a loader
    may answer while it still reads the files), or what it has after 60 s."""
    import time

    deadline = time.monotonic() + 60
    while True:
        points = server.get(f"/data/plugin/scalars/scalars?run=.&tag={tag}")
        if len(points) >= count or time.monotonic() > deadline:
            return points
        time.sleep(0.2)


@pytest.mark.slow  # two subprocesses and two servers (about 15 s)
def test_a_killed_run_resumed_in_a_new_process_has_no_duplicates_in_either_loader(
    tmp_path: Path, tensorboard_server: Any, read_events: Any
) -> None:
    log_dir, run2 = _kill_then_resume(tmp_path)
    assert sorted(run2) == [12, 16, 20, 24]
    raw = [e.step for e in read_events(log_dir).Scalars("train/loss")]
    assert raw == [4, 8, 12, 16, 20, 24]
    for flag in ("--load_fast=true", "--load_fast=false"):
        server = tensorboard_server(log_dir, flag)
        points = _all_points(server, "train/loss", 6)
        assert [p[1] for p in points] == [4, 8, 12, 16, 20, 24], flag
        # the resumed process's values win over the killed one's at step 12
        assert [p[2] for p in points if p[1] > 8] == pytest.approx([run2[s] for s in (12, 16, 20, 24)],
                                                                   rel=1e-6), flag
        val = _all_points(server, "val/loss", 3)
        assert [p[1] for p in val] == [8, 16, 24], flag


DISK_FULL_SCRIPT = """
import subprocess, sys, warnings
from pathlib import Path
from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder, tiny_loop
from hookloop_tensorboard import TensorBoard
from tensorboard.backend.event_processing import event_accumulator as ea

d = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True)
try:
    class Fill:
        # fills the file system once the first epoch is written
        @hookimpl
        def on_train_epoch_start(self, loop, epoch):
            if epoch == 1:
                loop.get_plugin("tensorboard").wait(60)
                with open(d / "filler", "wb", buffering=0) as fh:
                    try:
                        while True:
                            fh.write(bytes(4096))
                    except OSError:
                        pass
                # more than the free end of the event file's last page
                loop.log_text("notes", "x" * 16384)

    rec = HookRecorder(["on_log"])
    tb = TensorBoard(d / "tb")
    with warnings.catch_warnings(record=True):
        tiny_loop([Fill(), rec, tb]).fit(max_epochs=3)
    acc = ea.EventAccumulator(str(d / "tb"), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    before = [m for s, m in rec.logged() if s <= 8]
    print("LOGGED_BEFORE", len(before), sum(len(m) for m in before))
    print("IN_FILE", sum(len(acc.Scalars(t)) for t in acc.Tags()["scalars"]))
    print("COUNTS", tb.recorded["metrics"], tb.failed["metrics"], tb.dropped["metrics"])
    print("TEXT", tb.recorded["text"], tb.failed["text"])
    print("REPORT", tb.report)
finally:
    subprocess.run(["umount", str(d)], check=False)
"""


def test_disk_full_mid_run_counts_failures_not_records(tmp_path: Path) -> None:
    """A real full tmpfs (ENOSPC) after the first epoch: what the event file holds is
    what the summary calls recorded, the failed writes are failures, and TensorBoard's
    writer thread prints no traceback."""
    prefix = tmpfs_mount_prefix(tmp_path / "probe", "a full disk")
    d = tmp_path / "full"
    d.mkdir()
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_SCRIPT)
    try:
        out = subprocess.run([*prefix, sys.executable, str(script), str(d)], capture_output=True,
                             text=True, timeout=300, env={**__import__("os").environ,
                                                          "HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"})
    finally:
        unmount(d)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {x.split(" ", 1)[0]: x.split(" ", 1)[1] for x in out.stdout.splitlines() if " " in x}
    calls, scalars = map(int, lines["LOGGED_BEFORE"].split())
    recorded, failed, _dropped = map(int, lines["COUNTS"].split())
    assert int(lines["IN_FILE"]) == scalars > 0, out.stdout
    assert recorded == calls, out.stdout
    assert failed >= 1 and "No space left on device" in lines["REPORT"], out.stdout
    assert lines["TEXT"] == "0 1", out.stdout  # the write that hit the full disk
    assert "Traceback" not in out.stderr and "Exception in thread" not in out.stderr, out.stderr[-3000:]
