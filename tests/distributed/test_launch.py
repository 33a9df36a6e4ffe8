"""The launch helper tells a failed set-up (retried once on a fresh port, and said so)
from a failure of the worker's own code (never retried)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(TEST_TIMEOUT)]


def test_a_failed_setup_is_retried_once_and_said_so(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    mark = tmp_path / "mark"
    run = torchrun("worker_setup.py", tmp_path / "out", "setup-once", str(mark))
    assert Path(f"{mark}.rank0").exists()  # the first attempt did fail in its set-up
    assert run.returncode == 0 and run.attempts == 2 and run.retried, run.output[-4000:]
    assert [r["rank"] for r in run.results("ok")] == [0, 1]
    said = capsys.readouterr().out
    assert "torchrun worker_setup.py failed in its set-up" in said and "retrying once" in said


def test_a_setup_that_fails_twice_fails_the_test(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="failed in its set-up twice"):
        torchrun("worker_setup.py", tmp_path / "out", "setup-always", str(tmp_path / "mark"))


def test_a_failure_after_the_handshake_is_never_retried(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = torchrun("worker_setup.py", tmp_path / "out", "after", str(tmp_path / "mark"))
    assert run.returncode != 0 and run.attempts == 1 and not run.retried
    assert (tmp_path / "out" / "started.rank0").exists() and (tmp_path / "out" / "started.rank1").exists()
    assert not (tmp_path / "out" / "ok.rank0.json").exists()
    assert "retrying" not in capsys.readouterr().out
