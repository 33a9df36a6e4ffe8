"""Regression tests for defects users of Lightning, Ignite and Keras ran into: each
fails on the plugin as it was before its fix."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_testlib import manifest, scripted
from hookloop_checkpoint import (
    Checkpoint,
    MonitorNotFoundError,
    UnsafeCheckpointError,
    load_checkpoint,
    render_filename,
    sanitize_name,
)

from hookloop.testing import HookRecorder, run_plugin, tiny_loop


def files(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in d.iterdir()}


# ---------------------------------------------------------------- resume of a finished run


@pytest.mark.parametrize("template", ["{epoch:02d}", "e{epoch}-{step}"])
def test_resuming_a_finished_run_writes_nothing(tmp_path: Path, template: str) -> None:
    run_plugin(Checkpoint(tmp_path, filename=template), max_epochs=2)
    before_files, before = files(tmp_path), manifest(tmp_path)
    for _ in range(3):  # reruns used to alternate 01 / 01-v1
        rec = HookRecorder(["on_checkpoint_saved", "on_checkpoint_removed"])
        loop = tiny_loop([Checkpoint(tmp_path, filename=template, resume="latest"), rec])
        loop.fit(max_epochs=2)
        assert loop.state.global_step == 16
        assert rec.calls == []
        assert files(tmp_path) == before_files
        assert manifest(tmp_path)["last"] == before["last"]
        assert manifest(tmp_path)["checkpoints"] == before["checkpoints"]


def test_resuming_then_training_on_saves_the_new_epochs(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}", top_k=-1), max_epochs=1)
    loop = tiny_loop([Checkpoint(tmp_path, filename="e{epoch}", top_k=-1, resume="latest")])
    loop.fit(max_epochs=3)
    assert sorted(e["name"] for e in manifest(tmp_path)["checkpoints"]) == ["e0", "e1", "e2"]


# ---------------------------------------------------------------- names and scores


def test_a_negative_score_keeps_its_sign_in_the_name(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=-1, filename="{val/score:.4f}")
    run_plugin(ckpt, max_epochs=2, val_step_fn=scripted([-0.5, 0.5]))
    assert {e["primary"] for e in manifest(tmp_path)["checkpoints"]} == {"-0.5000.pt", "0.5000.pt"}
    assert sanitize_name("-0.5") == "-0.5"
    assert render_filename("{x:.2f}", {"x": -1.0}) == "-1.00"


@pytest.mark.parametrize(("mode", "values", "best"), [
    ("max", [1.0, math.inf, 2.0], 2.0),
    ("min", [1.0, -math.inf, 0.5], 0.5),
    ("max", [math.inf, -math.inf, math.nan], None),
])
def test_only_finite_values_become_best(tmp_path: Path, mode: str, values: list, best) -> None:
    rec = HookRecorder(["on_checkpoint_saved"])
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode=mode, top_k=1, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=3, val_step_fn=scripted(values), plugins=[rec])
    assert ckpt.best_score == best
    assert (manifest(tmp_path)["best"] is None) == (best is None)
    flags = [c.kwargs["is_best"] for c in rec.calls]
    assert flags[1] is False  # the infinite value is never announced as best


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("template", ["{0}", "{}", "c-{}", "{epoch.real}", "{step[0]}",
                                      "{val/loss[0]}", "{val/loss:{width}}", "{epoch", "epoch}"])
def test_malformed_templates_fail_at_construction(template: str) -> None:
    with pytest.raises(ValueError) as info:
        Checkpoint("unused", filename=template)
    assert repr(template) in str(info.value)


def test_a_dotted_metric_name_is_a_name(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, filename="{val.score:.1f}")
    run_plugin(ckpt, max_epochs=1, val_step_fn=scripted([0.25], name="val.score"))
    assert manifest(tmp_path)["last"] == "0.2.pt"


def test_a_template_metric_never_logged_fails_at_the_first_save(tmp_path: Path) -> None:
    with pytest.raises(MonitorNotFoundError) as info:
        run_plugin(Checkpoint(tmp_path, filename="{epoch}-{val/lss:.3f}"), max_epochs=2)
    text = str(info.value)
    assert "'{epoch}-{val/lss:.3f}'" in text and "val/lss" in text and "did you mean 'val/loss'" in text
    for name in ("val/loss", "val/acc", "train/loss_epoch"):
        assert name in text
    assert not list(tmp_path.glob("*.pt"))


def test_a_step_save_before_the_first_validation_renders_na(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, every_n_steps=3, top_k=-1, filename="s{step}-{val/loss:.2f}")
    run_plugin(ckpt, max_epochs=1)
    names = {e["name"] for e in manifest(tmp_path)["checkpoints"]}
    assert {"s3-na", "s6-na"} <= names


# ---------------------------------------------------------------- leftovers of a kill


KILL_BETWEEN_LISTING_AND_DELETING = """
import os, sys
import hookloop_checkpoint._plugin as plugin_mod
from hookloop_checkpoint import Checkpoint
from hookloop.testing import run_plugin

