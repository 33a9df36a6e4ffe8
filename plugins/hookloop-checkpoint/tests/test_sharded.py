"""Sharded checkpoints (directories written through torch.distributed.checkpoint) seen
from one process: clean-up of incomplete ones, and loads that cannot work. Saving and
resuming a sharded model runs under torchrun in tests/distributed/test_fsdp.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hookloop_checkpoint import Checkpoint, CheckpointError, is_sharded_checkpoint, load, load_checkpoint
from hookloop_checkpoint._io import _TMP_RE
from hookloop_checkpoint._sharded import tmp_name

from hookloop import ResumeError
from hookloop.testing import run_plugin, tiny_loop


def _fake_sharded(path: Path) -> Path:
    """A directory shaped like a sharded checkpoint (its shards are never read here)."""
    path.mkdir()
    (path / ".metadata").write_bytes(b"index")
    (path / "__0_0.distcp").write_bytes(b"shard")
    torch.save({"format": "hookloop.loop/2", "sharded": True, "loop": {"global_step": 3},
                "checkpoint": {"format": "hookloop.checkpoint/1", "version": 1, "name": path.name}},
               path / "loop.pt")
    return path


def test_the_temporary_name_of_a_sharded_save_is_one_the_clean_up_knows() -> None:
    name = tmp_name("step4", 3)
    assert _TMP_RE.match(name) and name == tmp_name("step4", 3) != tmp_name("step4", 4)


def test_incomplete_sharded_directories_are_removed_at_the_next_start(tmp_path: Path, caplog) -> None:
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1)
    unfinished = tmp_path / tmp_name("e5", 7)  # a save killed before every rank wrote
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"half")
    unlisted = _fake_sharded(tmp_path / "e6")  # renamed into place, killed before the listing
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "loop.pt").write_bytes(b"not a checkpoint directory")
    caplog.set_level(logging.WARNING, logger="hookloop.checkpoint")
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1)
    names = set(os.listdir(tmp_path))
    assert unfinished.name not in names and unlisted.name not in names
    assert "notes" in names  # not shaped like a sharded checkpoint: not ours to delete
    assert any("e6" in r.getMessage() and "not listed" in r.getMessage() for r in caplog.records)


def test_a_sharded_checkpoint_loads_only_into_a_loop(tmp_path: Path) -> None:
    path = _fake_sharded(tmp_path / "step3")
    assert is_sharded_checkpoint(path) and not is_sharded_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"load_checkpoint\(path, loop=loop\)"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="dcp_to_torch_save"):
        load(path, torch.nn.Linear(2, 2))


def test_a_sharded_checkpoint_into_a_model_that_is_not_sharded_says_so(tmp_path: Path) -> None:
    path = _fake_sharded(tmp_path / "step3")
    loop = tiny_loop([])
    assert not loop.sharded
    with pytest.raises(ResumeError, match="model is not sharded"):
        load_checkpoint(path, loop=loop)
    state = loop.state_dict()
    assert state["sharded"] is False
    with pytest.raises(ResumeError, match="holds sharded model and optimizer state"):
        loop.load_state_dict({**state, "sharded": True})
