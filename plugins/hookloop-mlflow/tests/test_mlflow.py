"""The MLflow tracker against real MLflow stores (SQLite, and `mlflow server` over
HTTP), read back with MlflowClient (no mock of mlflow anywhere)."""

from __future__ import annotations

import json
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from hookloop_mlflow import MLflow
from hookloop_mlflow.tracker import INSTALL_HINT, _import_mlflow, _key
from mlflow.tracking import MlflowClient
from torch import nn

from hookloop.plugins import hookimpl
from hookloop.testing import SyncGuard, run_plugin, tiny_loop


class MediaAndCheckpoints:
    """Logs text and an image in the first epoch and, like the checkpoint plugin,
    saves the model at every epoch end and announces it as the best so far."""

    def __init__(self, folder: Path, text: str) -> None:
        self.folder = folder
        self.text = text

    @hookimpl
    def on_train_epoch_start(self, loop: Any, epoch: int) -> None:
        if epoch == 0:
            loop.log_text("model/summary", self.text)
            gen = torch.Generator().manual_seed(1)
            loop.log_image("samples/grid", torch.rand(3, 8, 8, generator=gen))

    @hookimpl
    def on_train_epoch_end(self, loop: Any, epoch: int, metrics: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch-{epoch}.pt"
        torch.save({"model": loop.module.state_dict()}, path)
        loop.callers.on_checkpoint_saved(loop, str(path), dict(metrics), True)


def experiment_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def expected_history(logged: list[tuple[int, dict[str, float]]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in logged:
        for key, value in metrics.items():
            out.setdefault(key, []).append((step, value))
    return out


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def test_sqlite_run_holds_params_metrics_tags_artifacts(mlflow_env: Any, tmp_path: Path) -> None:
    media = MediaAndCheckpoints(tmp_path / "ckpt", f"Sequential(...) token={mlflow_env.env_token}")
    tracker = MLflow(
        experiment=experiment_name(), run_name="digits", save_dir=mlflow_env.store_dir,
        tags={"team": "vision", "api_token": mlflow_env.hparam_token},
        params={"batch_size": 8, "data": {"api_key": mlflow_env.hparam_token, "root": "/data"}},
        histogram_every_n_epochs=1,
    )
    _, rec = run_plugin(
        tracker, max_epochs=2, plugins=[media],
        hparams={"password": mlflow_env.hparam_token, "dropout": 0.1,
                 "note": f"reads {mlflow_env.env_token}"},
    )
    assert tracker.state == "closed" and not tracker.failed and not tracker.dropped, tracker.report
    assert tracker.resolved_uri == mlflow_env.uri
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "digits"
    assert client.get_experiment(run.info.experiment_id).name == tracker.experiment

    # every value of every on_log call, at its global step
    expected = expected_history(rec.logged())
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        assert history(client, run.info.run_id, key) == sorted(points), key
    assert [s for s, _ in expected["train/loss"]] == [4, 8, 12, 16]

    params = run.data.params
    assert params["password"] == params["data/api_key"] == "***"
    assert params["note"] == "reads ***"
    assert params["batch_size"] == "8" and params["data/root"] == "/data"
    assert params["lr"] == "0.1" and params["max_epochs"] == "2" and params["dropout"] == "0.1"
    assert run.data.tags["team"] == "vision" and run.data.tags["api_token"] == "***"
    assert run.data.tags["hookloop.best_checkpoint"] == "checkpoints/epoch-1.pt"

    files = artifact_paths(client, run.info.run_id)
    for name in ("checkpoints/epoch-0.pt", "checkpoints/epoch-1.pt",
                 "text/model/summary/step-00000000.txt", "images/samples/grid/step-00000000.png",
                 "histograms/weights/0.weight/step-00000008.json",
                 "histograms/weights/0.weight/step-00000016.json",
                 "hookloop/tracking-summary.txt"):
        assert name in files, name
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    assert (local / "text/model/summary/step-00000000.txt").read_text() == "Sequential(...) token=***"
    hist = json.loads((local / "histograms/weights/0.weight/step-00000016.json").read_text())
    assert sum(hist["counts"]) == 4 * 16 and len(hist["edges"]) == 65
    saved = torch.load(local / "checkpoints/epoch-1.pt", weights_only=True)
    assert torch.equal(saved["model"]["0.weight"], torch.load(
        tmp_path / "ckpt/epoch-1.pt", weights_only=True)["model"]["0.weight"])

    assert mlflow_env.grep_secrets(tmp_path) == []


def crash_at_step_5(error: BaseException) -> Any:
    def step(loop: Any, batch: Any) -> torch.Tensor:
        if loop.state.global_step == 5:
            raise error
        x, y = batch
        loss = nn.functional.cross_entropy(loop.model(x), y)
        loop.log("train/loss", loss)
        return loss

    return step


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_crash_never_leaves_the_run_running(
    mlflow_env: Any, error: BaseException, status: str
) -> None:
    tracker = MLflow(experiment=experiment_name(), save_dir=mlflow_env.store_dir)
    with pytest.raises(type(error)):
        run_plugin(tracker, max_epochs=2, step_fn=crash_at_step_5(error))
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == status
    assert history(client, tracker.run_id, "train/loss")[0][0] == 4


def test_resume_continues_the_same_run(mlflow_env: Any, tmp_path: Path) -> None:
    experiment = experiment_name()
    first = MLflow(experiment=experiment, save_dir=mlflow_env.store_dir)
    loop = tiny_loop([first])
    loop.fit(max_epochs=1)
    torch.save(loop.state_dict(), tmp_path / "last.pt")
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["plugins"]["mlflow"]["run_id"] == first.run_id

    second = MLflow(experiment=experiment, save_dir=mlflow_env.store_dir)
    tiny_loop([second]).fit(max_epochs=2, resume=checkpoint)
    assert second.run_id == first.run_id
    assert not second.failed and not second.dropped, second.report
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(client, first.run_id, "train/loss")] == [4, 8, 12, 16]
    assert [s for s, _ in history(client, first.run_id, "val/loss")] == [8, 16]
    assert run.data.params["max_epochs"] == "1"  # MLflow params cannot change
    assert len(client.search_runs([run.info.experiment_id])) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_never_changes_training(mlflow_env: Any) -> None:
    baseline, _ = run_plugin(object(), max_epochs=2)

    # a real fault: an HTTP tracking URI where nothing listens
    tracker = MLflow(f"http://127.0.0.1:{free_port()}", experiment=experiment_name())
    with pytest.warns(RuntimeWarning) as caught:
        loop, _ = run_plugin(tracker, max_epochs=2)
    assert loop.state.global_step == baseline.state.global_step == 16
    for key, value in baseline.module.state_dict().items():
        assert torch.equal(value, loop.module.state_dict()[key]), key
    messages = [str(w.message) for w in caught]
    assert any("failed 3 times in a row" in m and "Training continues" in m for m in messages)
    assert tracker.state == "disabled"
    assert tracker.failed["open"] == 1 and not tracker.recorded
    assert "open=1" in tracker.report and mlflow_env.tracking_token not in tracker.report


class KillServerAt:
    """Kills the tracking server once the run reached ``step`` and everything queued
    so far was sent."""

    def __init__(self, server: Any, tracker: MLflow, step: int) -> None:
        self.server = server
        self.tracker = tracker
        self.step = step
        self.killed_at: int | None = None

    @hookimpl
    def on_train_batch_end(self, loop: Any) -> None:
        if self.killed_at is None and loop.state.global_step >= self.step:
            assert self.tracker.wait()
            self.server.stop()
            self.killed_at = loop.state.global_step


def test_server_killed_mid_training(mlflow_env: Any, mlflow_server: Any, tmp_path: Path) -> None:
    # one backend call per on_log (no holding of scalars), so that each call meets the
    # dead server on its own
    tracker = MLflow(mlflow_server.url, experiment=experiment_name(), metrics_interval=0)
    killer = KillServerAt(mlflow_server, tracker, step=6)
    with pytest.warns(RuntimeWarning) as caught:
        loop, rec = run_plugin(tracker, max_epochs=2, plugins=[killer])

    # training completed, and the failure is reported: one warning when the tracker
    # gave up, and the end-of-fit summary of what was not recorded
    assert killer.killed_at == 6 and loop.state.global_step == 16
    assert loop.state.stop_reason == "max_epochs"
    messages = [str(w.message) for w in caught]
    assert sum("failed 3 times in a row" in m for m in messages) == 1
    assert tracker.state == "disabled"
    assert tracker.failed["metrics"] == 3
    # degraded, it stopped sending, but it still tried to close the run it opened
    assert tracker.failed["close"] == 1 and "close" not in tracker.recorded
    assert tracker.report in messages
    assert "dropped" in tracker.report and tracker.run_id in tracker.report

    # what was sent before the server died is in its backend store
    client = MlflowClient(tracking_uri=mlflow_server.backend_uri)
    run = client.get_run(tracker.run_id)
    assert history(client, tracker.run_id, "train/loss") == [
        (s, m["train/loss"]) for s, m in rec.logged() if s == 4 and "train/loss" in m
    ]
    assert run.data.params["lr"] == "0.1"
    # the server's store, artifacts and log are in tmp_path
    assert mlflow_env.grep_secrets(tmp_path) == []


def test_no_host_device_sync_on_steps_that_do_not_log(mlflow_env: Any) -> None:
    tracker = MLflow(experiment=experiment_name(), save_dir=mlflow_env.store_dir)
    loop = tiny_loop([tracker], log_every_n_steps=4)
    with SyncGuard(loop) as guard:
        loop.fit(max_epochs=2)
    assert guard.steps() <= {4, 8, 12, 16}
    assert MlflowClient(mlflow_env.uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_registered_by_entry_point_name(mlflow_env: Any) -> None:
    loop = tiny_loop([("mlflow", {"experiment": "by-name", "save_dir": mlflow_env.store_dir})])
    plugin = loop.get_plugin("mlflow")
    assert isinstance(plugin, MLflow) and plugin.experiment == "by-name"


def test_missing_sdk_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow is installed here; hiding it from the import system is the only way to
    # produce a missing package for real in this environment
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match="pip install mlflow"):
        _import_mlflow()
    with pytest.raises(ImportError) as info:
        MLflow()
    assert str(info.value) == INSTALL_HINT


def test_keys_are_made_valid() -> None:
    assert _key("train/loss") == "train/loss"
    assert _key("acc@top-5") == "acc_top-5"
    assert _key("/a..b") == "a._b"


# ---------------------------------------------------------------- times, tags, artifacts, resume


def test_run_and_metric_times_are_training_times(mlflow_env: Any) -> None:
    import time

    from hookloop.testing import HookRecorder

    rec = HookRecorder(["on_log"])
    tracker = MLflow(experiment=experiment_name(), save_dir=mlflow_env.store_dir)  # held 5 s
    before = time.time()
    loop = tiny_loop([rec, tracker])
    loop.fit(max_epochs=2)
    after = time.time()
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    run = client.get_run(tracker.run_id)
    logged = [(c.kwargs["step"], int(c.kwargs["time"] * 1000)) for c in rec.of("on_log")
              if "train/loss" in c.kwargs["metrics"]]
    points = sorted((m.step, m.timestamp) for m in client.get_metric_history(tracker.run_id, "train/loss"))
    assert points == logged and len({t for _, t in points}) == 4
    assert before * 1000 <= run.info.start_time <= logged[0][1]
    assert logged[-1][1] <= run.info.end_time <= after * 1000


def test_runs_carry_mlflow_source_and_user_tags(mlflow_env: Any) -> None:
    import getpass

    tracker = MLflow(experiment=experiment_name(), save_dir=mlflow_env.store_dir,
                     tags={"mlflow.source.name": "train.py"})
    tiny_loop([tracker]).fit(max_steps=4)
    run = MlflowClient(tracking_uri=mlflow_env.uri).get_run(tracker.run_id)
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser() == run.info.user_id
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == "train.py"  # given tags win
    assert tags["hookloop.run_key"] == tracker.run_key


def test_artifacts_keep_the_checkpoint_plugins_best_k(mlflow_env: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    tracker = MLflow(experiment=experiment_name(), save_dir=mlflow_env.store_dir)
    checkpoint = ("checkpoint", {"dirpath": ckpt, "monitor": "train/loss_epoch", "top_k": 2,
                                 "save_last": False, "verbose": False})
    loop = tiny_loop([checkpoint, tracker])
    loop.fit(max_epochs=4)
    assert not tracker.failed and tracker.recorded["artifact"] >= 3, tracker.report
    assert tracker.recorded["artifact_removed"] == tracker.recorded["artifact"] - 2
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    uploaded = sorted(Path(p).name for p in artifact_paths(client, tracker.run_id, "checkpoints"))
    local = sorted(p.name for p in ckpt.glob("*.pt"))
    assert uploaded == local and len(local) == 2
    best = client.get_run(tracker.run_id).data.tags["hookloop.best_checkpoint"]
    assert Path(best).name in local


CRASH_SCRIPT = """
import os, signal, sys, time
import torch
from hookloop.plugins import hookimpl
from hookloop.testing import tiny_loop
from hookloop_mlflow import MLflow

store, experiment, ckpt, phase = sys.argv[1:5]


class SlowOpen(MLflow):
    # the run is created late (as on a loaded machine): checkpoints come first
    def _backend_open(self, info):
        time.sleep(2)
        super()._backend_open(info)


class SaveThenDie:
    @hookimpl
    def on_train_epoch_start(self, loop, epoch):
        if epoch == 0:
            torch.save(loop.state_dict(), ckpt)

    @hookimpl
    def on_train_batch_end(self, loop):
        if loop.state.global_step == 6:
            loop.get_plugin("mlflow").wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


if phase == "crash":
    tiny_loop([SaveThenDie(), SlowOpen(experiment=experiment, save_dir=store)]).fit(max_epochs=2)
else:
    tracker = MLflow(experiment=experiment, save_dir=store)
    tiny_loop([tracker]).fit(max_epochs=2, resume=torch.load(ckpt, weights_only=True))
    print("RUN", tracker.run_id, tracker.failed, tracker.dropped)
"""


@pytest.mark.slow  # two subprocesses that import MLflow (about 20 s)
def test_a_killed_run_resumes_in_a_new_process_as_the_same_run(mlflow_env: Any, tmp_path: Path) -> None:
    import os
    import subprocess

    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    experiment, ckpt = experiment_name(), tmp_path / "early.pt"
    args = [sys.executable, str(script), str(mlflow_env.store_dir), experiment, str(ckpt)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_env.uri}
    crashed = subprocess.run([*args, "crash"], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    state = torch.load(ckpt, weights_only=True)["plugins"]["mlflow"]
    assert state["run_id"] is None and state["run_key"]  # written before the run existed

    resumed = subprocess.run([*args, "resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert f"RUN {run.info.run_id}" in resumed.stdout
    assert run.info.status == "FINISHED" and run.data.tags["hookloop.run_key"] == state["run_key"]
    assert {s for s, _ in history(client, run.info.run_id, "train/loss")} == {4, 8, 12, 16}


KILL_AFTER_CHECKPOINT_SCRIPT = """
import json, os, signal, sys
from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder, tiny_loop
from hookloop_mlflow import MLflow

store, experiment, ckpt, phase, hold = sys.argv[1:6]
options = {"experiment": experiment, "save_dir": store, "hold_until_checkpoint": hold == "hold"}


class Die:
    @hookimpl
    def on_train_batch_end(self, loop):
        if loop.state.global_step == 14:  # step 12 logged after the epoch-0 checkpoint
            loop.get_plugin("mlflow").wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


rec = HookRecorder(["on_log"])
checkpoint = ("checkpoint", {"dirpath": ckpt, "verbose": False, "resume": "latest"})
plugins = [checkpoint, MLflow(**options), rec]
tiny_loop([Die(), *plugins] if phase == "crash" else plugins).fit(max_epochs=2)
print("LOGGED", json.dumps([[s, m] for s, m in rec.logged()]))
"""


def _kill_after_checkpoint_then_resume(mlflow_env: Any, tmp_path: Path, hold: str) -> tuple[Any, Any]:
    """A fit with the checkpoint plugin SIGKILLed at step 14 (checkpoint at step 8, step
    12 logged), resumed from the latest checkpoint in a new process: the run and the
    scalars the resumed process logged."""
    import json
    import os
    import subprocess

    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_CHECKPOINT_SCRIPT)
    experiment = experiment_name()
    args = [sys.executable, str(script), str(mlflow_env.store_dir), experiment, str(tmp_path / "ckpt")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_env.uri}
    crashed = subprocess.run([*args, "crash", hold], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = subprocess.run([*args, "resume", hold], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("LOGGED "))
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0], json.loads(line[len("LOGGED "):])


@pytest.mark.slow  # two subprocesses that import MLflow (about 20 s)
def test_a_killed_run_resumed_has_one_point_per_step_with_the_resumed_values(
    mlflow_env: Any, tmp_path: Path
) -> None:
    run, logged = _kill_after_checkpoint_then_resume(mlflow_env, tmp_path, "hold")
    client = MlflowClient(tracking_uri=mlflow_env.uri)
    assert run.info.status == "FINISHED"
    resumed = expected_history([(s, m) for s, m in logged])
    for key in ("train/loss", "val/loss", "train/loss_epoch"):
        points = history(client, run.info.run_id, key)
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (key, points)  # one point per step
        # every step the resumed process logged holds its value
        assert {s: v for s, v in points if s in dict(resumed[key])} == pytest.approx(dict(resumed[key])), key
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == [4, 8, 12, 16]


KILLED_EARLY_SCRIPT = """
import os, signal, sys
import torch
from hookloop.plugins import hookimpl
from hookloop.testing import tiny_loop
from hookloop_mlflow import MLflow

url, experiment, ckpt, phase = sys.argv[1:5]


class SaveThenDie:
    # killed before the first step, with a checkpoint taken just before: the run is
    # known by its key only (MLflow has not answered yet)
    @hookimpl
    def on_train_batch_start(self, loop):
        if loop.state.global_step == 0:
            torch.save(loop.state_dict(), ckpt)
            os.kill(os.getpid(), signal.SIGKILL)


if phase == "crash":
    tiny_loop([SaveThenDie(), MLflow(url, experiment=experiment)]).fit(max_epochs=2)
else:
    tracker = MLflow(url, experiment=experiment)
    tiny_loop([tracker]).fit(max_epochs=2, resume=torch.load(ckpt, weights_only=True))
    print("RUN", tracker.run_id, tracker.report)
"""


@pytest.mark.slow  # four subprocesses that import MLflow, against a server (about 60 s)
def test_a_run_killed_before_its_first_step_exists_and_its_resume_continues_it(
    mlflow_env: Any, mlflow_server: Any, tmp_path: Path
) -> None:
    import os
    import subprocess
    import time

    script = tmp_path / "early.py"
    script.write_text(KILLED_EARLY_SCRIPT)
    client = MlflowClient(tracking_uri=mlflow_server.url)

    def run(experiment: str, phase: str) -> subprocess.CompletedProcess[str]:
        ckpt = tmp_path / f"{experiment}.pt"
        args = [sys.executable, str(script), mlflow_server.url, experiment, str(ckpt), phase]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    def runs(experiment: str) -> list[Any]:
        found = client.get_experiment_by_name(experiment)
        return [] if found is None else client.search_runs([found.experiment_id])

    # killed before its first step: the run still comes to exist, closed as KILLED
    alone = experiment_name()
    crashed = run(alone, "crash")
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    state = torch.load(tmp_path / f"{alone}.pt", weights_only=True)["plugins"]["mlflow"]
    assert state["run_id"] is None and state["run_key"] and state["backend"]["pid"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and [r.info.status for r in runs(alone)] != ["KILLED"]:
        time.sleep(0.5)
    (killed,) = runs(alone)
    assert killed.info.status == "KILLED" and killed.data.tags["hookloop.run_key"] == state["run_key"]

    # killed the same way and resumed at once, in a new process: the resume waits for
    # the killed process's backend to create the run, and continues it
    resumed_experiment = experiment_name()
    assert run(resumed_experiment, "crash").returncode == -9
    resumed = run(resumed_experiment, "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (one,) = runs(resumed_experiment)
    assert f"RUN {one.info.run_id}" in resumed.stdout and "dropped none" in resumed.stdout, resumed.stdout
    assert one.info.status == "FINISHED"
    assert [s for s, _ in history(client, one.info.run_id, "train/loss")] == [4, 8, 12, 16]