real = os.unlink

def unlink(path, *a, **k):
    if str(path).endswith(".pt"):
        os._exit(9)  # killed after the new checkpoint was listed, before the deletion
    return real(path, *a, **k)

class Shim:
    def __getattr__(self, name):
        return getattr(os, name)

shim = Shim()
shim.unlink = unlink
plugin_mod.os = shim
run_plugin(Checkpoint(sys.argv[1], filename="e{epoch}"), max_epochs=2)
"""


def test_a_replaced_checkpoint_left_by_a_kill_is_deleted_at_the_next_start(tmp_path: Path,
                                                                           caplog) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_LISTING_AND_DELETING, str(tmp_path)],
                          timeout=120, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert {"e0.pt", "e1.pt"} <= set(os.listdir(tmp_path))  # e0 replaced, still there
    assert [e["name"] for e in manifest(tmp_path)["checkpoints"]] == ["e1"]
    caplog.set_level(logging.WARNING, logger="hookloop.checkpoint")
    loop = tiny_loop([Checkpoint(tmp_path, filename="e{epoch}", resume="latest")])
    loop.fit(max_epochs=2)
    assert "e0.pt" not in os.listdir(tmp_path)
    assert any("e0.pt" in r.getMessage() and "deleted" in r.getMessage() for r in caplog.records)


def test_an_unlisted_checkpoint_file_is_reported(tmp_path: Path, caplog) -> None:
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1)
    (tmp_path / "e7.pt").write_bytes(b"x" * 1000)  # e.g. written, then killed before listing
    caplog.set_level(logging.WARNING, logger="hookloop.checkpoint")
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1)
    assert (tmp_path / "e7.pt").exists()  # not ours to prove: reported, kept
    assert any("e7.pt" in r.getMessage() and "does not list" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- never finite, save_last=False


def test_save_last_false_with_a_never_finite_monitor_warns(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="hookloop.checkpoint")
    ckpt = Checkpoint(tmp_path, monitor="val/score", save_last=False, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=3, val_step_fn=scripted([math.nan] * 3))
    assert not list(tmp_path.glob("*.pt"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not saved at step 8" in w and "'val/score'" in w for w in warnings)
    assert any("saved no checkpoint" in w and "3 save(s)" in w for w in warnings)


# ---------------------------------------------------------------- weights_file escape


@pytest.mark.parametrize("weights", ["../../etc/passwd", "/etc/passwd", "..", "sub/w.safetensors",
                                     ".hidden"])
def test_a_weights_file_outside_the_folder_is_refused(tmp_path: Path, weights: str,
                                                      monkeypatch) -> None:
    run_plugin(Checkpoint(tmp_path, format="safetensors", filename="c"), max_epochs=1)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["checkpoint"]["weights_file"] = weights
    torch.save(state, tmp_path / "evil.pt")
    opened = []
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda p, **k: opened.append(p))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert repr(weights) in str(info.value) and opened == []


# ---------------------------------------------------------------- a deletion error


def test_a_failed_deletion_does_not_undo_a_listed_save(tmp_path: Path, monkeypatch, caplog) -> None:
    import hookloop_checkpoint._plugin as plugin_mod

    real = os.unlink

    def unlink(path, *a, **k):
        if str(path).endswith("e0.pt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(plugin_mod, "os", type("os_shim", (), {
        "__getattr__": lambda self, n: getattr(os, n), "unlink": staticmethod(unlink)})())
    ckpt = Checkpoint(tmp_path, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=2)
    assert [e["name"] for e in manifest(tmp_path)["checkpoints"]] == ["e1"]
    assert ckpt.last_path == tmp_path / "e1.pt"
    monkeypatch.undo()
    run_plugin(Checkpoint(tmp_path, filename="x{epoch}"), max_epochs=1)
    assert not (tmp_path / "e0.pt").exists()  # deleted at the next start
