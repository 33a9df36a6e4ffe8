"""Scale settings under torchrun (two CPU processes, gloo): the process-group timeout
``Loop(dist_timeout=...)`` and the refusal of ``ZeroRedundancyOptimizer``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _launch import TEST_TIMEOUT, torchrun

from hookloop import Loop


@pytest.mark.parametrize("bad", [0, -1, -0.5, timedelta(0), timedelta(seconds=-3), float("nan"),
                                 float("inf"), "5", True])
def test_dist_timeout_must_be_a_positive_duration(bad: object) -> None:
    net = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="dist_timeout"):
        Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), autoload=False,
             dist_timeout=bad)  # type: ignore[arg-type]


def test_dist_timeout_without_a_process_group_is_accepted() -> None:
    net = torch.nn.Linear(2, 1)
    for ok in (5, 0.5, timedelta(minutes=2)):
        Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), autoload=False,
             dist_timeout=ok).close()


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT)
def test_the_process_group_the_loop_creates_has_the_given_timeout(tmp_path: Path) -> None:
    run = torchrun("worker_scale.py", tmp_path, "owned")
    assert run.returncode == 0, run.output[-8000:]
    for r in run.results("owned"):
        assert r == {"world": 2, "timeout_s": 7.0, "step": 2}


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT)
def test_a_user_group_refuses_dist_timeout_and_zero_is_refused(tmp_path: Path) -> None:
    run = torchrun("worker_scale.py", tmp_path, "given")
    assert run.returncode == 0, run.output[-8000:]
    for r in run.results("given"):
        kind, msg = r["timeout_error"]
        assert kind == "ValueError"
        assert "init_process_group(timeout=" in msg
        kind, msg = r["zero_error"]
        assert kind == "NotImplementedError"
        assert "ZeroRedundancyOptimizer" in msg and "AdamW" in msg
        assert r["group_up"]
        assert r["default_timeout_s"] != 5.0  # the refused timeout was not applied
