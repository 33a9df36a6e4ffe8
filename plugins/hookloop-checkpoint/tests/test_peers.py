"""Behaviours of the checkpoint callbacks of Lightning (ModelCheckpoint), Ignite
(Checkpoint / ModelCheckpoint) and Keras (ModelCheckpoint), checked on hookloop's
``Checkpoint``. Each test cites the peer test it carries over; where hookloop differs on
purpose the test checks hookloop's behaviour and says so (see the README section
"Differences from Lightning, Ignite and Keras" and PEER_TESTS.md).

Peers: Lightning-AI/pytorch-lightning, tests/tests_pytorch/checkpointing/ and
tests/tests_pytorch/callbacks/test_model_checkpoint_*.py; pytorch/ignite,
tests/ignite/handlers/test_checkpoint.py; keras-team/keras,
keras/src/callbacks/model_checkpoint_test.py.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from ckpt_testlib import manifest, scripted
from hookloop_checkpoint import (
    Checkpoint,
    MonitorNotFoundError,
    load,
    load_checkpoint,
    render_filename,
)

from hookloop.plugins import hookimpl
from hookloop.testing import HookRecorder, run_plugin, tiny_loop, tiny_model

STEPS = 8  # optimizer steps per epoch of tiny_loop


def names(d: Path) -> set[str]:
    return {e["name"] for e in manifest(d)["checkpoints"]}


def pt_files(d: Path) -> set[str]:
    return {p.name for p in d.glob("*.pt")}


class Raise:
    """Raise in ``on_train_batch_end`` at a global step (another plugin failing)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_batch_end(self, loop) -> None:
        if loop.state.global_step == self.step:
            raise RuntimeError("a plugin failed")


# ====================================================================== Lightning


# Lightning: test_model_checkpoint.py::test_model_checkpoint_score_and_ckpt
def test_lightning_score_and_epoch_in_name_and_checkpoint_after_scheduler_step(tmp_path: Path) -> None:
    values = [0.3, 0.1, 0.2]
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=2.0)
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=-1, filename="{val/score:.4f}-{epoch}")
    loop = tiny_loop([ckpt], model=model, optimizer=opt, scheduler=sched, val_step_fn=scripted(values))
    loop.fit(max_epochs=3)
    assert pt_files(tmp_path) == {f"{v:.4f}-{e}.pt" for e, v in enumerate(values)}
    for epoch, value in enumerate(values):
        ck = load_checkpoint(tmp_path / f"{value:.4f}-{epoch}.pt")
        assert ck["loop"]["epoch"] == epoch and ck["loop"]["global_step"] == STEPS * (epoch + 1)
        assert ck["checkpoint"]["score"] == value
        assert ck["schedulers"][0]["last_epoch"] == epoch + 1  # saved after the epoch's step
        assert ck["schedulers"][0]["_last_lr"][0] == pytest.approx(0.1 * 2.0 ** (epoch + 1))


# Lightning: test_model_checkpoint.py::test_none_monitor_not_alternating
def test_lightning_fixed_name_without_monitor_does_not_alternate(tmp_path: Path) -> None:
    seen = []

    class ListDir:
        @hookimpl
        def on_train_epoch_start(self, loop, epoch) -> None:
            if epoch > 0:
                seen.append(sorted(pt_files(tmp_path)))

    run_plugin(Checkpoint(tmp_path, top_k=1, filename="model"), max_epochs=4, plugins=[ListDir()])
    assert seen == [["model.pt"]] * 3


# Lightning: test_model_checkpoint.py::test_ckpt_version_after_rerun_new_trainer
def test_lightning_rerun_in_the_same_folder_gets_versions(tmp_path: Path) -> None:
    for _ in range(2):
        run_plugin(Checkpoint(tmp_path, top_k=-1, filename="{epoch}"), max_epochs=2)
    assert pt_files(tmp_path) == {"0.pt", "1.pt", "0-v1.pt", "1-v1.pt"}
    assert names(tmp_path) == {"0-v1", "1-v1"}  # the manifest lists the run that wrote it last


# Lightning: test_model_checkpoint.py::test_ckpt_version_after_rerun_same_trainer
def test_lightning_second_fit_on_the_same_loop_versions_a_fixed_name(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, filename="test")
    loop = tiny_loop([ckpt])
    loop.fit(max_epochs=2)
    loop.fit(max_epochs=4)
    assert pt_files(tmp_path) == {"test.pt", "test-v1.pt", "test-v2.pt", "test-v3.pt"}


