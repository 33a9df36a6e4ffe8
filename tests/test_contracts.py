"""The contract between the loop and its plugins: fresh and exact metrics, stable
plugin identity, per-run state, resume before fit start in two phases, teardown."""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

from hookloop import Loop, ResumeError, hookimpl
from hookloop.testing import HookRecorder, tiny_data, tiny_loop, tiny_model

es_mod = pytest.importorskip("hookloop_earlystopping")
ckpt_mod = pytest.importorskip("hookloop_checkpoint")
EarlyStopping = es_mod.EarlyStopping
Checkpoint = ckpt_mod.Checkpoint


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def step_logger(loop: Loop, batch: Any) -> torch.Tensor:
    """A step that logs the number of the optimizer step it makes."""
    loss = nn.functional.cross_entropy(loop.model(batch[0]), batch[1])
    loop.log("train/step", float(loop.state.global_step + 1))
    return loss


# ---------------------------------------------------------------------- metrics


def test_a_log_step_sees_its_own_interval_from_batch_end_on() -> None:
    seen = []

    class Look:
        def on_train_batch_end(self, loop):
            if loop.state.global_step % 2 == 0:
                stamp = loop.state.metric_stamps["train/step"]
                seen.append((loop.state.global_step, loop.state.metrics["train/step"], stamp.step,
                             stamp.stage))
            loop.log("late", float(loop.state.global_step))  # logged inside the hook

    rec = HookRecorder(["on_log"])
    loop = tiny_loop([Look(), rec], step_fn=step_logger, log_every_n_steps=2, val_data=None)
    loop.fit(max_steps=6)
    # the interval (1, 2) has mean 1.5 at step 2, not the previous interval's value
    assert seen == [(2, 1.5, 2, "train"), (4, 3.5, 4, "train"), (6, 5.5, 6, "train")]
    intervals = [(s, m) for s, m in rec.logged() if "train/step" in m]
    # values logged inside on_train_batch_end of a log step reach the same on_log
    assert [(s, m["train/step"], m["late"]) for s, m in intervals] == [
        (2, 1.5, 1.5), (4, 3.5, 3.5), (6, 5.5, 5.5)]
    times = [c.kwargs["time"] for c in rec.of("on_log")]
    assert times == sorted(times) and all(t > 1e9 for t in times)


def test_values_keep_their_exactness() -> None:
    big = 2**40 + 1

    def step(loop, batch):
        loop.log("lr", 0.1)
        loop.log("count", torch.tensor(big, dtype=torch.int64))
        loop.log("third", torch.tensor(1 / 3, dtype=torch.float64))
        loop.log("f32", torch.tensor(0.1, dtype=torch.float32))
        return nn.functional.cross_entropy(loop.model(batch[0]), batch[1])

    rec = HookRecorder(["on_log"])
    tiny_loop([rec], step_fn=step, log_every_n_steps=1, val_data=None).fit(max_steps=1)
    metrics = rec.logged()[0][1]
    assert metrics["lr"] == 0.1
    assert metrics["count"] == float(big)
    assert metrics["third"] == 1 / 3
    assert metrics["f32"] == float(torch.tensor(0.1, dtype=torch.float32))


_BIG = 2**40 + 1


@pytest.mark.parametrize(
    "values",
    [
        [torch.tensor(_BIG), torch.tensor(0.5)],  # int64 with float32: no float32 on the way
        [torch.tensor(0.5, dtype=torch.float16), torch.tensor(1 / 3, dtype=torch.float64)],
        [torch.tensor(True), torch.tensor(0.25)],
        [torch.tensor(2.0), torch.tensor([4.0]), torch.tensor([[8.0]])],  # 0-d and one-element
        [torch.tensor(_BIG), 0.5, 3],  # numbers among the tensors
        [0.5, 0.25],
        [torch.tensor(0.1)] * 3,  # the usual case
    ],
    ids=["int64+f32", "f16+f64", "bool+f32", "shapes", "numbers", "only-numbers", "same"],
)
def test_one_interval_of_mixed_values_is_reduced_exactly(values: list[Any]) -> None:
    """Whatever mix of kinds one name gets in an interval, its mean is the float64 mean
    of the values as given (no value passes through a narrower dtype)."""
    def step(loop, batch):
        for v in values:
            loop.log("m", v)
        return nn.functional.cross_entropy(loop.model(batch[0]), batch[1])

    rec = HookRecorder(["on_log"])
    tiny_loop([rec], step_fn=step, log_every_n_steps=1, val_data=None).fit(max_steps=1)
    exact = [float(v.double().reshape(())) if isinstance(v, torch.Tensor) else float(v) for v in values]
    assert rec.logged()[0][1]["m"] == math.fsum(exact) / len(exact)


