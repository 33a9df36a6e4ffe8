"""A model sharded with FSDP2 (``fully_shard``) under torchrun with two CPU processes
(gloo), checkpointed through torch.distributed.checkpoint by the checkpoint plugin.

Three launches of ``worker_fsdp.py``: ``train`` (two ranks: sync and async sharded
saves, accumulation and clipping against one process), ``resume`` (a new two-rank job
resuming from what ``train`` saved) and ``single`` (one rank: the two-rank checkpoint on
another world size, and the errors of checkpoints that do not fit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, Launch, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(TEST_TIMEOUT)]

pytest.importorskip("hookloop_checkpoint")
torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch.distributed")

SHARD_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp", "loop.pt"]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def train(out: Path) -> Launch:
    run = torchrun("worker_fsdp.py", out, "train")
    assert run.returncode == 0, run.output[-8000:]
    return run


@pytest.fixture(scope="module")
def resume(train: Launch) -> Launch:
    for r in range(2):  # a new job: its own handshakes
        (train.out / f"started.rank{r}").unlink()
    run = torchrun("worker_fsdp.py", train.out, "resume")
    assert run.returncode == 0, run.output[-8000:]
    return run


@pytest.fixture(scope="module")
def single(resume: Launch) -> Launch:
    for r in range(2):
        (resume.out / f"started.rank{r}").unlink()
    run = torchrun("worker_fsdp.py", resume.out, "single", nproc=1)
    assert run.returncode == 0, run.output[-8000:]
    return run


def _full(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"full_{name}.pt", weights_only=True)


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_model_is_used_as_is_and_every_rank_writes_its_shards(train: Launch) -> None:
    r0, r1 = train.results("sync")
    assert r0["sharded"] and r0["same_object"] and r1["sharded"]
    assert r0["global_step"] == r1["global_step"] == 9
    assert r0["listing"] == r1["listing"] == {
        "checkpoints.json": "file", "step4": SHARD_FILES, "step8": SHARD_FILES, "step9": SHARD_FILES}
    # announced on every rank, for the same checkpoints: the directories
    assert [[s, Path(p).name] for s, p in r0["saved"]] == [[4, "step4"], [8, "step8"], [9, "step9"]]
    assert r0["saved"] == r1["saved"]
    manifest = json.loads((train.out / "ckpt_sync" / "checkpoints.json").read_text())
    entry = manifest["checkpoints"][0]
    assert entry["sharded"] and entry["primary"] == "step4" and manifest["last"] == "step9"
    assert sorted(entry["files"]) == [f"step4/{f}" for f in SHARD_FILES]
    for fname, info in entry["files"].items():
        assert (train.out / "ckpt_sync" / fname).stat().st_size == info["size"]


def test_accumulation_and_clipping_of_sharded_gradients_match_one_process(train: Launch) -> None:
    r0, r1 = train.results("match")
    for kind, steps, windows in (("sized", 6, 4), ("iterable", 4, 6)):
        for r in (r0, r1):
            assert r[kind]["steps"] == r[kind]["ref_steps"] == steps
            # gradient sync off for each non-stepping micro-batch, on again after it
            assert r[kind]["sync_calls"] == [False, True] * windows
        # with data of unknown length, the unfinished window of each epoch is dropped,
        # also the unsynchronised gradients FSDP2 holds (they would leak otherwise)
        assert r0[kind]["max_diff"] < 1e-5, kind


def test_an_async_sharded_save_trains_the_same_and_keeps_the_newest_directory(train: Launch) -> None:
    assert _bit_equal(_full(train.out, "async_end"), _full(train.out, "end"))
    r0, r1 = train.results("async")
    # top_k=1: the step-4 directory was deleted once step 8 was listed
    assert r0["listing"] == {"checkpoints.json": "file", "step8": SHARD_FILES}
    # each save is announced once every rank's write is done: at the next save, at fit end
    assert [[s, Path(p).name] for s, p in r0["saved"]] == [[8, "step4"], [9, "step8"]]
    assert r0["saved"] == r1["saved"]


def test_resume_in_a_new_job_from_a_sharded_checkpoint_is_bit_exact(resume: Launch) -> None:
    for r in resume.results("resume_sync"):
        assert r["global_step"] == 9
        assert [[s, Path(p).name] for s, p in r["saved"]] == [[8, "step8"], [9, "step9"]]
    # resumed at step 4 (mid-epoch, per-rank dropout RNG and shuffling): the same
    # parameters, bit for bit, as the uninterrupted run
    assert _bit_equal(_full(resume.out, "resumed"), _full(resume.out, "end"))


def test_resume_latest_finds_the_newest_async_sharded_checkpoint(resume: Launch) -> None:
    for r in resume.results("resume_async"):
        assert r["resumed_at"] == [8] and r["global_step"] == 9
    assert _bit_equal(_full(resume.out, "async_resumed"), _full(resume.out, "end"))


def test_ranks_that_find_different_sharded_checkpoints_all_raise_before_loading(resume: Launch) -> None:
    r0, r1 = resume.results("resume_disagreement")
    for r in (r0, r1):
        assert r["error"] is not None and r["error"].startswith("ResumeDisagreementError"), r
        assert "step9" in r["error"] and "a fresh start" in r["error"]


def test_a_two_rank_checkpoint_loads_on_one_rank(single: Launch) -> None:
    r = single.result("single", 0)
    assert r["equal"] and r["resumed_step"] == 4
    assert r["global_step"] > 4  # and trains on
    # saved on a world of one (one shard file), each save replacing the directory of the
    # same name (enable_version_counter=False), nothing left under a temporary name
    assert r["listing"] == {"checkpoints.json": "file", "fixed": [".metadata", "__0_0.distcp", "loop.pt"]}
    assert len(r["saved"]) >= 2 and {Path(p).name for _, p in r["saved"]} == {"fixed"}
    manifest = json.loads((single.out / "ckpt_world1" / "checkpoints.json").read_text())
    assert [e["name"] for e in manifest["checkpoints"]] == ["fixed"]


@pytest.mark.parametrize("case, words", [
    ("no_loop", ["is a sharded checkpoint", "load_checkpoint(path, loop=loop)"]),
    ("sharded_into_plain", ["ResumeError", "holds sharded model", "model is not sharded", "fully_shard"]),
    ("plain_into_sharded", ["ResumeError", "full (unsharded)", "model is sharded"]),
    ("safetensors", ["ValueError", "format='safetensors'", "not supported", "fully_shard"]),
    ("other_optimizer", ["ResumeError", "nothing was restored", "the checkpoint holds a AdamW",
                         "the loop has a SGD"]),
])
def test_checkpoints_that_do_not_fit_say_what_is_wrong(single: Launch, case: str, words: list[str]) -> None:
    r = single.result("single", 0)
    message = r["errors"][case]
    assert message is not None, case
    for word in words:
        assert word in message, (word, message)


def test_a_refused_sharded_load_changes_nothing(single: Launch) -> None:
    assert single.result("single", 0)["untouched"]