# Lightning: test_model_checkpoint.py::test_ckpt_version_counter_disabled_after_rerun_new_trainer
def test_lightning_version_counter_disabled_overwrites_on_rerun(tmp_path: Path) -> None:
    for _ in range(2):
        run_plugin(Checkpoint(tmp_path, top_k=-1, filename="{epoch}", enable_version_counter=False),
                   max_epochs=2)
    assert pt_files(tmp_path) == {"0.pt", "1.pt"}


# Lightning: test_model_checkpoint.py::test_model_checkpoint_topk_zero
def test_lightning_top_k_zero_keeps_only_the_last(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=0, save_last=True, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=2)
    assert pt_files(tmp_path) == {"e1.pt"}
    assert ckpt.best_path is None and ckpt.best_score is None
    assert ckpt.last_path == tmp_path / "e1.pt"


# Lightning: test_model_checkpoint.py::test_model_checkpoint_topk_all
def test_lightning_top_k_all_keeps_every_checkpoint_and_the_best(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode="max", top_k=-1, filename="{epoch}")
    run_plugin(ckpt, max_epochs=3, val_step_fn=scripted([0.0, 1.0, 2.0]))
    assert pt_files(tmp_path) == {"0.pt", "1.pt", "2.pt"}
    assert ckpt.best_path == tmp_path / "2.pt" and ckpt.best_score == 2.0


# Lightning: test_model_checkpoint.py::test_checkpointing_with_nan_as_first (differs on
# purpose: Lightning ranks NaN as the worst value and writes it while top-k has room;
# hookloop never ranks NaN, so with save_last=False the NaN epoch is not written)
@pytest.mark.parametrize(("mode", "values", "best"), [("min", [math.nan, 8, 7, 5], 5),
                                                       ("max", [math.nan, 5, 7, 8], 8)])
def test_lightning_nan_first_then_the_best_wins(tmp_path: Path, mode: str, values: list, best) -> None:
    rec = HookRecorder(["on_checkpoint_saved"])
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode=mode, top_k=1, save_last=False,
                      filename="e{epoch}")
    run_plugin(ckpt, max_epochs=4, val_step_fn=scripted(values), plugins=[rec])
    assert ckpt.best_score == best
    assert len(rec.calls) == 3  # every finite improvement; not the NaN epoch
    assert pt_files(tmp_path) == {"e3.pt"}


# Lightning: test_model_checkpoint.py::test_current_score_when_nan (differs on purpose:
# Lightning reports inf/-inf as the best score; hookloop has no best)
@pytest.mark.parametrize("mode", ["min", "max"])
def test_lightning_nan_monitor_has_no_best(tmp_path: Path, mode: str) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode=mode, top_k=1, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=1, val_step_fn=scripted([math.nan]))
    assert ckpt.best_score is None and ckpt.best_path is None
    assert manifest(tmp_path)["best"] is None
    assert pt_files(tmp_path) == {"e0.pt"}  # kept as the newest (save_last=True)


# Lightning: test_model_checkpoint.py::test_model_checkpoint_save_last_checkpoint_contents
def test_lightning_last_holds_the_latest_state_best_an_earlier_one(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=1, filename="e{epoch}", last_name="last")
    loop, _ = run_plugin(ckpt, max_epochs=3, val_step_fn=scripted([1.0, 2.0, 3.0]))
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["loop"]["global_step"] == loop.state.global_step == 3 * STEPS
    for k, v in loop.module.state_dict().items():
        assert torch.equal(last["model"][k], v)
    best = load_checkpoint(tmp_path, which="best")
    assert best["loop"]["global_step"] == STEPS and best["checkpoint"]["score"] == 1.0


# Lightning: test_model_checkpoint.py::test_save_last_only_when_checkpoint_saved
def test_lightning_last_alias_moves_only_when_a_checkpoint_is_written(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=1, save_last=False, last_name="last",
                      filename="best-{epoch}")
    run_plugin(ckpt, max_epochs=4, val_step_fn=scripted([1.0, 0.5, 2.0, 3.0]))
    assert pt_files(tmp_path) == {"best-1.pt", "last.pt"}
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best-1.pt")


