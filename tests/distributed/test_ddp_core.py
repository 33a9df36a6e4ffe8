"""DDP under torchrun with two CPU processes (gloo): one launch of ``worker_core.py``
runs every scenario; each test checks one of them."""

from __future__ import annotations

import pytest
from _launch import TEST_TIMEOUT, Launch, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(TEST_TIMEOUT)]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    run = torchrun("worker_core.py", tmp_path_factory.mktemp("core"))
    assert run.returncode == 0, run.output[-8000:]
    return run


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * (1 + abs(y)) for x, y in zip(a, b))


def test_hooks_see_rank_world_size_and_the_wrapped_model(core: Launch) -> None:
    r0, r1 = core.results("match")
    assert r0["seen"] == {"rank": 0, "world_size": 2, "is_global_zero": True,
                          "model": "DistributedDataParallel", "module": "Sequential"}
    assert r1["seen"] == {**r0["seen"], "rank": 1, "is_global_zero": False}
    assert r0["ref_seen"] == {"rank": 0, "world_size": 1, "is_global_zero": True,
                              "model": "Sequential", "module": "Sequential"}


def test_training_matches_a_single_process_run_on_the_global_batch(core: Launch) -> None:
    for r in core.results("match"):
        assert r["same_params"]
        assert r["final_step"] == 12
        assert _close(r["params"], r["ref_params"])


def test_logged_metrics_are_reduced_once_and_identical_on_every_rank(core: Launch) -> None:
    r0, r1 = core.results("match")
    assert r0["logs"] == r1["logs"]  # bit-identical on both ranks
    # one emission per log interval (every 2 steps), per epoch end, per validation
    steps = [s for s, _ in r0["logs"]]
    assert steps == [2, 4, 6, 6, 6, 8, 10, 12, 12, 12]
    # the mean over ranks, weighted by how often each rank logged (rank 0 logs 0 once,
    # rank 1 logs 1 twice per batch)
    ranks = [m["test/rank"] for _, m in r0["logs"] if "test/rank" in m]
    assert ranks and all(v == pytest.approx(2 / 3) for v in ranks)
    # the loss over the global batch, as the single process computed it
    ref = r0["ref_logs"]
    got = [[s, {k: v for k, v in m.items() if not k.startswith("test/")}] for s, m in r0["logs"]]
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (_, g), (_, w) in zip(got, ref):
        assert sorted(g) == sorted(w)
        assert _close([g[k] for k in sorted(g)], [w[k] for k in sorted(w)])


def test_a_ddp_model_passed_in_is_used_as_is_and_saved_without_its_prefix(core: Launch) -> None:
    for r in core.results("accepts_ddp"):
        assert r["same_wrapper"] and r["inner"]
        assert r["keys"] == r["ref_keys"] and not any(k.startswith("module.") for k in r["keys"])
        assert _close(r["params"], r["ref_params"])


def test_grad_accumulation_skips_the_allreduce_on_non_stepping_micro_batches(core: Launch) -> None:
    for r in core.results("accum"):
        # 5 micro-batches per epoch with grad_accum=2: steps after 2, 4 and 5 → 3 per epoch
        assert r["steps"] == r["ref_steps"] == 6
        # one gradient all-reduce per optimizer step (one bucket): no_sync on the others
        assert r["grad_allreduces"] == 6
        assert r["same_params"]
        assert _close(r["params"], r["ref_params"])


@pytest.mark.parametrize("case, step, reason", [
    ("mid_interval_r1", 8, ("stop requested on another rank", "asked on rank 1")),
    ("mid_interval_r0", 8, ("asked on rank 0", "stop requested on another rank")),
    ("after_last_interval_r1", 10, ("stop requested on another rank", "asked on rank 1")),
])
def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(
        core: Launch, case: str, step: int, reason: tuple[str, str]) -> None:
    r0, r1 = (r[case] for r in core.results("stop"))
    # requested at step 5/6 (log interval 4): agreed at step 8; at step 9: at epoch end
    for r, why in zip((r0, r1), reason):
        assert r["global_step"] == step
        assert r["epoch"] == 0
        assert r["should_stop"] is True
        assert r["stop_reason"] == why
        assert r["same_params"]
    assert r0["epoch_ends"] == r1["epoch_ends"] == [[0, step, step, True]]
    assert r0["logs"] == r1["logs"]
    assert any("val/loss" in m for _, m in r0["logs"])  # the last epoch validated on both


def test_stop_epoch_on_one_rank_ends_the_epoch_on_every_rank(core: Launch) -> None:
    r0, r1 = (r["stop_epoch_r1"] for r in core.results("stop"))
    # asked at step 3 of epoch 0: both ranks leave epoch 0 at the step-4 interval
    assert r0["epoch_ends"] == r1["epoch_ends"] == [[0, 4, 4, False], [1, 14, 10, False],
                                                    [2, 24, 10, False]]
    assert r0["stop_reason"] == r1["stop_reason"] == "max_epochs"
    assert r0["same_params"] and r1["same_params"]


def test_distributed_sampler_gets_set_epoch_and_ranks_see_disjoint_shards(core: Launch) -> None:
    r0, r1 = core.results("resume")
    assert r0["sampler_epoch"] == r1["sampler_epoch"] == 2
    per_epoch: dict[int, list[list[int]]] = {}
    for r in (r0, r1):
        for epoch, idx in r["batches"]:
            per_epoch.setdefault(epoch, []).append(idx)
    orders = []
    for epoch in (0, 1, 2):
        seen = [i for batch in per_epoch[epoch] for i in batch]
        assert sorted(seen) == list(range(40))  # the two shards cover the data once
        orders.append([i for _, b in r0["batches"] if _ == epoch for i in b])
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_resume_restores_every_rank_identically_with_its_own_rng(core: Launch, where: str) -> None:
    r0, r1 = (r[where] for r in core.results("resume"))
    for rank, r in enumerate((r0, r1)):
        assert r["rng_entries"] == 2
        assert r["rng_differs_between_ranks"]
        assert r["rng_restored"], f"rank {rank} did not get its own RNG state back"
        assert r["bit_exact"], f"rank {rank}: max diff {r['max_diff']}"
        assert r["same_params"]
        assert r["global_step"] == r["full_step"] == 15
        # the metrics after the resume point, pending per-rank values included
        assert r["logs_after"] == r["ref_logs_after"] and r["logs_after"]
        n = len(r["batches_after"])
        assert r["batches_after"] == r["ref_batches"][-n:]
    assert r0["step0"] == (7 if where == "mid_epoch" else 5)


@pytest.mark.parametrize("how", ["with", "atexit"])
def test_a_process_group_the_loop_created_is_destroyed_by_close(tmp_path, how: str) -> None:
    """Loop.close (the end of a with block) destroys a group the loop made itself; a loop
    left open is closed by the exit handler, so the process exits cleanly."""
    run = torchrun("worker_owned.py", tmp_path, how)
    assert run.returncode == 0, run.output[-8000:]
    for rank in (0, 1):
        assert (tmp_path / f"closed.rank{rank}").read_text() == "group up in on_close: True\n"
    if how == "with":
        for r in run.results("owned"):
            assert r == {"world": 2, "inside": True, "after": False, "closed": True}
