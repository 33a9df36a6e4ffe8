"""Policy: when checkpoints are written, which are kept, how they are named and
announced, and what they contain."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from ckpt_testlib import manifest, scripted
from hookloop_checkpoint import (
    MANIFEST_NAME,
    Checkpoint,
    MonitorNotFoundError,
    UnsafeCheckpointError,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load,
    load_checkpoint,
    render_filename,
    sanitize_name,
)

from hookloop.testing import HookRecorder, run_plugin, tiny_loop


def kept_scores(d: Path) -> list[float]:
    return sorted(e["score"] for e in manifest(d)["checkpoints"] if e["score"] is not None)


def final_files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.name != MANIFEST_NAME}


@pytest.mark.parametrize(
    ("mode", "values", "k", "expected"),
    [
        ("min", [5.0, 3.0, 4.0, 1.0, 2.0, 6.0], 3, [1.0, 2.0, 3.0]),
        ("max", [5.0, 3.0, 4.0, 1.0, 2.0, 6.0], 2, [5.0, 6.0]),
        # NaN is never best and never kept by rank
        ("min", [math.nan, 2.0, math.nan, 1.0, math.nan], 2, [1.0, 2.0]),
        ("max", [math.nan, math.nan, 0.5], 1, [0.5]),
    ],
)
def test_top_k_keeps_exactly_the_k_best(tmp_path: Path, mode: str, values: list, k: int,
                                        expected: list) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode=mode, top_k=k, save_last=False,
                      filename="e{epoch}")
    run_plugin(ckpt, max_epochs=len(values), val_step_fn=scripted(values))
    assert kept_scores(tmp_path) == expected
    files = {e["primary"] for e in manifest(tmp_path)["checkpoints"]}
    assert final_files(tmp_path) == files and len(files) == k
    best = min(expected) if mode == "min" else max(expected)
    assert ckpt.best_score == best
    assert load_checkpoint(tmp_path, which="best")["checkpoint"]["score"] == best


def test_ties_keep_the_older_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=2, save_last=False, filename="e{epoch}")
    rec = HookRecorder(["on_checkpoint_saved"])
    run_plugin(ckpt, max_epochs=5, val_step_fn=scripted([1.0, 1.0, 1.0, 0.5, 1.0]), plugins=[rec])
    kept = sorted(e["name"] for e in manifest(tmp_path)["checkpoints"])
    assert kept == ["e0", "e3"]
    # e1 fills the second slot, e2 ties both and is not written, e3 displaces e1;
    # a tie is not "best", only strict improvements are
    assert [Path(c.kwargs["path"]).name for c in rec.calls] == ["e0.pt", "e1.pt", "e3.pt"]
    assert [c.kwargs["is_best"] for c in rec.calls] == [True, False, True]


def test_last_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=1, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=4, val_step_fn=scripted([1.0, 2.0, 3.0, 4.0]))
    m = manifest(tmp_path)
    assert m["last"] == "e3.pt" and m["best"] == "e0.pt"
    assert final_files(tmp_path) == {"e0.pt", "e3.pt"}  # best + last, older ones deleted
    assert latest_checkpoint(tmp_path) == tmp_path / "e3.pt"
    assert best_checkpoint(tmp_path) == tmp_path / "e0.pt"
    assert ckpt.last_path == tmp_path / "e3.pt"
    assert load_checkpoint(tmp_path)["loop"]["epoch"] == 3
    assert [e["name"] for e in list_checkpoints(tmp_path)] == ["e3", "e0"]


def test_no_monitor_keeps_newest_and_saves_final_state(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, every_n_epochs=2, filename="{epoch}-{step}")
    loop, rec = run_plugin(ckpt, max_epochs=3)
    # epoch 1 (every 2nd) and the final state at fit end (the start of epoch 3); top_k=1
    # keeps only the newest
    assert [Path(c.kwargs["path"]).name for c in rec.of("on_checkpoint_saved")] == ["1-16.pt", "3-24.pt"]
    assert final_files(tmp_path) == {"3-24.pt"}
    assert load_checkpoint(tmp_path)["loop"]["global_step"] == loop.state.global_step
    # no duplicate when the final state was already saved at the last epoch end
    ckpt2 = Checkpoint(tmp_path / "b", filename="{epoch}")
    _, rec2 = run_plugin(ckpt2, max_epochs=2)
    assert len(rec2.of("on_checkpoint_saved")) == 2


def test_epoch_end_checkpoint_is_not_stale(tmp_path: Path) -> None:
    opt_model = tiny_loop().module
    opt = torch.optim.SGD(opt_model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    ckpt = Checkpoint(tmp_path, monitor="val/loss", top_k=-1, filename="e{epoch}")
    loop = tiny_loop([ckpt], model=opt_model, optimizer=opt, scheduler=sched)
    loop.fit(max_epochs=2)
    first = load_checkpoint(tmp_path / "e0.pt")
    assert first["loop"]["epoch"] == 0 and first["loop"]["epoch_done"]
    assert first["schedulers"][0]["last_epoch"] == 1  # this epoch's scheduler step is in it
    assert first["checkpoint"]["metrics"]["val/loss"] == first["checkpoint"]["score"]
    assert "train/loss_epoch" in first["checkpoint"]["metrics"]


def test_mid_epoch_saves_are_not_ranked_by_a_stale_score(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/loss", top_k=-1, every_n_steps=3, filename="s{step}")
    run_plugin(ckpt, max_epochs=2)
    entries = manifest(tmp_path)["checkpoints"]
    ranked = {e["name"]: e["score"] for e in entries if e["score"] is not None}
    assert set(ranked) == {"s8", "s16"}  # the epoch ends, right after validation


def test_unknown_monitor_lists_available_metrics(tmp_path: Path) -> None:
    with pytest.raises(MonitorNotFoundError) as info:
        run_plugin(Checkpoint(tmp_path, monitor="val/los"), max_epochs=2)
    text = str(info.value)
    assert "'val/los'" in text and "did you mean 'val/loss'" in text
    for name in ("val/loss", "val/acc", "train/loss_epoch"):
        assert name in text


@pytest.mark.parametrize("template", ["../../escape-{epoch}", "/abs/path/{epoch}", "{val/loss:.3f}/x",
                                      "..", "a/../../{step}", "~/{epoch}"])
def test_filenames_never_leave_dirpath(tmp_path: Path, template: str) -> None:
    d = tmp_path / "inner"
    run_plugin(Checkpoint(d, filename=template), max_epochs=1)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parent == d for p in written), written
    assert all(not p.name.startswith(".") for p in written)


def test_render_filename() -> None:
    ns = {"epoch": 3, "step": 120, "val/loss": 0.123456, "val/acc": math.nan}
    assert render_filename("{epoch:03d}-{step}-{val/loss:.4f}", ns) == "003-120-0.1235"
    assert render_filename("{val_loss:.2f}-{val/acc:.2f}-{missing}", ns) == "0.12-nan-na"
    assert sanitize_name("../../etc/passwd") == "etc_passwd"
    assert "/" not in sanitize_name("/abs/x") and not sanitize_name("..").startswith(".")
    with pytest.raises(ValueError, match="cannot format"):
        render_filename("{epoch:.2q}", ns)
    with pytest.raises(ValueError):
        Checkpoint("x", filename="{epoch:zz}")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="mode"):
        Checkpoint("x", mode="best")
    with pytest.raises(ValueError, match="format"):
        Checkpoint("x", format="pickle")
    with pytest.raises(ValueError, match="top_k"):
        Checkpoint("x", top_k=-2)
    with pytest.raises(ValueError, match="never keep"):
        Checkpoint("x", top_k=0, save_last=False)
    with pytest.raises(ValueError, match="signal"):
        Checkpoint("x", signals=("SIGNOPE",))


def test_entry_point_and_checkpoint_content(tmp_path: Path) -> None:
    loop = tiny_loop({"checkpoint": {"dirpath": str(tmp_path), "filename": "c{epoch}"}}.items())
    loop.fit(max_epochs=1)
    ck = torch.load(tmp_path / "c0.pt", weights_only=True)
    from hookloop.resume import STATE_FORMAT

    assert ck["format"] == STATE_FORMAT
    assert {"model", "optimizers", "schedulers", "rng", "loop", "plugins", "metrics_pending"} <= set(ck)
    assert ck["checkpoint"]["format"] == "hookloop.checkpoint/1" and ck["checkpoint"]["version"] == 1
    (state,) = ck["plugins"].values()  # keyed by the plugin's state_key
    assert state["entries"][0]["name"] == "c0"
    assert "val/acc" in ck["checkpoint"]["metrics"]


def test_safetensors_format_and_save_model(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, format="safetensors", save_model=True, filename="c{epoch}")
    loop, _ = run_plugin(ckpt, max_epochs=2)
    assert final_files(tmp_path) == {"c1.pt", "c1.safetensors", "c1.model.pt"}
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "c1.safetensors")
    for k, v in loop.module.state_dict().items():
        assert torch.equal(weights[k], v)
    state = torch.load(tmp_path / "c1.pt", weights_only=True)
    assert "model" not in state and state["checkpoint"]["weights_file"] == "c1.safetensors"
    full = load_checkpoint(tmp_path)
    assert set(full["model"]) == set(loop.module.state_dict())
    entry = manifest(tmp_path)["checkpoints"][0]
    assert set(entry["files"]) == {"c1.pt", "c1.safetensors", "c1.model.pt"}
    # the whole-model pickle is written as the seed does, and refused by the safe loaders
    model = torch.load(tmp_path / "c1.model.pt", weights_only=False)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(UnsafeCheckpointError, match="save_model=True"):
        load_checkpoint(tmp_path / "c1.model.pt")
    # resume works from the safetensors pair
    loop2 = tiny_loop()
    loop2.fit(max_epochs=3, resume=full)
    assert loop2.state.global_step == 24


def test_checkpoint_saved_is_announced_with_metrics(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="hookloop.checkpoint")
    ckpt = Checkpoint(tmp_path, monitor="val/acc", mode="max", filename="e{epoch}")
    _, rec = run_plugin(ckpt, max_epochs=2)
    calls = rec.of("on_checkpoint_saved")
    assert len(calls) == 2
    for c in calls:
        assert os.path.exists(c.kwargs["path"]) or Path(c.kwargs["path"]).name == "e0.pt"
        assert "val/acc" in c.kwargs["metrics"]
    assert calls[0].kwargs["is_best"] is True
    assert any("saved" in r.message and "MB" in r.message for r in caplog.records)


def test_load_into_a_new_model(tmp_path: Path) -> None:
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
            self.head = nn.Linear(16, classes)

        def forward(self, x):
            return self.head(self.backbone(x))

    torch.manual_seed(0)
    trained = Net(3)
    loop = tiny_loop([Checkpoint(tmp_path, monitor="val/acc", mode="max")], model=trained)
    loop.fit(max_epochs=2)
    new = Net(5)
    from hookloop_checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError) as info:
        load(tmp_path, new)
    assert "head.weight: checkpoint (3, 16) vs model (5, 16)" in str(info.value)
    res = load(tmp_path, new.backbone, prefix="backbone.")
    assert res.missing == [] and res.unexpected == []
    for k, v in new.backbone.state_dict().items():
        assert torch.equal(v, trained.backbone.state_dict()[k])
    res = load(tmp_path, new, skip_mismatched=True)
    assert res.skipped == ["head.bias", "head.weight"]
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load(tmp_path, nn.Sequential(nn.Linear(4, 16)))
    # optimizer state, and plain state_dict files (as the seed writes them)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    load(tmp_path, Net(3), opt, which="latest")
    assert opt.state_dict()["state"]
    torch.save(trained.state_dict(), tmp_path / "plain.pth")
    assert load(tmp_path / "plain.pth", Net(3)).missing == []