# Lightning: test_model_checkpoint.py::test_model_checkpoint_link_checkpoint
def test_lightning_last_alias_is_replaced_at_each_save(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, last_name="last", filename="e{epoch}")
    run_plugin(ckpt, max_epochs=3)
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "e2.pt")
    assert not os.path.islink(tmp_path / "last.pt")  # a hard link: outlives its target
    os.unlink(tmp_path / "e2.pt")
    assert load_checkpoint(tmp_path / "last.pt")["loop"]["epoch"] == 2


# Lightning: test_model_checkpoint_additional_cases.py::test_model_checkpoint_save_last_link_symlink_bug
def test_lightning_last_alias_with_top_k_all_is_never_a_checkpoint_of_its_own(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, last_name="last", filename="e{epoch}")
    run_plugin(ckpt, max_epochs=2)
    run_plugin(Checkpoint(tmp_path, top_k=-1, last_name="last", filename="e{epoch}",
                          resume="latest"), max_epochs=3)
    assert "last" not in names(tmp_path)
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "e2.pt")


# Lightning: test_model_checkpoint.py::test_model_checkpoint_every_n_epochs
@pytest.mark.parametrize(("every", "expected"), [(1, {"0", "1", "2", "3"}), (2, {"1", "3"}),
                                                 (3, {"2", "4"})])
def test_lightning_every_n_epochs(tmp_path: Path, every: int, expected: set) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, every_n_epochs=every, save_last=False, filename="{epoch}")
    run_plugin(ckpt, max_epochs=4)
    # every=3 saves epoch 2; nothing at the end (save_last=False); "4" would be the final state
    assert {p[:-3] for p in pt_files(tmp_path)} == expected - {"4"}


# Lightning: test_model_checkpoint.py::test_save_last_every_n_epochs_interaction
def test_lightning_save_last_saves_the_final_state_whatever_every_n_epochs(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, every_n_epochs=3, save_last=True, filename="{epoch}-{step}")
    run_plugin(ckpt, max_epochs=2)
    assert pt_files(tmp_path) == {f"2-{2 * STEPS}.pt"}  # the start of epoch 2: the final state


# Lightning: test_model_checkpoint.py::test_ckpt_every_n_train_steps
def test_lightning_every_n_steps(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, every_n_epochs=None, every_n_steps=3, save_last=False,
                      filename="s{step}")
    run_plugin(ckpt, max_epochs=2)
    assert pt_files(tmp_path) == {f"s{n}.pt" for n in range(3, 2 * STEPS + 1, 3)}


# Lightning: test_model_checkpoint.py::test_invalid_top_k, test_invalid_every_n_epochs,
# test_invalid_every_n_train_steps
@pytest.mark.parametrize("kwargs", [{"top_k": -2}, {"every_n_epochs": -3}, {"every_n_steps": -1},
                                    {"top_k": 1.5}, {"every_seconds": 0}])
