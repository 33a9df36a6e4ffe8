"""``hookloop demo`` on a reduced size: every stage runs and leaves real outcomes behind."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import hookloop_demo as demo
import pytest
from hookloop_checkpoint import list_checkpoints, load_checkpoint

TRACKERS = tuple(t for t in demo.TRACKERS
                 if importlib.util.find_spec(f"hookloop_{t}") and importlib.util.find_spec(t))


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[demo.DemoResult, demo.DemoOptions, str]:
    """One reduced demo run (``--quick``) with every installed tracker, shared by the
    tests of this module; returns the result, the options and the printed output."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("demo_runs")
    opts = demo.parse_args(["--run-dir", str(run_dir), "--quick",
                            "--trackers", ",".join(TRACKERS) or "none"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = demo.run(opts)
    return result, opts, out.getvalue()


def test_stages_ran_and_transfer_beats_scratch(ran: tuple[demo.DemoResult, demo.DemoOptions, str]) -> None:
    result, opts, _ = ran
    assert set(result.stages) == {"pretrain", "transfer", "scratch"}
    pre, tra, scr = (result.stages[k] for k in ("pretrain", "transfer", "scratch"))
    assert 1 <= pre.epochs <= opts.epochs == 5
    assert pre.test_acc > 0.9
    # the transfer run (interrupted, then resumed) and the baseline trained equally long
    assert tra.epochs == scr.epochs == opts.transfer_epochs
    assert tra.steps == scr.steps > 0
    assert tra.test_acc > scr.test_acc


def test_checkpoints_and_backbone_source(ran: tuple[demo.DemoResult, demo.DemoOptions, str]) -> None:
    result, _, _ = ran
    pre_dir = result.stages["pretrain"].checkpoint_dir
    assert pre_dir is not None and (pre_dir / "checkpoints.json").is_file()
    kept = list_checkpoints(pre_dir)
    assert 1 <= len(kept) <= 3  # best 2 by val/acc, plus the last
    for entry in kept:
        assert all((pre_dir / f).is_file() for f in entry["files"])
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    best = load_checkpoint(result.best_checkpoint)
    assert best["checkpoint"]["score"] == max(e["score"] for e in kept if e["score"] is not None)
    tra_dir = result.stages["transfer"].checkpoint_dir
    assert tra_dir is not None
    last = load_checkpoint(tra_dir)
    assert last["loop"]["global_step"] == result.stages["transfer"].steps


def test_resume_continues_at_the_interruption_step(
    ran: tuple[demo.DemoResult, demo.DemoOptions, str],
) -> None:
    result, _, out = ran
    assert result.interrupted_at is not None and result.interrupted_at > 0
    assert result.saved_at == result.interrupted_at
    assert result.resumed_at == result.interrupted_at
    assert result.resumed_batch is not None and result.resumed_batch > 0  # mid-epoch
    assert result.resumed_at < result.stages["transfer"].steps
    assert f"resumed at step {result.interrupted_at} " in out


def test_tracker_outputs_exist(ran: tuple[demo.DemoResult, demo.DemoOptions, str]) -> None:
    result, _, out = ran
    assert result.trackers == TRACKERS
    if "tensorboard" in TRACKERS:
        for stage in ("pretrain", "transfer", "scratch"):
            assert list((result.root / "tensorboard" / stage).glob("events.out.tfevents.*")), stage
        assert "tensorboard --logdir " in out
        from tensorboard.backend.event_processing import event_accumulator as ea

        acc = ea.EventAccumulator(str(result.root / "tensorboard" / "pretrain"))
        acc.Reload()
        tags = acc.Tags()
        assert "samples/validation" in tags["images"] and acc.Graph().node
        assert any(t.startswith("weights/") for t in tags["histograms"])
    if "mlflow" in TRACKERS:
        from mlflow.tracking import MlflowClient

        db = result.root / "mlflow" / "mlflow.db"
        assert db.is_file()
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        exp = client.get_experiment_by_name("hookloop-demo")
        runs = client.search_runs([exp.experiment_id])
        by_name = {r.info.run_name: r for r in runs}
        # the resumed transfer run continued the interrupted one: three runs, not four
        assert sorted(by_name) == ["pretrain", "scratch", "transfer"]
        steps = [m.step for m in client.get_metric_history(by_name["transfer"].info.run_id, "val/acc")]
        assert min(steps) < result.interrupted_at < max(steps) == result.stages["transfer"].steps
        assert "mlflow ui --backend-store-uri sqlite:///" in out
    if "wandb" in TRACKERS:
        runs = sorted((result.root / "wandb").glob("offline-run-*"))
        assert len(runs) == 4  # pretrain, transfer, its resumed part (same run id), scratch
        assert all(list(r.glob("run-*.wandb")) for r in runs)
        # the run id is in the log file's name (a folder name may carry a "-1" suffix)
        assert len({next(r.glob("run-*.wandb")).stem[len("run-"):] for r in runs}) == 3
        assert "wandb sync " in out


def test_options() -> None:
    assert demo.parse_args(["--trackers", "none"]).trackers == ()
    assert demo.parse_args(["--trackers", "mlflow,tensorboard"]).trackers == ("mlflow", "tensorboard")
    assert demo.parse_args(["--quick", "--epochs", "30"]).epochs == 5
    opts = demo.parse_args(["--run-dir", "x", "--transfer-epochs", "4", "--shots", "3"])
    assert (opts.run_dir, opts.transfer_epochs, opts.shots) == (Path("x"), 4, 3)
    with pytest.raises(SystemExit):
        demo.parse_args(["--trackers", "neptune"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--transfer-epochs", "1"])


def test_registers_the_demo_subcommand() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="hookloop.commands") if ep.name == "demo"]
    assert ep.value == "hookloop_demo:main"
    assert ep.load() is demo.main
