"""A mid-epoch checkpoint resumed on another world size and batch size continues the
epoch at the saved sample: every sample of the epoch is trained exactly once over the
two runs (40 samples: no DistributedSampler padding), under real torchrun jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(2 * TEST_TIMEOUT)]


def launch(tmp_path: Path, name: str, mode: str, nproc: int, batch: int) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    run = torchrun("worker_position.py", out, mode, str(batch), str(tmp_path / "mid.pt"), nproc=nproc)
    assert run.returncode == 0, run.output[-8000:]
    return run.results(mode, world=nproc)


@pytest.mark.parametrize(("saved", "resumed"), [((2, 4), (1, 4)), ((1, 8), (2, 6))])
def test_a_resume_on_another_world_or_batch_size_trains_each_sample_once(
        tmp_path: Path, saved: tuple[int, int], resumed: tuple[int, int]) -> None:
    first = launch(tmp_path, "save", "save", *saved)
    done = [i for r in first for i in r["before_save"]]
    assert len(done) == 2 * saved[0] * saved[1]  # two steps of every rank's batch
    second = launch(tmp_path, "resume", "resume", *resumed)
    assert all(r["error"] is None for r in second), second
    pos = second[0]["position"]
    assert pos["samples"] == len(done) and pos["world_size"] == saved[0]
    assert pos["sampler"]["replicas"] == saved[0]
    rest = [i for r in second for i in r["ids"]]
    assert sorted(done + rest) == list(range(40))