def test_lightning_invalid_frequencies_and_top_k(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Checkpoint("unused", **kwargs)
    for ok in ({"every_n_epochs": 0}, {"every_n_epochs": 2}, {"every_n_steps": 0}):
        Checkpoint("unused", **ok)


# Lightning: test_model_checkpoint.py::test_model_checkpoint_mode_options
def test_lightning_mode_options() -> None:
    with pytest.raises(ValueError, match="'unknown_option'"):
        Checkpoint("unused", mode="unknown_option")


# Lightning: test_model_checkpoint.py::test_model_checkpoint_format_checkpoint_name
def test_lightning_format_checkpoint_name() -> None:
    ns = {"epoch": 3, "step": 2, "val/loss": 0.03, "acc": 0.12345}
    assert render_filename("{epoch}-{step}", ns) == "3-2"
    assert render_filename("{epoch:03d}-{acc:.2f}", ns) == "003-0.12"
    assert render_filename("e={epoch}_{val_loss:.2f}", ns) == "e=3_0.03"
    assert render_filename("{val/loss:.1e}", ns) == "3.0e-02"
    assert render_filename("{acc:.2f}", {"acc": -0.12345}) == "-0.12"


# Lightning: test_model_checkpoint.py::test_model_checkpoint_on_exception_parametrized
def test_lightning_save_on_exception_in_the_step(tmp_path: Path) -> None:
    def step(loop, batch):
        if loop.state.global_step == 5:
            raise RuntimeError("the model failed")
        x, y = batch
        return torch.nn.functional.cross_entropy(loop.model(x), y)

    ckpt = Checkpoint(tmp_path, save_on_exception=True, every_n_epochs=None, filename="s{step}")
    loop = tiny_loop([ckpt], step_fn=step)
    with pytest.raises(RuntimeError, match="the model failed"):
        loop.fit(max_epochs=1)
    assert pt_files(tmp_path) == {"s5.pt"}
    assert load_checkpoint(tmp_path)["loop"]["global_step"] == 5


# Lightning: test_model_checkpoint.py::test_model_checkpoint_on_exception_in_other_callbacks
def test_lightning_save_on_exception_in_another_plugin(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, save_on_exception=True, every_n_epochs=None, filename="s{step}")
    with pytest.raises(RuntimeError, match="a plugin failed"):
        tiny_loop([ckpt, Raise(3)]).fit(max_epochs=1)
    assert manifest(tmp_path)["checkpoints"][0]["reason"] == "exception"


# Lightning: test_model_checkpoint.py::test_model_checkpoint_on_exception_run_condition_on_train_batch_start
def test_lightning_no_exception_save_when_this_state_is_saved(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, save_on_exception=True, every_n_epochs=None, every_n_steps=4,
                      top_k=-1, filename="s{step}")
    with pytest.raises(RuntimeError):
        tiny_loop([Raise(4), ckpt]).fit(max_epochs=1)  # Raise runs first: step 4 not saved yet
    assert pt_files(tmp_path) == {"s4.pt"}
    ckpt2 = Checkpoint(tmp_path / "b", save_on_exception=True, every_n_epochs=None, every_n_steps=4,
                       top_k=-1, filename="s{step}")

    class Late(Raise):
        @hookimpl(trylast=True)
        def on_train_batch_end(self, loop) -> None:
            super().on_train_batch_end(loop)

    with pytest.raises(RuntimeError):
        tiny_loop([ckpt2, Late(4)]).fit(max_epochs=1)
    assert pt_files(tmp_path / "b") == {"s4.pt"}  # saved once, not again on the exception


# Lightning: test_model_checkpoint_step_interval_val_metric.py::
# test_model_checkpoint_every_n_train_steps_with_val_metric_saves_after_val
def test_lightning_step_save_with_a_val_monitor_waits_for_validation(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", every_n_epochs=None, every_n_steps=STEPS,
                      top_k=-1, filename="s{step}")
    run_plugin(ckpt, max_epochs=2, val_step_fn=scripted([2.0, 1.0]))
    entries = {e["name"]: e["score"] for e in manifest(tmp_path)["checkpoints"]}
    assert entries == {"s8": 2.0, "s16": 1.0}  # each ranked by its own epoch's validation


# Lightning: test_model_checkpoint_additional_cases.py::
# test_model_checkpoint_every_n_train_steps_with_train_metric_saves_at_step
def test_lightning_step_save_with_a_train_monitor_saves_at_the_step(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="train/loss", every_n_epochs=None, every_n_steps=4,
                      top_k=-1, save_last=False, filename="s{step}")
    run_plugin(ckpt, max_epochs=1, log_every_n_steps=4)
    scored = {e["name"] for e in manifest(tmp_path)["checkpoints"] if e["score"] is not None}
    assert scored == {"s4", "s8"}


# Lightning: test_model_checkpoint_additional_cases.py::
# test_model_checkpoint_defer_until_next_validation_when_val_every_2_epochs
def test_lightning_unscored_step_saves_without_validation_are_not_ranked(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", every_n_epochs=None, every_n_steps=STEPS,
                      top_k=1, save_last=False, filename="s{step}")
    run_plugin(ckpt, max_epochs=4, val_step_fn=scripted([9.0, 2.0, 9.0, 1.0]), val_every_n_epochs=2)
    assert ckpt.best_score == 1.0
    assert all(e["score"] is not None for e in manifest(tmp_path)["checkpoints"])


# Lightning: test_model_checkpoint.py::test_checkpoint_repeated_strategy
def test_lightning_fitting_again_without_training_writes_nothing(tmp_path: Path) -> None:
    rec = HookRecorder(["on_checkpoint_saved"])
    loop = tiny_loop([Checkpoint(tmp_path, filename="{epoch}-{step}"), rec])
    loop.fit(max_epochs=1)
    loop.fit(max_epochs=1)
    loop.fit(max_epochs=1)
    assert len(rec.calls) == 1 and pt_files(tmp_path) == {f"0-{STEPS}.pt"}


# Lightning: test_model_checkpoint.py::test_resume_training_preserves_old_ckpt_last
def test_lightning_resume_into_a_new_folder_leaves_the_old_one(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path / "a", filename="e{epoch}", last_name="last"), max_epochs=1)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    loop = tiny_loop([Checkpoint(tmp_path / "b", filename="e{epoch}", last_name="last")])
    loop.fit(max_epochs=2, resume=load_checkpoint(tmp_path / "a" / "last.pt"))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before
    assert pt_files(tmp_path / "b") == {"e1.pt", "last.pt"}