def test_reduce_now_gives_fresh_values_off_the_interval() -> None:
    got = []

    class Now:
        def on_train_batch_end(self, loop):
            if loop.state.global_step == 3:
                got.append(loop.metrics.reduce_now())

    rec = HookRecorder(["on_log"])
    loop = tiny_loop([Now(), rec], step_fn=step_logger, log_every_n_steps=4, val_data=None)
    loop.fit(max_steps=4)
    assert got == [{"train/step": 2.0}]
    assert loop.state.metric_stamps["train/step"].step == 4
    # the interval's on_log holds what was left, the epoch mean holds everything
    assert rec.logged()[0] == (4, {"train/step": 4.0})
    assert rec.logged()[1][1]["train/step_epoch"] == 2.5


def test_epoch_end_values_are_stamped_with_their_stage() -> None:
    loop = tiny_loop(log_every_n_steps=3)
    loop.fit(max_epochs=1)
    stamps = loop.state.metric_stamps
    assert stamps["train/loss"].stage == "train" and stamps["train/loss"].step == 6
    assert stamps["train/loss_epoch"].stage == "train_epoch" and stamps["train/loss_epoch"].step == 8
    assert stamps["val/acc"].stage == "validate" and stamps["val/acc"].epoch == 0


def test_a_step_checkpoint_records_the_score_of_its_own_step(tmp_path) -> None:
    ck = Checkpoint(tmp_path, monitor="train/step", mode="max", every_n_steps=1, top_k=-1,
                    every_n_epochs=None, filename="s{step}", verbose=False)
    tiny_loop([ck], step_fn=step_logger, log_every_n_steps=1, val_data=None).fit(max_steps=5)
    entries = [(e["step"], e["score"]) for e in ck.state_dict()["entries"]]
    # one save per step, and the final save at fit end (step 5 closes the epoch)
    assert entries == [(s, float(s)) for s in (1, 2, 3, 4, 5, 5)]


def test_a_step_save_at_epoch_end_waits_for_that_epochs_validation(tmp_path) -> None:
    def val_step(loop, batch):
        loop.log("val/acc", float(loop.state.epoch + 1))  # epoch e scores e + 1

    ck = Checkpoint(tmp_path, monitor="val/acc", mode="max", every_n_steps=8, top_k=-1,
                    every_n_epochs=None, filename="s{step}", verbose=False)
    tiny_loop([ck], val_step_fn=val_step).fit(max_epochs=3)
    entries = [(e["step"], e["score"]) for e in ck.state_dict()["entries"]]
    assert entries == [(8, 1.0), (16, 2.0), (24, 3.0)]
    assert ck.best_score == 3.0 and ck.best_path.name == "s24.pt"


# ---------------------------------------------------------------------- identity


def test_two_plugins_of_one_class_keep_their_names_and_state(tmp_path) -> None:
    a, b = EarlyStopping("val/loss", patience=50), EarlyStopping("val/acc", mode="max", patience=50)
    loop = tiny_loop([a, b])
    assert [n for n, _ in loop.pm.plugin_items()][:2] == ["early_stopping", "early_stopping-2"]
    loop.fit(max_epochs=2)
    ckpt = roundtrip(loop.state_dict())
    assert set(ckpt["plugins"]) == {a.state_key, b.state_key}

    # listed the other way round, with a third plugin added in front: nothing swaps
    a2, b2 = EarlyStopping("val/loss", patience=50), EarlyStopping("val/acc", mode="max", patience=50)
    extra = EarlyStopping("train/loss_epoch", check_on="train_epoch", patience=50)
    loop2 = tiny_loop([extra, b2, a2], seed=1)
    loop2.load_state_dict(ckpt, strict=False)
    assert a2.best_score == a.best_score and b2.best_score == b.best_score
    assert a2.best_score != b2.best_score


