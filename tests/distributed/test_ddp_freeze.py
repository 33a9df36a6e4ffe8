"""The freezing plugins under DDP (two CPU processes under torchrun): the README's
Freeze and GradualUnfreeze usage trains, the ranks end bit-identical, and they match
one process trained on the global batches. One launch of ``worker_freeze.py``."""

from __future__ import annotations

import pytest
from _launch import TEST_TIMEOUT, Launch, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(TEST_TIMEOUT)]

pytest.importorskip("hookloop_freeze")

SCENARIOS = ["freeze", "freeze_by_step", "gradual", "pre_frozen", "growth"]


@pytest.fixture(scope="module")
def freeze_run(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    run = torchrun("worker_freeze.py", tmp_path_factory.mktemp("freeze"))
    assert run.returncode == 0, run.output[-8000:]
    return run


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ranks_agree_and_match_one_process_on_the_global_batch(freeze_run: Launch, scenario: str) -> None:
    r0, r1 = freeze_run.results(scenario)
    assert r0["params"] == r1["params"] and r0["same_on_ranks"]  # bit-identical ranks
    assert r0["max_diff"] < 1e-5, r0["max_diff"]  # the same training as one process
    assert r0["moved"] > 1e-3  # it trained
    assert r0["backbone_trainable"] and r0["wrapped"] == "DistributedDataParallel"
    assert r0["lrs"] == r1["lrs"]


def test_unfrozen_groups_get_their_learning_rates(freeze_run: Launch) -> None:
    assert freeze_run.result("freeze", 0)["lrs"] == pytest.approx([0.1, 0.01])
    assert freeze_run.result("gradual", 0)["lrs"] == pytest.approx([0.1, 0.05, 0.025])
    # 0.01 at epoch 1, doubled at epochs 2 and 3, capped by the head's 0.1
    assert freeze_run.result("growth", 0)["lrs"] == pytest.approx([0.1, 0.04])