# Lightning: test_model_checkpoint.py::test_resume_and_old_checkpoint_files_remain (differs
# on purpose: a resume in the same folder continues the run and its top-k, so the
# checkpoint resumed from may rotate out; in another folder nothing of the old one is touched)
def test_lightning_resume_in_the_same_folder_continues_the_top_k(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="step", mode="max", top_k=2, every_n_epochs=None,
                      every_n_steps=2, save_last=False, filename="s{step}")

    class LogStep:
        """Log the global step as a metric, reduced at once (a fresh value at every save)."""

        @hookimpl(tryfirst=True)
        def on_train_batch_end(self, loop) -> None:
            loop.log("step", float(loop.state.global_step))
            loop.metrics.reduce_now()

    run_plugin(ckpt, max_steps=5, plugins=[LogStep()])
    assert pt_files(tmp_path) == {"s2.pt", "s4.pt"}
    again = Checkpoint(tmp_path, monitor="step", mode="max", top_k=2, every_n_epochs=None,
                       every_n_steps=2, save_last=False, filename="s{step}")
    loop = tiny_loop([LogStep(), again])
    loop.fit(max_steps=8, resume=load_checkpoint(tmp_path / "s4.pt"))
    assert pt_files(tmp_path) == {"s6.pt", "s8.pt"}


# Lightning: test_model_checkpoint.py::test_train_epoch_end_ckpt_with_no_validation
def test_lightning_epoch_end_save_without_validation(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="train/loss_epoch", top_k=-1, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=2, val_data=None)
    assert names(tmp_path) == {"e0", "e1"}
    assert all(e["score"] is not None for e in manifest(tmp_path)["checkpoints"])


# Lightning: test_model_checkpoint.py::test_default_checkpoint_behavior
def test_lightning_default_keeps_one_newest_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path)
    loop, _ = run_plugin(ckpt, max_epochs=3)
    (entry,) = manifest(tmp_path)["checkpoints"]
    assert entry["epoch"] == 2 and entry["step"] == loop.state.global_step
    assert ckpt.best_path is None


# Lightning: test_model_checkpoint.py::test_none_monitor_top_k (differs on purpose:
# Lightning refuses top_k > 1 without a monitor; hookloop keeps the newest top_k)
def test_lightning_no_monitor_keeps_the_newest_k(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, top_k=2, filename="e{epoch}"), max_epochs=4)
    assert pt_files(tmp_path) == {"e2.pt", "e3.pt"}


# Lightning: test_checkpoint_callback_frequency.py::test_top_k
@pytest.mark.parametrize(("k", "epochs", "expected"), [(1, 1, 1), (2, 2, 2), (2, 5, 2), (-1, 3, 3)])
def test_lightning_top_k_count(tmp_path: Path, k: int, epochs: int, expected: int) -> None:
    values = [5.0, 3.0, 4.0, 1.0, 2.0]
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=k, save_last=False, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=epochs, val_step_fn=scripted(values))
    assert len(pt_files(tmp_path)) == expected


# ====================================================================== Ignite


# Ignite: test_checkpoint.py::test_best_k
def test_ignite_best_k(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode="max", top_k=2, save_last=False,
                      filename="model_{val/score}")
    run_plugin(ckpt, max_epochs=5, val_step_fn=scripted([3.1, 1.2, 4.5, 2.0, 0.5]))
    assert pt_files(tmp_path) == {"model_3.1.pt", "model_4.5.pt"}


# Ignite: test_checkpoint.py::test_last_k
def test_ignite_last_k(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, top_k=2, filename="model_{epoch}"), max_epochs=5)
    assert pt_files(tmp_path) == {"model_3.pt", "model_4.pt"}


# Ignite: test_checkpoint.py::test_removes_each_score_at_most_once
def test_ignite_equal_scores_are_removed_once(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode="max", top_k=2, save_last=False,
                      filename="e{epoch}")
    run_plugin(ckpt, max_epochs=5, val_step_fn=scripted([0, 1, 1, 2, 3]))
    assert pt_files(tmp_path) == {"e3.pt", "e4.pt"}


