"""The checkpoint, early-stopping, tensorboard and progress plugins under DDP (two CPU
processes under torchrun). One launch of ``worker_plugins.py`` serves most tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, Launch, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(TEST_TIMEOUT)]

for dist in ("hookloop_checkpoint", "hookloop_earlystopping", "hookloop_tensorboard", "hookloop_progress"):
    pytest.importorskip(dist)


@pytest.fixture(scope="module")
def plugins_run(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    run = torchrun("worker_plugins.py", tmp_path_factory.mktemp("plugins"))
    assert run.returncode == 0, run.output[-8000:]
    return run


def test_only_rank_0_writes_checkpoints_tracker_events_and_progress(plugins_run: Launch) -> None:
    out = plugins_run.out
    # every rank was given its own folders: rank 1's are never created
    assert not (out / "ckpt_rank1").exists()
    assert not (out / "tb_rank1").exists()
    assert (out / "progress_rank1.txt").read_text() == ""
    manifest = json.loads((out / "ckpt_rank0" / "checkpoints.json").read_text())
    assert manifest["checkpoints"] and all((out / "ckpt_rank0" / e["primary"]).exists()
                                           for e in manifest["checkpoints"])
    assert list((out / "tb_rank0").glob("events.out.tfevents.*"))
    assert "epoch 3/20" in (out / "progress_rank0.txt").read_text()
    r0, r1 = plugins_run.results("writes")
    assert r0["plugins"] == r1["plugins"]  # registered on both; rank-zero-only ones not called


def test_async_saves_are_announced_on_every_rank(plugins_run: Launch) -> None:
    r0, r1 = plugins_run.results("async")
    names = [Path(p).name for _, p, _ in r0["saved"]]
    assert names == [Path(p).name for _, p, _ in r1["saved"]]
    assert names and set(names) <= set(r0["files"])
    assert "6.pt" in names  # the last one too, made durable at fit end


def test_tracker_records_the_reduced_metrics(plugins_run: Launch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r0, r1 = plugins_run.results("writes")
    assert r0["logs"] == r1["logs"]
    acc = EventAccumulator(str(next((plugins_run.out / "tb_rank0").glob("events.out.tfevents.*"))))
    acc.Reload()
    want = [(s, m["val/loss"]) for s, m in r0["logs"] if "val/loss" in m]
    got = [(e.step, e.value) for e in acc.Scalars("val/loss")]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(g - w) < 1e-6 for (_, g), (_, w) in zip(got, want))


def test_every_rank_calling_the_save_path_is_safe(plugins_run: Launch) -> None:
    r0, r1 = plugins_run.results("writes")
    # Checkpoint.save called by every rank at step 3; training went on on both
    assert Path(r0["explicit"]).name == Path(r1["explicit"]).name == "0-3.pt"
    # on_checkpoint_saved fires on both ranks, for the same saves, in the same order
    assert [[s, Path(p).name, b] for s, p, b in r0["saved"]] == \
           [[s, Path(p).name, b] for s, p, b in r1["saved"]]
    assert [s for s, _, _ in r0["saved"]][:3] == [3, 4, 6]


def test_early_stopping_stops_both_ranks_at_the_same_step(plugins_run: Launch) -> None:
    r0, r1 = plugins_run.results("writes")
    for r in (r0, r1):
        assert r["global_step"] == 18 and r["epoch"] == 2
        assert r["stop_reason"].startswith("early_stopping: patience exhausted")
        assert r["same_params"]
    assert r0["epoch_ends"] == r1["epoch_ends"] == [[0, 6, 6, False], [1, 12, 6, False], [2, 18, 6, True]]


def test_resume_from_a_ddp_checkpoint_is_identical_on_both_ranks(plugins_run: Launch) -> None:
    for r in plugins_run.results("resume"):
        assert r["crash"] == "crash at step 9"
        # resumed from the step-7 checkpoint (resume="latest"): the same result, bit for
        # bit, as the uninterrupted run, with each rank's own dropout RNG stream
        assert r["bit_exact"], r["max_diff"]
        assert r["same_params"]
        assert r["global_step"] == 15
        assert [s for s, _, _ in r["saved_after_resume"]] == [14, 15]


def _assert_intact(ckpt_dir: Path, step: int) -> None:
    import torch
    from hookloop_checkpoint import load_checkpoint

    manifest = json.loads((ckpt_dir / "checkpoints.json").read_text())
    for entry in manifest["checkpoints"]:
        for name, meta in entry["files"].items():
            data = (ckpt_dir / name).read_bytes()
            assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"]
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # no half-written file
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt["loop"]["global_step"] == step
    assert len(ckpt["rng"]) == 2
    raw = torch.load(ckpt_dir / manifest["last"], weights_only=True)
    assert raw["loop"]["global_step"] == step


def test_last_complete_checkpoint_is_intact_after_an_exception_on_rank_1(tmp_path: Path) -> None:
    run = torchrun("worker_fail.py", tmp_path, "exception", "25", "ckpt")
    assert run.returncode != 0
    assert "injected failure on rank 1 at step 25" in run.output
    assert not list(tmp_path.glob("finished.*"))
    _assert_intact(tmp_path / "ckpt", 20)  # saves every 10 steps


def test_sigterm_on_rank_1_with_the_checkpoint_plugin_saves_and_stops_both_ranks(tmp_path: Path) -> None:
    run = torchrun("worker_fail.py", tmp_path, "sigterm", "25", "ckpt")
    r0, r1 = (json.loads((tmp_path / f"preempted.rank{r}.json").read_text()) for r in (0, 1))
    # received at step 25 (log interval 10), voted on at 30, acted on at 31
    assert r0["step"] == r1["step"] == 31
    assert r0["code"] == r1["code"] == 143
    assert run.returncode != 0
    _assert_intact(tmp_path / "ckpt", 31)


def test_a_signal_is_acted_on_within_agree_every_n_steps_plus_one(tmp_path: Path) -> None:
    # logging every 1000 steps: the agreement no longer waits for a log interval
    run = torchrun("worker_fail.py", tmp_path, "sigterm", "25", "ckpt", "4")
    r0, r1 = (json.loads((tmp_path / f"preempted.rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == 29, run.output[-4000:]  # voted on at 28, acted on at 29
    assert r0["reason"] == r1["reason"] == "preempted by SIGTERM"
    _assert_intact(tmp_path / "ckpt", 29)


def test_checkpoint_folders_that_differ_between_ranks_fail_on_every_rank(tmp_path: Path) -> None:
    run = torchrun("worker_folders.py", tmp_path)
    assert run.returncode == 0, run.output[-8000:]
    rank0, rank1 = run.results("folders")
    assert rank0["first"] is None and rank1["first"] is None
    assert "checkpoints.json" in rank0["files"] and rank1["files"] == []  # only rank 0 writes
    for r in (rank0, rank1):
        err = r["second"]
        assert err is not None and err.startswith("ResumeDisagreementError: the ranks do not agree")
        assert "rank 1: no checkpoint in" in err and "node1 (a fresh start)" in err
        assert "step 4" in err.split("rank 1:")[0]  # what rank 0 found: its checkpoint at step 4
        assert "storage that every node shares" in err
        err = r["third"]  # checkpoints given by hand: the loop itself compares them
        assert err is not None and err.startswith("ResumeError: the ranks were given different checkpoints")
        said0, said1 = err.split("rank 0: ")[1].split("rank 1: ")
        assert "step 4," in said0 and "step 2," in said1