def test_a_plugin_given_as_object_then_by_name_keeps_its_state(tmp_path) -> None:
    first = EarlyStopping("val/acc", mode="max", patience=50)
    loop = tiny_loop([first])
    loop.fit(max_epochs=2)
    ckpt = roundtrip(loop.state_dict())
    loop2 = tiny_loop([("early_stopping", {"monitor": "val/acc", "mode": "max", "patience": 50})])
    loop2.load_state_dict(ckpt)
    assert loop2.get_plugin("early_stopping").best_score == first.best_score


def test_a_name_the_user_gives_wins() -> None:
    loop = tiny_loop([("early_stopping", {"monitor": "val/acc", "mode": "max", "hookloop_name": "es_acc"}),
                      ("early_stopping", {"monitor": "val/loss", "hookloop_name": "es_loss"})])
    assert loop.get_plugin("es_acc").monitor == "val/acc"
    assert loop.get_plugin("es_loss").monitor == "val/loss"
    loop.fit(max_epochs=1)
    assert set(loop.state_dict()["plugins"]) == {"es_acc", "es_loss"}


def test_missing_or_unknown_required_state_names_both_sides(caplog) -> None:
    loop = tiny_loop([EarlyStopping("val/loss", patience=50)])
    loop.fit(max_epochs=1)
    ckpt = roundtrip(loop.state_dict())
    before = [p.clone() for p in tiny_model(3).parameters()]
    other = tiny_loop([EarlyStopping("val/acc", mode="max")], model=tiny_model(3))
    with pytest.raises(ResumeError) as err:
        other.load_state_dict(ckpt)
    text = str(err.value)
    assert "monitor='val/acc'" in text and "monitor='val/loss'" in text
    assert "nothing was restored" in text and "strict=False" in text
    assert all(torch.equal(a, b) for a, b in zip(before, other.module.parameters(), strict=True))
    assert other.state.global_step == 0
    with caplog.at_level(logging.WARNING, logger="hookloop"):
        other.load_state_dict(ckpt, strict=False)
    assert "monitor='val/acc'" in caplog.text and other.state.global_step == 8


def test_optional_state_only_warns(caplog) -> None:
    class Optional:
        hookloop_state_required = False

        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    loop = tiny_loop()
    loop.fit(max_epochs=1)
    ckpt = roundtrip(loop.state_dict())
    with caplog.at_level(logging.WARNING, logger="hookloop"):
        tiny_loop([Optional()]).load_state_dict(ckpt)
    assert "has no state in the checkpoint" in caplog.text


# ---------------------------------------------------------------------- per-run state


