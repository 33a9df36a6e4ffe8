"""The MLflow tracker under DDP (two CPU processes under torchrun): rank 0 SIGKILLed
past its last checkpoint, the job resumed by a new launch."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(2 * TEST_TIMEOUT)]

for dist in ("hookloop_checkpoint", "hookloop_mlflow"):
    pytest.importorskip(dist)


@pytest.mark.slow  # two launches of two workers that start MLflow (about 60 s)
def test_a_killed_ddp_job_resumed_continues_the_mlflow_run_with_one_point_per_step(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    crashed = torchrun("worker_trackers.py", tmp_path, "crash", uri, experiment)
    assert crashed.returncode != 0, crashed.output[-4000:]
    assert not list(tmp_path.glob("crash.rank*.json"))  # neither rank finished
    resumed = torchrun("worker_trackers.py", tmp_path, "resume", uri, experiment)
    assert resumed.returncode == 0, resumed.output[-8000:]
    r0, r1 = resumed.results("resume")
    assert r0["logs"] == r1["logs"]  # reduced metrics, the same on both ranks
    assert "dropped none" in r0["report"] and "failed none" in r0["report"], r0["report"]

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == r0["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["hookloop.world_size"] == "2"
    resumed_loss = {step: m["train/loss"] for step, m in r0["logs"] if "train/loss" in m}
    assert sorted(resumed_loss) == [10, 12]  # from the checkpoint of step 8
    points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    # one point per step: the killed job's step 10 (logged after its last checkpoint)
    # was held, and the resumed job's values are the ones recorded at 10 and 12
    assert [s for s, _ in points] == [2, 4, 6, 8, 10, 12], points
    assert {s: v for s, v in points if s >= 10} == pytest.approx(resumed_loss)
