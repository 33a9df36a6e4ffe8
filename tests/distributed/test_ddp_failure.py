"""A failure on one rank ends every rank: no process keeps training alone, nothing hangs
(the launch helper fails the test if torchrun has not returned within its timeout)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(TEST_TIMEOUT)]


@pytest.mark.parametrize("mode", ["exception", "sigterm"])
def test_a_failure_on_rank_1_ends_both_processes(tmp_path: Path, mode: str) -> None:
    run = torchrun("worker_fail.py", tmp_path, mode)
    assert run.returncode != 0
    # both ranks were training when rank 1 failed at step 5 ...
    assert (tmp_path / "training.rank0.json").exists() and (tmp_path / "training.rank1.json").exists()
    # ... and neither finished its (very long) fit
    assert not list(tmp_path.glob("finished.*")), run.output[-4000:]
    if mode == "exception":
        assert "injected failure on rank 1 at step 5" in run.output
    else:
        assert "SIGTERM" in run.output