def test_a_plugin_object_starts_fresh_in_a_new_loop() -> None:
    def run(plugin):
        rec = HookRecorder(["on_log"])
        loop = tiny_loop([plugin, rec], seed=5, val_data=tiny_data(32, 8, 9))
        state = loop.fit(max_epochs=6)
        return state.global_step, plugin.state_dict(), rec.logged(), loop

    es = EarlyStopping("val/loss", patience=1, restore_best_weights=True)
    run(es)
    reused = run(es)
    fresh = run(EarlyStopping("val/loss", patience=1, restore_best_weights=True))
    assert reused[0] == fresh[0]
    assert reused[2] == fresh[2]
    for key, value in fresh[1].items():
        other = reused[1][key]
        if isinstance(value, dict):
            assert value.keys() == other.keys()
            assert all(torch.equal(value[k], other[k]) for k in value)
        else:
            assert other == value, key
    for p, q in zip(reused[3].module.parameters(), fresh[3].module.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_second_fit_on_the_same_loop_continues() -> None:
    es = EarlyStopping("val/loss", patience=50)
    loop = tiny_loop([es])
    loop.fit(max_epochs=1)
    checks = es.checks
    loop.fit(max_epochs=2)
    assert es.checks == checks + 1 and loop.state.global_step == 16


# ---------------------------------------------------------------------- resume


def test_resume_restores_before_any_fit_start_even_tryfirst(tmp_path) -> None:
    loop = tiny_loop([Checkpoint(tmp_path, verbose=False)])
    loop.fit(max_epochs=2)
    seen = []

    class Early:
        @hookimpl(tryfirst=True)
        def on_fit_start(self, loop):
            seen.append(loop.state.global_step)

    rec = HookRecorder()
    loop2 = tiny_loop([Early(), rec, Checkpoint(tmp_path, resume="latest", verbose=False)])
    loop2.fit(max_epochs=3)
    assert seen == [16]
    names = rec.names()
    assert names.index("on_resume") < names.index("on_load_checkpoint") < names.index("on_fit_start")


@pytest.mark.parametrize("change", ["optimizer class", "param groups", "architecture", "scheduler"])
def test_a_mismatched_checkpoint_changes_nothing(change: str) -> None:
    loop = tiny_loop()
    loop.fit(max_epochs=1)
    ckpt = roundtrip(loop.state_dict())
    model = tiny_model(7)
    kwargs: dict[str, Any] = {"model": model}
    if change == "optimizer class":
        kwargs["optimizer"] = torch.optim.AdamW(model.parameters())
        expected = "optimizer[0]: the checkpoint holds a SGD; the loop has a AdamW"
    elif change == "param groups":
        kwargs["optimizer"] = torch.optim.SGD([{"params": [model[0].weight, model[0].bias]},
                                               {"params": model[2].parameters()}], lr=0.1)
        expected = "parameters per group are [4] in the checkpoint and [2, 2] in the loop"
    elif change == "architecture":
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        kwargs = {"model": model}
        expected = "model: 0.weight has shape (16, 4) in the checkpoint and (8, 4) in the model"
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kwargs.update(optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))
        expected = "the checkpoint has 0 scheduler states; the loop has 1"
    other = tiny_loop(**kwargs)
    before = {k: v.clone() for k, v in other.module.state_dict().items()}
    opt_before = roundtrip(other.optimizers[0].state_dict())
    with pytest.raises(ResumeError) as err:
        other.load_state_dict(ckpt)
    assert expected in str(err.value)
    assert all(torch.equal(v, other.module.state_dict()[k]) for k, v in before.items())
    assert other.optimizers[0].state_dict()["param_groups"] == opt_before["param_groups"]
    assert other.state.global_step == 0


def test_a_format_1_checkpoint_still_resumes() -> None:
    class Counting:
        def __init__(self):
            self.seen = 0

        def on_train_batch_end(self):
            self.seen += 1

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state["seen"]

    loop = tiny_loop([Counting()], log_every_n_steps=3)
    loop.fit(max_steps=10)
    new = roundtrip(loop.state_dict())
    # the same state as format 1 wrote it: plugins by registered name, no meta, no layout
    old = {k: v for k, v in new.items() if k not in ("plugin_meta", "layout")}
    old["format"] = "hookloop.loop/1"
    old["plugins"] = {"Counting": new["plugins"]["Counting"]}
    old["metrics_pending"] = {k: new["metrics_pending"][k] for k in ("interval", "epoch", "flush_due")}
    old["loop"] = {k: v for k, v in new["loop"].items() if k != "metric_stamps"}
    counter = Counting()
    loop2 = tiny_loop([counter], log_every_n_steps=3, seed=4)
    loop2.load_state_dict(old)
    assert counter.seen == 10 and loop2.state.global_step == 10
    assert all(torch.equal(p, q) for p, q in zip(loop.module.parameters(), loop2.module.parameters(),
                                                  strict=True))


# ---------------------------------------------------------------------- aliases


def test_alias_hooks_fire_as_their_canonical_hooks() -> None:
    calls = []

    class Keras:
        def on_batch_end(self, loop, batch_idx):
            calls.append(("batch", batch_idx))

        @hookimpl
        def on_epoch_end(self, epoch):
            calls.append(("epoch", epoch))

    loop = tiny_loop([Keras()], train_data=tiny_data(16, 8))
    loop.fit(max_epochs=2)
    assert calls == [("batch", 0), ("batch", 1), ("epoch", 0), ("batch", 0), ("batch", 1), ("epoch", 1)]
    assert "Keras" in loop.pm.plan()["on_train_batch_end"]
    assert "on_batch_end" not in loop.pm.plan()