# Ignite: test_checkpoint.py::test_greater_or_equal (differs on purpose: hookloop has no
# greater_or_equal; a tie keeps the older checkpoint, Ignite's default)
def test_ignite_a_tie_keeps_the_older_checkpoint(tmp_path: Path) -> None:
    rec = HookRecorder(["on_checkpoint_saved"])
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode="max", top_k=1, save_last=False,
                      filename="model_{epoch}")
    run_plugin(ckpt, max_epochs=4, val_step_fn=scripted([1, 2, 2, 2]), plugins=[rec])
    assert [Path(c.kwargs["path"]).name for c in rec.calls] == ["model_0.pt", "model_1.pt"]


# Ignite: test_checkpoint.py::test_checkpoint_with_int_score and test_best_k_with_suffix
def test_ignite_integer_and_negative_scores_in_the_name(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", mode="max", top_k=-1, filename="m_{val/score}")
    run_plugin(ckpt, max_epochs=2, val_step_fn=scripted([1, -0.76]))
    assert pt_files(tmp_path) == {"m_1.0.pt", "m_-0.76.pt"}  # metrics are floats


# Ignite: test_checkpoint.py::test_checkpoint_fixed_filename
def test_ignite_fixed_filename(tmp_path: Path) -> None:
    rec = HookRecorder(["on_checkpoint_saved"])
    ckpt = Checkpoint(tmp_path, filename="model", top_k=3, enable_version_counter=False)
    run_plugin(ckpt, max_epochs=4, plugins=[rec])
    assert len(rec.calls) == 4 and {Path(c.kwargs["path"]).name for c in rec.calls} == {"model.pt"}
    assert pt_files(tmp_path) == {"model.pt"} and names(tmp_path) == {"model"}


# Ignite: test_checkpoint.py::test_checkpoint_on_exception
def test_ignite_save_on_exception(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, save_on_exception=True, every_n_epochs=None, filename="model_{step}")
    with pytest.raises(RuntimeError):
        tiny_loop([ckpt, Raise(1)]).fit(max_epochs=1)
    assert pt_files(tmp_path) == {"model_1.pt"}


# Ignite: test_checkpoint.py::test_model_checkpoint_simple_recovery_from_existing_non_empty
def test_ignite_non_empty_folder_is_fine_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("test")
    ckpt = Checkpoint(tmp_path, filename="model_{epoch}")
    loop, _ = run_plugin(ckpt, max_epochs=1)
    assert (tmp_path / "notes.txt").read_text() == "test"
    model = tiny_model(9)
    load(tmp_path, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loop.module.state_dict()[k])


# Ignite: test_checkpoint.py::test_disk_saver_atomic
def test_ignite_saved_files_are_readable_and_a_failed_write_leaves_none(tmp_path: Path) -> None:
    run_plugin(Checkpoint(tmp_path, filename="ok"), max_epochs=1)
    mode = stat.filemode((tmp_path / "ok.pt").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    if not umask & 0o044:
        assert [mode[1], mode[4], mode[7]] == ["r", "r", "r"], mode

    class Unpicklable:
        def state_dict(self):
            return {"f": lambda x: x}

        def load_state_dict(self, state):
            pass

    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises
        run_plugin(Checkpoint(tmp_path / "bad", filename="bad"), max_epochs=1, plugins=[Unpicklable()])
    assert not list((tmp_path / "bad").glob("*bad*"))


# Ignite: test_checkpoint.py::test_load_checkpoint_with_different_num_classes
def test_ignite_load_into_a_model_with_another_head(tmp_path: Path) -> None:
    loop, _ = run_plugin(Checkpoint(tmp_path), max_epochs=1)
    other = tiny_model(1, classes=5)
    res = load(tmp_path, other, skip_mismatched=True)
    assert res.skipped == ["2.bias", "2.weight"]
    assert torch.equal(other[0].weight, loop.module[0].weight)


# Ignite: test_checkpoint.py::test_checkpoint_state_dict and test_checkpoint_load_state_dict
def test_ignite_plugin_state_round_trip(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/score", top_k=2, filename="e{epoch}")
    run_plugin(ckpt, max_epochs=3, val_step_fn=scripted([3.0, 1.0, 2.0]))
    state = ckpt.state_dict()
    assert [e["name"] for e in state["entries"]] == ["e1", "e2"] and state["best"] == "e1.pt"
    fresh = Checkpoint(tmp_path, monitor="val/score", top_k=2, filename="e{epoch}")
    fresh.load_state_dict(state)
    assert fresh.best_score == 1.0 and fresh.best_path == tmp_path / "e1.pt"


# Ignite: test_checkpoint.py::test_checkpoint_saved_event and test_checkpoint_last_checkpoint
def test_ignite_saved_event_and_last_checkpoint(tmp_path: Path) -> None:
    rec = HookRecorder(["on_checkpoint_saved"])
    ckpt = Checkpoint(tmp_path, filename="model_{epoch}", top_k=-1)
    run_plugin(ckpt, max_epochs=3, plugins=[rec])
    assert [Path(c.kwargs["path"]).name for c in rec.calls] == ["model_0.pt", "model_1.pt", "model_2.pt"]
    assert ckpt.last_path == tmp_path / "model_2.pt"


# ====================================================================== Keras


# Keras: model_checkpoint_test.py::test_model_checkpoint_options (directory created;
# save_best_only; monitor val_loss/val_acc in min/max modes)
@pytest.mark.parametrize(("monitor", "mode"), [("val/loss", "min"), ("val/acc", "max")])
def test_keras_save_best_only_creates_the_folder(tmp_path: Path, monitor: str, mode: str) -> None:
    d = tmp_path / "subdir" / "deeper"
    ckpt = Checkpoint(d, monitor=monitor, mode=mode, top_k=1, save_last=False, filename="checkpoint")
    run_plugin(ckpt, max_epochs=1)
    assert (d / "checkpoint.pt").exists()


# Keras: model_checkpoint_test.py::test_model_checkpoint_options, case 5 (differs on
# purpose: Keras warns and saves nothing for a missing monitor; hookloop raises at the
# first epoch end, naming the logged metrics)
def test_keras_unknown_monitor_raises(tmp_path: Path) -> None:
    with pytest.raises(MonitorNotFoundError, match="unknown"):
        run_plugin(Checkpoint(tmp_path, monitor="unknown", top_k=1, save_last=False), max_epochs=1)
    assert not list(tmp_path.glob("*.pt"))


# Keras: model_checkpoint_test.py::test_model_checkpoint_options, case 6 (differs on
# purpose: an unknown mode is an error, not a warning and a fallback to "auto")
def test_keras_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="'unknown'"):
        Checkpoint("unused", mode="unknown")


# Keras: model_checkpoint_test.py::test_model_checkpoint_options, cases 8a/8b and 10a/10b
# (an integer save_freq, with weights only; the batch in the file name)
@pytest.mark.parametrize("weights_only", [False, True])
def test_keras_integer_save_frequency(tmp_path: Path, weights_only: bool) -> None:
    ckpt = Checkpoint(tmp_path, every_n_epochs=None, every_n_steps=12, top_k=-1, save_last=False,
                      weights_only=weights_only, filename="checkpoint.epoch{epoch:02d}.step{step}")
    run_plugin(ckpt, max_epochs=5)
    assert pt_files(tmp_path) == {"checkpoint.epoch01.step12.pt", "checkpoint.epoch02.step24.pt",
                                  "checkpoint.epoch04.step36.pt"}
    if weights_only:
        assert set(torch.load(tmp_path / "checkpoint.epoch01.step12.pt", weights_only=True)) == {
            "model", "checkpoint"}


# Keras: model_checkpoint_test.py::test_model_checkpoint_options, case 9
@pytest.mark.parametrize("freq", ["invalid_save_freq", 1.5, -1])
def test_keras_invalid_save_frequency(freq) -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        Checkpoint("unused", every_n_steps=freq)


# Keras: model_checkpoint_test.py::test_model_checkpoint_loading
@pytest.mark.parametrize("weights_only", [False, True])
def test_keras_saved_weights_reproduce_the_model(tmp_path: Path, weights_only: bool,
                                                 caplog) -> None:
    caplog.set_level(logging.ERROR)
    loop, _ = run_plugin(Checkpoint(tmp_path, weights_only=weights_only, filename="c"), max_epochs=1)
    fresh = tiny_model(42)
    load(tmp_path / "c.pt", fresh)
    x = torch.randn(5, 4)
    loop.module.eval()
    torch.testing.assert_close(fresh(x), loop.module(x))
