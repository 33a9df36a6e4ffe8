"""The W&B tracker against the real SDK in offline mode, read back from the run's
``.wandb`` transaction log with W&B's own tooling (no mock of wandb anywhere)."""

from __future__ import annotations

import re
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hookloop_wandb import WandB
from hookloop_wandb.tracker import INSTALL_HINT, _import_wandb
from torch import nn

from hookloop.plugins import hookimpl
from hookloop.testing import SyncGuard, run_plugin, tiny_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_run import read_offline_run, sync_dry_run


class MediaAndCheckpoints:
    """Logs text and an image in the first epoch and, like the checkpoint plugin,
    saves the model at every epoch end and announces it as the best so far."""

    def __init__(self, folder: Path, text: str) -> None:
        self.folder = folder
        self.text = text
        self.saved: list[Path] = []

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


def expected_rows(logged: list[tuple[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for step, metrics in logged:
        rows.setdefault(step, {}).update(metrics)
    return rows


def history_by_step(run: Any) -> dict[int, dict[str, Any]]:
    steps = [row["_step"] for row in run.history]
    assert steps == sorted(set(steps)), f"history steps not strictly increasing: {steps}"
    return {row["_step"]: row for row in run.history}


def test_offline_run_holds_metrics_config_media_artifacts(wandb_env: Any, tmp_path: Path) -> None:
    media = MediaAndCheckpoints(tmp_path / "ckpt", f"Sequential(...) token={wandb_env.env_token}")
    tracker = WandB(
        project="hookloop-tests",
        config={"api_token": wandb_env.hparam_token, "batch_size": 8},
        tags=["test"],
        histogram_every_n_epochs=1,
    )
    _, rec = run_plugin(
        tracker, max_epochs=2, plugins=[media],
        hparams={"password": wandb_env.hparam_token, "dropout": 0.1,
                 "note": f"reads {wandb_env.env_token}"},
    )
    assert tracker.state == "closed" and not tracker.failed and not tracker.dropped, tracker.report
    run = read_offline_run(tracker.run_dir, wait=30)
    assert run.run_id == tracker.run_id
    assert run.project == "hookloop-tests"
    assert run.exit_code == 0
    assert run.path.is_relative_to(wandb_env.root)

    # every on_log call is in the row of its global step, with the exact value
    rows = history_by_step(run)
    expected = expected_rows(rec.logged())
    assert sorted(expected) == [4, 8, 12, 16]
    for step, metrics in expected.items():
        for key, value in metrics.items():
            assert rows[step][key] == value, (step, key)
    assert {s for s, row in rows.items() if "train/loss" in row} == {4, 8, 12, 16}

    # config: loop configuration, user config and hparams, secrets masked
    assert run.config["api_token"] == "***"
    assert run.config["password"] == "***"
    assert run.config["note"] == "reads ***"
    assert run.config["batch_size"] == 8
    assert run.config["lr"] == 0.1
    assert run.config["max_epochs"] == 2
    assert run.config["dropout"] == 0.1

    # media: text table and image at step 0, histograms at each epoch end
    assert rows[0]["model/summary._type"] == "table-file"
    assert rows[0]["samples/grid._type"] == "image-file"
    for step in (8, 16):
        assert rows[step]["weights/0.weight._type"] == "histogram"
        assert sum(rows[step]["weights/0.weight.values"]) == 4 * 16
    table = next(run.path.rglob("model/summary_*.table.json"))
    assert "token=***" in table.read_text()

    # the best checkpoint, twice, as a model artifact
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert [a["name"] for a in models] == [f"model-{run.run_id}"] * 2
    assert all("best" in a["aliases"] for a in models)
    assert recorded_files(models[-1]) == ["epoch-1.pt"]

    # W&B's own sync would upload it as it is
    assert f"run-{run.run_id}.wandb" in sync_dry_run(run.path)

    assert wandb_env.grep_secrets(tmp_path) == []


def recorded_files(artifact: dict[str, Any]) -> list[str]:
    return [entry["path"] for entry in artifact["manifest"]["contents"]]


def crash_at_step_5(loop: Any, batch: Any) -> torch.Tensor:
    if loop.state.global_step == 5:
        raise RuntimeError("boom at step 5")
    x, y = batch
    loss = nn.functional.cross_entropy(loop.model(x), y)
    loop.log("train/loss", loss)
    return loss


def test_crash_finishes_the_run_with_exit_code_1(wandb_env: Any) -> None:
    tracker = WandB(project="hookloop-tests")
    with pytest.raises(RuntimeError, match="boom"):
        run_plugin(tracker, max_epochs=2, step_fn=crash_at_step_5)
    assert tracker.state == "closed"
    run = read_offline_run(tracker.run_dir, wait=30)
    assert run.exit_code == 1
    assert [row["_step"] for row in run.history if "train/loss" in row] == [4]


def test_resume_continues_the_same_run_without_step_warnings(
    wandb_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WANDB_SILENT")  # let W&B print any warning it has
    first = WandB(project="hookloop-tests")
    loop = tiny_loop([first])
    loop.fit(max_epochs=1)
    torch.save(loop.state_dict(), tmp_path / "last.pt")
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["plugins"]["wandb"]["run_id"] == first.run_id

    second = WandB(project="hookloop-tests")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_loop([second]).fit(max_epochs=2, resume=checkpoint)
    assert second.run_id == first.run_id
    assert second.run_dir != first.run_dir

    before = read_offline_run(first.run_dir, wait=30)
    after = read_offline_run(second.run_dir, wait=30)
    assert before.run_id == after.run_id == first.run_id
    assert [r["_step"] for r in before.history] == [4, 8]
    assert [r["_step"] for r in after.history] == [12, 16]
    assert after.exit_code == 0

    out = capfd.readouterr()
    logs = "".join(p.read_text(errors="replace") for d in (before.path, after.path)
                   for p in d.rglob("*.log"))
    pattern = re.compile(r"less than the current step|monotonically increasing", re.IGNORECASE)
    assert not pattern.search(out.out + out.err + logs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_never_changes_training(
    wandb_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline, _ = run_plugin(object(), max_epochs=2)

    # a real fault: online mode against a server address where nothing listens
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    tracker = WandB(project="hookloop-tests", mode="online", settings={"init_timeout": 2})
    with pytest.warns(RuntimeWarning) as caught:
        loop, _ = run_plugin(tracker, max_epochs=2)
    assert loop.state.global_step == baseline.state.global_step == 16
    for key, value in baseline.module.state_dict().items():
        assert torch.equal(value, loop.module.state_dict()[key]), key
    messages = [str(w.message) for w in caught]
    assert any("failed 3 times in a row" in m and "Training continues" in m for m in messages)
    assert tracker.state == "disabled"
    assert tracker.failed["open"] == 1 and not tracker.recorded
    assert "failed" in tracker.report and "open=1" in tracker.report
    assert wandb_env.api_key not in tracker.report


def test_no_host_device_sync_on_steps_that_do_not_log(wandb_env: Any) -> None:
    tracker = WandB(project="hookloop-tests")
    loop = tiny_loop([tracker], log_every_n_steps=4)
    with SyncGuard(loop) as guard:
        loop.fit(max_epochs=2)
    assert guard.steps() <= {4, 8, 12, 16}
    assert read_offline_run(tracker.run_dir, wait=30).exit_code == 0


def test_registered_by_entry_point_name(wandb_env: Any) -> None:
    loop = tiny_loop([("wandb", {"project": "hookloop-tests", "mode": "disabled"})])
    plugin = loop.get_plugin("wandb")
    assert isinstance(plugin, WandB) and plugin.mode == "disabled"


def test_missing_sdk_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # the SDK is installed here; hiding it from the import system is the only way
    # to produce a missing SDK for real in this environment
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        _import_wandb()
    with pytest.raises(ImportError) as info:
        WandB(project="x")
    assert str(info.value) == INSTALL_HINT


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        WandB(mode="cloud")
    with pytest.raises(ValueError, match="watch"):
        WandB(watch="weights")


def test_watch_records_gradient_and_weight_histograms(wandb_env: Any) -> None:
    tracker = WandB(project="hookloop-tests", watch="all", watch_log_freq=4)
    loop, _ = run_plugin(tracker, max_epochs=2)
    run = read_offline_run(tracker.run_dir, wait=30)
    assert run.exit_code == 0 and not tracker.failed, tracker.report
    rows = history_by_step(run)
    for step in (4, 8, 12, 16):
        assert rows[step]["gradients/0.weight._type"] == "histogram"
        assert sum(rows[step]["parameters/2.bias.values"]) == 3
    assert "gradients/0.weight._type" not in rows.get(2, {})
    # no per-step hook unless watching
    assert loop.pm.plan()["on_before_optimizer_step"].count("wandb") == 1
    assert "wandb" not in tiny_loop([WandB()]).pm.plan()["on_before_optimizer_step"]


def test_timestamps_are_training_times_and_argv_is_masked(
    wandb_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hookloop.testing import HookRecorder

    monkeypatch.setattr(sys, "argv", ["train.py", "--api-key", wandb_env.api_key,
                                      f"--token={wandb_env.env_token}", "--lr", "0.1"])
    rec = HookRecorder(["on_log"])
    tracker = WandB(project="hookloop-tests")
    tiny_loop([rec, tracker]).fit(max_epochs=2)
    assert sys.argv[2] == wandb_env.api_key  # restored
    run = read_offline_run(tracker.run_dir, wait=30)
    rows = history_by_step(run)
    last: dict[int, float] = {}  # a step's row holds several on_log calls: the last one's time
    for c in rec.of("on_log"):
        last[c.kwargs["step"]] = max(last.get(c.kwargs["step"], 0.0), c.kwargs["time"])
    for step, stamp in last.items():
        assert rows[step]["_timestamp"] == pytest.approx(stamp, abs=1e-6), step
    env = next(r["environment"] for r in run.records if r["type"] == "environment")
    assert env["args"] == ["--api-key", "***", "--token=***", "--lr", "0.1"]
    assert wandb_env.grep_secrets() == []


def test_the_run_starts_when_the_fit_started(wandb_env: Any) -> None:
    from datetime import datetime

    from hookloop.testing import HookRecorder

    rec = HookRecorder(["on_log"])
    tracker = WandB(project="hookloop-tests")
    tiny_loop([rec, tracker]).fit(max_epochs=1)
    run = read_offline_run(tracker.run_dir, wait=30)
    record = next(r["run"] for r in run.records if r["type"] == "run")
    started = datetime.fromisoformat(record["start_time"].replace("Z", "+00:00")).timestamp()
    # the fit's start on the training thread, to the microsecond: not when wandb.init
    # ran in the backend, seconds later, which the environment record keeps
    assert tracker.fit_start_time is not None
    assert started == pytest.approx(tracker.fit_start_time, abs=2e-6)
    assert started <= min(c.kwargs["time"] for c in rec.of("on_log"))
    env = next(r["environment"] for r in run.records if r["type"] == "environment")
    assert datetime.fromisoformat(env["started_at"].replace("Z", "+00:00")).timestamp() > started


def test_watch_and_epoch_histograms_both_reach_wandb(wandb_env: Any) -> None:
    tracker = WandB(project="hookloop-tests", watch="parameters", watch_log_freq=4,
                    histogram_every_n_epochs=1)
    run_plugin(tracker, max_epochs=2)
    rows = history_by_step(read_offline_run(tracker.run_dir, wait=30))
    # gradients at each epoch's first optimizer step (global steps 0 and 8)
    assert {s for s, row in rows.items() if "grads/0.weight._type" in row} == {0, 8}
    assert {s for s, row in rows.items() if "parameters/0.weight._type" in row} == {4, 8, 12, 16}


KILL_SCRIPT = """
import json, os, signal, sys
from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder, tiny_loop
from hookloop_wandb import WandB

ckpt, phase = sys.argv[1:3]


class Die:
    @hookimpl
    def on_train_batch_end(self, loop):
        if loop.state.global_step == 14:  # step 12 logged after the epoch-0 checkpoint
            loop.get_plugin("wandb").wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


rec = HookRecorder(["on_log"])
tracker = WandB(project="hookloop-tests")
plugins = [("checkpoint", {"dirpath": ckpt, "verbose": False, "resume": "latest"}), tracker, rec]
tiny_loop([Die(), *plugins] if phase == "crash" else plugins).fit(max_epochs=2)
print("RUN", json.dumps({"id": tracker.run_id, "dir": str(tracker.run_dir), "report": tracker.report,
                         "logged": [[s, m] for s, m in rec.logged()]}))
"""


@pytest.mark.slow  # two subprocesses that start W&B (about 30 s)
def test_a_killed_run_resumed_in_a_new_process_continues_the_same_run(wandb_env: Any, tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    args = [sys.executable, str(script), str(tmp_path / "ckpt")]
    crashed = subprocess.run([*args, "crash"], capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = subprocess.run([*args, "resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads(next(x for x in resumed.stdout.splitlines() if x.startswith("RUN "))[4:])
    assert "dropped none" in info["report"], info["report"]

    # offline, each process wrote a run folder of its own, both under the same run id
    folders = sorted(Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{info['id']}") for f in folders)
    first, second = (read_offline_run(f, wait=30) for f in folders)
    assert Path(info["dir"]) == second.path
    assert first.run_id == second.run_id == info["id"]
    # the second asked W&B to resume it (offline, nothing can confirm that it did)
    run_record = [next(r["run"] for r in run.records if r["type"] == "run") for run in (first, second)]
    assert not run_record[0].get("resume") and run_record[1].get("resume") is True
    # the killed process's backend closed its run (exit code 1) with what had been sent:
    # steps 4 and 8 before the checkpoint, 12 after it
    assert first.exit_code == 1 and [s for s, _ in first.steps("train/loss")] == [4, 8, 12]
    # the resumed process continued from the checkpoint (step 8): step 12 again, then 16,
    # with its own values; a sync of both folders sends step 12 twice (see the README)
    resumed_loss = {s: m["train/loss"] for s, m in info["logged"] if "train/loss" in m}
    assert second.exit_code == 0 and second.resumed is False
    assert sorted(resumed_loss) == [12, 16]
    assert dict(second.steps("train/loss")) == pytest.approx(resumed_loss)
    # W&B's sync would upload both folders to the one run
    for folder in folders:
        assert f"run-{info['id']}.wandb" in sync_dry_run(folder)
