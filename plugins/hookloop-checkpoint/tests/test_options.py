"""Options users of Lightning, Ignite and Keras ask for: a stable name for the newest
checkpoint, saving on an exception, weights-only checkpoints, overwriting instead of
versioning, and checkpoints of ``torch.compile``d models."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ckpt_testlib import manifest, scripted
from hookloop_checkpoint import (
    MANIFEST_NAME,
    Checkpoint,
    WeightsOnlyCheckpointError,
    align_compiled_keys,
    load,
    load_checkpoint,
)

from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder, run_plugin, tiny_loop, tiny_model


class Crash:
    """Raise ``exc`` in ``on_train_batch_end`` of a given global step."""

    def __init__(self, step: int, exc: BaseException) -> None:
        self.step, self.exc = step, exc

    @hookimpl
    def on_train_batch_end(self, loop) -> None:
        if loop.state.global_step == self.step:
            raise self.exc


# ---------------------------------------------------------------- last_name


def test_last_name_always_names_the_newest_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=1, last_name="last", filename="e{epoch}")
    run_plugin(ckpt, max_epochs=3, val_step_fn=scripted([1.0, 2.0, 3.0]))
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "e0.pt", "e2.pt", "last.pt"]
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "e2.pt")
    m = manifest(tmp_path)
    assert m["last_alias"] == "last.pt" and m["last"] == "e2.pt"
    assert "last" not in {e["name"] for e in m["checkpoints"]}  # not a checkpoint of its own
    assert load_checkpoint(tmp_path / "last.pt")["loop"]["epoch"] == 2
    # a template that renders the alias name never takes it
    run_plugin(Checkpoint(tmp_path / "b", last_name="last", filename="last"), max_epochs=1)
    assert sorted(os.listdir(tmp_path / "b")) == [MANIFEST_NAME, "last-v1.pt", "last.pt"]


def test_last_name_survives_the_rotation_and_resumes(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, last_name="last", filename="e{epoch}", format="safetensors")
    run_plugin(ckpt, max_epochs=2)
    assert {"last.pt", "last.safetensors"} <= set(os.listdir(tmp_path))
    loop = tiny_loop()
    loop.fit(max_epochs=3, resume=load_checkpoint(tmp_path / "last.pt"))
    assert loop.state.global_step == 24


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "last.pt", ".last", 3])
def test_last_name_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="last_name"):
        Checkpoint("unused", last_name=bad)


# ---------------------------------------------------------------- save_on_exception


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_save_on_exception_saves_the_state_and_resumes(tmp_path: Path, exc: BaseException) -> None:
    ckpt = Checkpoint(tmp_path, filename="s{step}", save_on_exception=True, every_n_epochs=None,
                      save_last=False, top_k=1)
    loop = tiny_loop([ckpt, Crash(5, exc)])
    with pytest.raises(type(exc)):
        loop.fit(max_epochs=2)
    (entry,) = manifest(tmp_path)["checkpoints"]
    assert entry["name"] == "s5" and entry["reason"] == "exception"
    saved = load_checkpoint(tmp_path)
    assert saved["loop"]["global_step"] == 5 and saved["checkpoint"]["reason"] == "exception"
    resumed = tiny_loop()
    resumed.fit(max_epochs=2, resume=saved)
    assert resumed.state.global_step == 16


def test_save_on_exception_is_off_by_default(tmp_path: Path) -> None:
    loop = tiny_loop([Checkpoint(tmp_path, every_n_epochs=None), Crash(5, RuntimeError("boom"))])
    with pytest.raises(RuntimeError):
        loop.fit(max_epochs=2)
    assert not list(tmp_path.glob("*.pt"))


def test_save_on_exception_under_ddp_logs_instead_of_hanging(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="hookloop.checkpoint")
    ckpt = Checkpoint(tmp_path, save_on_exception=True)
    saves = []
    ckpt._save = lambda *a, **k: saves.append(a)  # a collective: must not be entered
    loop = SimpleNamespace(state=SimpleNamespace(world_size=2, rank=1))
    ckpt._save_on_exception(loop, RuntimeError("rank 1 only"))
    assert saves == []
    assert any("not saved on exception" in r.getMessage()
               and "the other ranks cannot join a collective save" in r.getMessage()
               for r in caplog.records)


def test_save_on_exception_does_not_replace_the_original_error(tmp_path: Path, caplog) -> None:
    # the template fails (a metric never logged): logged, the crash still propagates
    ckpt = Checkpoint(tmp_path, save_on_exception=True, every_n_epochs=None, filename="{nope}")
    ckpt._all_metrics_seen = True
    loop = tiny_loop([ckpt, Crash(3, ValueError("the original"))])
    with pytest.raises(ValueError, match="the original"):
        loop.fit(max_epochs=1)


# ---------------------------------------------------------------- weights_only


def test_weights_only_saves_the_model_state_only(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, weights_only=True, filename="w{epoch}")
    loop, _ = run_plugin(ckpt, max_epochs=2)
    raw = torch.load(tmp_path / "w1.pt", weights_only=True)
    assert set(raw) == {"model", "checkpoint"} and raw["checkpoint"]["weights_only"] is True
    model = tiny_model(5)
    assert load(tmp_path, model).missing == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, loop.module.state_dict()[k])
    with pytest.raises(WeightsOnlyCheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path)
    with pytest.raises(WeightsOnlyCheckpointError, match="load"):
        load_checkpoint(tmp_path / "w1.pt")
    with pytest.raises(WeightsOnlyCheckpointError, match="optimizer"):
        load(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_resume_latest_never_picks_a_weights_only_checkpoint(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, filename="full{epoch}", top_k=-1), max_epochs=1)
    full = manifest(tmp_path)["checkpoints"][0]
    # a weights-only save listed after it in the same manifest
    run_plugin(Checkpoint(tmp_path, filename="w{epoch}", top_k=-1, weights_only=True), max_epochs=2)
    m = manifest(tmp_path)
    m["checkpoints"].append(full)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    assert load_checkpoint(tmp_path)["checkpoint"]["name"] == "full0"
    loop = tiny_loop([Checkpoint(tmp_path, filename="x{epoch}", resume="latest")])
    loop.fit(max_epochs=1)
    assert loop.state.global_step == 8  # restored from full0 (epoch 0 done): nothing to train
    with pytest.raises(ValueError, match="weights_only=True with resume='latest'"):
        Checkpoint(tmp_path, weights_only=True, resume="latest")


def test_resume_latest_refuses_a_folder_of_weights_only_checkpoints(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, weights_only=True), max_epochs=1)
    with pytest.raises(WeightsOnlyCheckpointError):
        tiny_loop([Checkpoint(tmp_path, resume="latest")]).fit(max_epochs=2)


# ---------------------------------------------------------------- enable_version_counter


def test_version_counter_off_overwrites_the_file_of_that_name(tmp_path: Path) -> None:
    rec = HookRecorder(["on_checkpoint_saved", "on_checkpoint_removed"])
    ckpt = Checkpoint(tmp_path, filename="fixed", enable_version_counter=False)
    run_plugin(ckpt, max_epochs=3, plugins=[rec])
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "fixed.pt"]
    (entry,) = manifest(tmp_path)["checkpoints"]
    assert entry["epoch"] == 2 and load_checkpoint(tmp_path)["loop"]["global_step"] == 24
    assert rec.names() == ["on_checkpoint_saved"] * 3  # the path still exists: never "removed"
    # a new run overwrites too
    run_plugin(Checkpoint(tmp_path, filename="fixed", enable_version_counter=False), max_epochs=1)
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "fixed.pt"]
    assert load_checkpoint(tmp_path)["loop"]["global_step"] == 8


def test_version_counter_on_by_default(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, filename="fixed"), max_epochs=1)
    run_plugin(Checkpoint(tmp_path, filename="fixed"), max_epochs=1)
    assert {"fixed.pt", "fixed-v1.pt"} <= set(os.listdir(tmp_path))


def test_version_counter_off_keeps_the_better_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", filename="best", save_last=False,
                      enable_version_counter=False)
    run_plugin(ckpt, max_epochs=3, val_step_fn=scripted([2.0, 1.0, 3.0]))
    assert manifest(tmp_path)["checkpoints"][0]["score"] == 1.0
    assert load_checkpoint(tmp_path / "best.pt")["loop"]["epoch"] == 1


# ---------------------------------------------------------------- torch.compile


def compiled(model: torch.nn.Module, backend: str = "eager") -> torch.nn.Module:
    return torch.compile(model, backend=backend)


def test_align_compiled_keys() -> None:
    plain = tiny_model(0).state_dict()
    comp = compiled(tiny_model(0)).state_dict()
    assert list(align_compiled_keys(comp, plain.keys())) == list(plain)
    assert list(align_compiled_keys(plain, comp.keys())) == list(comp)
    # a compiled submodule
    sub = {"backbone._orig_mod.0.weight": 1, "head.weight": 2}
    assert set(align_compiled_keys({"backbone.0.weight": 1, "head.weight": 2}, sub)) == set(sub)
    other = {"x": 1}
    assert align_compiled_keys(other, plain.keys()) == other  # left for the caller to report


def test_a_compiled_models_checkpoint_loads_into_a_plain_model_and_back(tmp_path: Path) -> None:
    loop, _ = run_plugin(Checkpoint(tmp_path / "c", filename="c"), max_epochs=1,
                         model=compiled(tiny_model(0)))
    assert type(loop.module).__name__ == "OptimizedModule"
    saved = torch.load(tmp_path / "c" / "c.pt", weights_only=True)
    assert not any("_orig_mod." in k for k in saved["model"])  # the plain model's names
    plain = tiny_model(3)
    assert load(tmp_path / "c", plain).missing == []
    for k, v in plain.state_dict().items():
        assert torch.equal(v, loop.module.state_dict()["_orig_mod." + k])
    back = compiled(tiny_model(4))
    assert load(tmp_path / "c", back).unexpected == []
    # a file written with the compiled names (torch.save(compiled.state_dict()))
    torch.save(loop.module.state_dict(), tmp_path / "raw.pt")
    assert load(tmp_path / "raw.pt", tiny_model(5)).missing == []
    # plain -> compiled
    run_plugin(Checkpoint(tmp_path / "p", filename="p"), max_epochs=1)
    assert load(tmp_path / "p", compiled(tiny_model(6))).missing == []


@pytest.mark.parametrize("source_compiled", [True, False])
def test_resume_across_torch_compile_through_the_plugin(tmp_path: Path, source_compiled: bool) -> None:
    model = compiled(tiny_model(0)) if source_compiled else tiny_model(0)
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1, model=model)
    if source_compiled:  # also a checkpoint that kept the compiled names
        ck = torch.load(tmp_path / "e0.pt", weights_only=True)
        assert not any("_orig_mod." in k for k in ck["model"])
    target = tiny_model(1) if source_compiled else compiled(tiny_model(1))
    loop = tiny_loop([Checkpoint(tmp_path, filename="e{epoch}", resume="latest")], model=target)
    loop.fit(max_epochs=2)
    assert loop.state.global_step == 16


def test_resume_of_compiled_names_into_a_plain_model_through_the_plugin(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1)
    ck = torch.load(tmp_path / "e0.pt", weights_only=True)
    ck["model"] = {"_orig_mod." + k: v for k, v in ck["model"].items()}  # as loop.state_dict() has it
    torch.save(ck, tmp_path / "compiled_names.pt")
    loop = tiny_loop([Checkpoint(tmp_path / "x", resume=tmp_path / "compiled_names.pt")])
    loop.fit(max_epochs=2)
    assert loop.state.global_step == 16


def test_core_resume_of_a_plain_checkpoint_into_a_compiled_model(tmp_path: Path) -> None:
    """fit(resume=dict) bypasses the plugin: the core aligns the _orig_mod. keys."""
    run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1)
    loop = tiny_loop(model=compiled(tiny_model(1)))
    loop.fit(max_epochs=2, resume=load_checkpoint(tmp_path))
    assert loop.state.global_step == 16


@pytest.mark.slow
def test_inductor_compiled_model_round_trip(tmp_path: Path) -> None:
    """The real compiler (inductor; on the CPU it builds C++ with gcc, about a minute
    cold): train compiled, load into a plain model, resume compiled again."""
    loop, _ = run_plugin(Checkpoint(tmp_path, filename="e{epoch}"), max_epochs=1,
                         model=compiled(tiny_model(0), backend="inductor"))
    plain = tiny_model(2)
    load(tmp_path, plain)
    x = torch.randn(4, 4)
    loop.module.eval()
    plain.eval()
    torch.testing.assert_close(plain(x), loop.module(x))
    again = tiny_loop([Checkpoint(tmp_path, filename="e{epoch}", resume="latest")],
                      model=compiled(tiny_model(3), backend="inductor"))
    again.fit(max_epochs=2)
    assert again.state.global_step == 16