# ---------------------------------------------------------------------- teardown


def test_close_releases_plugins_once_and_a_closed_loop_cannot_fit() -> None:
    closed = []

    class Holder:
        def on_close(self, loop):
            closed.append(loop.state.global_step)

    class Broken:
        def on_close(self):
            raise RuntimeError("close failed")

    with tiny_loop([Broken(), Holder()]) as loop:
        loop.fit(max_steps=2)
        assert not loop.closed
    assert closed == [2] and loop.closed
    loop.close()
    assert closed == [2]
    with pytest.raises(RuntimeError, match="closed"):
        loop.fit(max_steps=3)


def test_keyboard_interrupt_closes_the_loop_an_error_does_not() -> None:
    closed = []

    class Holder:
        def on_close(self):
            closed.append(True)

    class Boom:
        def __init__(self, exc):
            self.exc = exc

        def on_train_batch_end(self):
            raise self.exc

    loop = tiny_loop([Holder(), Boom(RuntimeError("x"))])
    with pytest.raises(RuntimeError):
        loop.fit(max_steps=2)
    assert not loop.closed and not closed
    loop = tiny_loop([Holder(), Boom(KeyboardInterrupt())])
    with pytest.raises(KeyboardInterrupt):
        loop.fit(max_steps=2)
    assert loop.closed and closed == [True]


def test_deprecated_hooks_name_warns() -> None:
    loop = tiny_loop()
    with pytest.warns(FutureWarning, match="renamed to Loop.callers"):
        assert loop.hooks is loop.callers


# ---------------------------------------------------------------------- validation steps


@pytest.mark.parametrize(("every", "expected"), [(3, [3, 6, 8, 9, 12, 15, 16]), (4, [4, 8, 12, 16])])
def test_validation_every_n_steps_runs_inside_the_epoch(every: int, expected: list[int]) -> None:
    rec = HookRecorder(["on_validation_end", "on_train_epoch_end"])
    tiny_loop([rec], val_every_n_steps=every).fit(max_epochs=2)
    assert [c.step for c in rec.of("on_validation_end")] == expected
    for call in rec.of("on_train_epoch_end"):  # the epoch's validation, run once
        assert {"val/loss", "val/acc"} <= set(call.kwargs["metrics"])


def test_a_skipped_step_does_not_log_its_loss() -> None:
    kept: list[float] = []

    class SkipOdd:
        def on_before_optimizer_step(self, loop):
            if loop.state.batch_idx % 2:
                loop.skip_optimizer_step()

        def on_train_batch_end(self, loop, outputs):
            if loop.state.stepped:
                kept.append(float(outputs["loss"]))

    rec = HookRecorder(["on_log"])
    loop = tiny_loop([SkipOdd(), rec], val_data=None, log_every_n_steps=100)
    loop.fit(max_epochs=1)
    assert loop.state.global_step == 4 and len(kept) == 4
    epoch = rec.logged()[-1][1]["train/loss_epoch"]
    assert epoch == pytest.approx(sum(kept) / 4, rel=1e-6)


def test_a_step_save_at_a_validation_step_is_ranked_by_that_validation(tmp_path) -> None:
    def val_step(loop, batch):
        loop.log("val/acc", float(loop.state.global_step))  # the step it validates

    ck = Checkpoint(tmp_path, monitor="val/acc", mode="max", every_n_steps=4, top_k=-1,
                    every_n_epochs=None, filename="s{step}", verbose=False)
    tiny_loop([ck], val_step_fn=val_step, val_every_n_steps=4).fit(max_epochs=2)
    entries = [(e["step"], e["score"]) for e in ck.state_dict()["entries"]]
    # and the final save at fit end (the end of the epoch is another resume point)
    assert entries == [(4, 4.0), (8, 8.0), (12, 12.0), (16, 16.0), (16, 16.0)]
