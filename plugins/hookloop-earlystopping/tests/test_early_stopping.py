"""Tests of EarlyStopping: every rule on scripted metrics, best-weight restore however
training ends, the non-finite policies, and bit-identical resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hookloop_earlystopping import EarlyStopping, MonitorNotFoundError

from hookloop.plugins import available_plugins, hookimpl
from hookloop.testing import HookRecorder, tiny_data, tiny_loop

NAN = float("nan")


def scripted(values, es, max_epochs=None, plugins=(), **kwargs):
    """Fit a tiny loop whose validation logs ``val/score = values[epoch]``."""

    def val_step(loop, batch):
        loop.log("val/score", float(values[loop.state.epoch]))

    loop = tiny_loop([es, *plugins], val_step_fn=val_step, val_data=[0], **kwargs)
    loop.fit(max_epochs=max_epochs or len(values))
    return loop


def test_patience():
    es = EarlyStopping("val/score", patience=3)
    loop = scripted([1.0, 0.9, 0.95, 0.93, 0.91, 0.8, 0.7], es)
    assert loop.state.epoch == 4
    assert es.stop_rule == "patience" and es.stopped_epoch == 4
    assert loop.state.stop_reason.startswith("early_stopping: patience exhausted")
    assert "best 0.9 at epoch 1" in loop.state.stop_reason
    assert (es.best_score, es.best_epoch, es.wait) == (pytest.approx(0.9), 1, 3)


def test_min_delta():
    es = EarlyStopping("val/score", patience=3, min_delta=0.05)
    loop = scripted([1.0, 0.99, 0.98, 0.97, 0.5], es)
    assert loop.state.epoch == 3 and es.best_score == 1.0
    assert "by more than 0.05" in loop.state.stop_reason


def test_mode_max():
    es = EarlyStopping("val/score", mode="max", patience=2)
    loop = scripted([0.1, 0.5, 0.4, 0.45, 0.9], es)
    assert loop.state.epoch == 3 and es.best_score == 0.5


def test_stopping_threshold():
    es = EarlyStopping("val/score", patience=10, stopping_threshold=0.5)
    loop = scripted([1.0, 0.7, 0.5, 0.1], es)
    assert loop.state.epoch == 2 and es.stop_rule == "stopping_threshold"
    assert "threshold reached" in loop.state.stop_reason
    es = EarlyStopping("val/score", mode="max", stopping_threshold=0.9)
    assert scripted([0.1, 0.95, 0.99], es).state.epoch == 1


def test_divergence_threshold():
    es = EarlyStopping("val/score", patience=10, divergence_threshold=5.0)
    loop = scripted([1.0, 2.0, 6.0, 0.1], es)
    assert loop.state.epoch == 2 and es.stop_rule == "divergence_threshold"
    assert "diverged" in loop.state.stop_reason


def test_baseline_must_be_beaten():
    es = EarlyStopping("val/score", patience=2, baseline=0.5)
    loop = scripted([0.9, 0.8, 0.7, 0.1], es)
    assert loop.state.epoch == 1 and es.best_epoch is None
    assert "baseline 0.5 never beaten" in loop.state.stop_reason
    es = EarlyStopping("val/score", patience=2, baseline=0.5)
    loop = scripted([0.9, 0.4, 0.45, 0.3], es)
    assert loop.state.stop_reason == "max_epochs" and es.best_score == pytest.approx(0.3)


def test_start_from_epoch():
    es = EarlyStopping("val/score", patience=1)
    assert scripted([1, 2, 3, 4, 5], es).state.epoch == 1
    es = EarlyStopping("val/score", patience=1, start_from_epoch=2)
    loop = scripted([1, 2, 3, 4, 5], es)
    assert loop.state.epoch == 3 and es.best_epoch == 2 and es.checks == 2


def test_check_finite_stops_and_nan_is_never_best():
    es = EarlyStopping("val/score", patience=5)
    loop = scripted([1.0, NAN, 0.5], es)
    assert loop.state.epoch == 1 and es.stop_rule == "non-finite"
    assert "val/score = nan" in loop.state.stop_reason and es.best_score == 1.0

    es = EarlyStopping("val/score", patience=5, check_finite=False)
    loop = scripted([NAN, math.inf, 2.0, NAN, 3.0], es)
    assert loop.state.stop_reason == "max_epochs"
    assert es.best_score == 2.0 and es.best_epoch == 2 and es.wait == 2

    es = EarlyStopping("val/score", mode="max", patience=1, check_finite=False)
    loop = scripted([1.0, NAN, 5.0], es)
    assert loop.state.epoch == 1 and es.best_score == 1.0


def test_missing_monitor_lists_logged_metrics():
    with pytest.raises(MonitorNotFoundError, match="val/acc") as info:
        tiny_loop([EarlyStopping("val/accuracy")]).fit(max_epochs=2)
    assert "'val/accuracy' was never logged" in str(info.value) and "val/loss" in str(info.value)
    loop = tiny_loop([EarlyStopping("val/accuracy", strict=False)])
    loop.fit(max_epochs=2)
    assert loop.state.stop_reason == "max_epochs"


def test_check_on_train_epoch_and_validation_frequency():
    es = EarlyStopping("train/loss_epoch", check_on="train_epoch", patience=100)
    tiny_loop([es], val_every_n_epochs=2).fit(max_epochs=5)
    assert es.checks == 5
    es = EarlyStopping("val/loss", patience=100)
    tiny_loop([es], val_every_n_epochs=2).fit(max_epochs=5)
    assert es.checks == 3  # epochs 1, 3 and the last one
    es.checks = 0
    es.best_score = math.inf
    loop = tiny_loop([es])
    loop.validate()  # outside fit: no check
    assert es.checks == 0


def test_reason_reaches_user_and_trackers(capsys):
    rec = HookRecorder(["on_log_text"])
    es = EarlyStopping("val/score", patience=1)
    loop = scripted([1.0, 2.0, 3.0], es, plugins=[rec])
    texts = [(c.kwargs["name"], c.kwargs["text"]) for c in rec.calls]
    assert texts == [("early_stopping/stop_reason", loop.state.stop_reason)]
    assert "patience exhausted" in capsys.readouterr().out


class Weights:
    """Keeps the model weights after each validation, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def on_validation_end(self, loop, metrics):
        self.by_epoch[loop.state.epoch] = {k: v.clone() for k, v in loop.module.state_dict().items()}


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class StopAt:
    def __init__(self, epoch, interrupt=False):
        self.epoch, self.interrupt = epoch, interrupt

    @hookimpl
    def on_train_batch_start(self, loop, batch, batch_idx):
        if loop.state.epoch == self.epoch and batch_idx == 2:
            if self.interrupt:
                raise KeyboardInterrupt
            loop.request_stop("another plugin")


@pytest.mark.parametrize("ending", ["early_stopping", "max_epochs", "other_plugin", "signal"])
def test_restore_best_weights_however_training_ends(ending):
    values = [3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    w = Weights()
    es = EarlyStopping("val/score", patience=3 if ending == "early_stopping" else 50,
                       restore_best_weights=True)
    plugins = [w]
    if ending == "other_plugin":
        plugins.append(StopAt(4))
    if ending == "signal":
        plugins.append(StopAt(4, interrupt=True))
        with pytest.raises(KeyboardInterrupt):
            scripted(values, es, plugins=plugins)
    else:
        loop = scripted(values, es, plugins=plugins)
    assert es.best_epoch == 2
    final = {k: v.clone() for k, v in es.best_weights.items()}
    assert _equal(final, w.by_epoch[2])
    assert not _equal(w.by_epoch[2], w.by_epoch[max(w.by_epoch)])
    if ending != "signal":
        assert _equal(loop.module.state_dict(), w.by_epoch[2])
        expected = {"early_stopping": "early_stopping:", "max_epochs": "max_epochs",
                    "other_plugin": "another plugin"}[ending]
        assert loop.state.stop_reason.startswith(expected)


def test_restore_on_signal_updates_the_model():
    w = Weights()
    es = EarlyStopping("val/score", patience=50, restore_best_weights=True)

    def val_step(loop, batch):
        loop.log("val/score", [3.0, 1.0, 2.0, 3.0, 4.0][loop.state.epoch])

    loop = tiny_loop([es, w, StopAt(3, interrupt=True)], val_step_fn=val_step, val_data=[0])
    with pytest.raises(KeyboardInterrupt):
        loop.fit(max_epochs=5)
    assert _equal(loop.module.state_dict(), w.by_epoch[1])


def nan_data(bad_batches, n=64):
    data = tiny_data(n, 8)
    for i in bad_batches:
        x, y = data[i]
        data[i] = (torch.full_like(x, NAN), y)
    return data


def test_nonfinite_skip_batch_keeps_training():
    es = EarlyStopping("val/loss", patience=50, on_nonfinite="skip_batch")
    loop = tiny_loop([es], train_data=nan_data([3, 5]))
    loop.fit(max_epochs=3)
    assert es.nonfinite_steps == 6 and loop.state.stop_reason == "max_epochs"
    assert all(torch.isfinite(p).all() for p in loop.module.parameters())
    assert loop.state.global_step == 3 * 8 - 6
    # without the policy the NaN reaches the weights and the monitor: stop
    es = EarlyStopping("val/loss", patience=50)
    loop = tiny_loop([es], train_data=nan_data([3]))
    loop.fit(max_epochs=3)
    assert es.stop_rule == "non-finite" and loop.state.epoch == 0


def test_nonfinite_limit_stops():
    es = EarlyStopping("val/loss", on_nonfinite="skip_batch", max_nonfinite=3)
    loop = tiny_loop([es], train_data=nan_data(range(8)))
    loop.fit(max_epochs=3)
    assert es.stop_rule == "non-finite" and "3 optimizer steps in a row" in loop.state.stop_reason
    assert loop.state.global_step == 0


class AtBatch:
    """Keeps the weights right after one batch of one epoch."""

    def __init__(self, epoch, batch_idx):
        self.epoch, self.batch_idx, self.weights = epoch, batch_idx, None

    @hookimpl
    def on_train_batch_end(self, loop, outputs, batch, batch_idx):
        if loop.state.epoch == self.epoch and batch_idx == self.batch_idx:
            self.weights = {k: v.clone() for k, v in loop.module.state_dict().items()}


def test_nonfinite_rollback_from_memory():
    w, at = Weights(), AtBatch(2, 4)
    es = EarlyStopping("val/loss", patience=50, on_nonfinite="rollback")
    data = tiny_data(64, 8)
    calls = {"n": 0}

    def step(loop, batch):
        calls["n"] += 1
        x, y = batch
        if loop.state.epoch == 2 and loop.state.batch_idx == 4:
            x = torch.full_like(x, NAN)
        loss = torch.nn.functional.cross_entropy(loop.model(x), y)
        loop.log("train/loss", loss)
        return loss

    loop = tiny_loop([es, w, at], train_data=data, step_fn=step)
    loop.fit(max_epochs=4)
    assert es.rollbacks == 1 and es.nonfinite_steps == 1
    assert _equal(at.weights, w.by_epoch[1])  # back to the last good check
    assert all(torch.isfinite(p).all() for p in loop.module.parameters())
    assert loop.state.stop_reason == "max_epochs"


def test_nonfinite_monitor_rollback_from_checkpoint(tmp_path):
    class Saver:
        """Writes the loop state at each epoch end and announces it."""

        @hookimpl
        def on_train_epoch_end(self, loop, epoch, metrics):
            path = tmp_path / f"epoch{epoch}.pt"
            torch.save(loop.state_dict(), path)
            loop.callers.on_checkpoint_saved(loop, str(path), dict(metrics), False)

    w = Weights()
    es = EarlyStopping("val/score", patience=50, on_nonfinite="rollback", rollback_source="checkpoint")
    loop = scripted([3.0, 2.0, NAN, 1.0], es, plugins=[w, Saver()])
    assert es.rollbacks == 1 and loop.state.stop_reason == "max_epochs"
    saved = torch.load(tmp_path / "epoch1.pt", weights_only=True)["model"]
    # the weights after epoch 2's check are those of the epoch-1 checkpoint
    assert _equal(saved, w.by_epoch[2])
    assert not _equal(w.by_epoch[2], w.by_epoch[3])
    assert es.best_score == 1.0


def test_enabled_by_entry_point_name():
    assert available_plugins(refresh=True)["early_stopping"].obj is EarlyStopping
    loop = tiny_loop([("early_stopping", {"monitor": "val/loss", "patience": 1, "min_delta": 10.0})])
    loop.fit(max_epochs=5)
    assert loop.state.stop_reason.startswith("early_stopping: patience exhausted")


def test_bad_options():
    for kwargs in ({"mode": "up"}, {"patience": -1}, {"check_on": "x"}, {"on_nonfinite": "ignore"},
                   {"baseline": NAN}, {"max_nonfinite": 0}):
        with pytest.raises(ValueError):
            EarlyStopping("val/loss", **kwargs)


# ---------------------------------------------------------------------- resume


class Snap:
    def __init__(self, step):
        self.step, self.blob = step, None

    @hookimpl
    def on_train_batch_end(self, loop, outputs, batch, batch_idx):
        if loop.state.global_step == self.step and self.blob is None:
            buf = io.BytesIO()
            torch.save(loop.state_dict(), buf)
            self.blob = buf.getvalue()

    def load(self):
        return torch.load(io.BytesIO(self.blob), weights_only=True)


def _es():
    return EarlyStopping("val/loss", patience=2, min_delta=0.01, restore_best_weights=True)


@pytest.mark.parametrize("at", [12, 28, 40])
@pytest.mark.parametrize("check_on", ["validation", "train_epoch"])
def test_resume_stops_at_the_same_step(at, check_on):
    def make():
        monitor = "val/loss" if check_on == "validation" else "train/loss_epoch"
        return EarlyStopping(monitor, patience=2, min_delta=0.01, restore_best_weights=True,
                             check_on=check_on)

    snap = Snap(at)
    es = make()
    full = tiny_loop([es, snap], lr=0.05)
    full.fit(max_epochs=30)
    assert full.state.stop_reason.startswith("early_stopping"), full.state.stop_reason
    assert snap.blob is not None and es.stopped_step > at

    es2 = make()
    fresh = tiny_loop([es2], lr=0.05)
    fresh.fit(max_epochs=30, resume=snap.load())
    assert fresh.state.global_step == full.state.global_step
    assert fresh.state.stop_reason == full.state.stop_reason
    assert (es2.best_epoch, es2.best_score, es2.wait) == (es.best_epoch, es.best_score, es.wait)
    assert _equal(full.module.state_dict(), fresh.module.state_dict())


def test_resume_from_epoch_end_state_dict():
    full = tiny_loop([_es()], lr=0.05)
    full.fit(max_epochs=30)
    first = tiny_loop([_es()], lr=0.05)
    first.fit(max_epochs=3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    fresh_es = _es()
    fresh = tiny_loop([fresh_es], lr=0.05)
    fresh.fit(max_epochs=30, resume=torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.state.global_step == full.state.global_step
    assert fresh.state.stop_reason == full.state.stop_reason
    assert fresh_es.best_weights is not None
    assert _equal(full.module.state_dict(), fresh.module.state_dict())


# ---------------------------------------------------------------------- defects fixed


def test_patience_zero_stops_at_the_first_check_that_does_not_improve():
    es = EarlyStopping("val/score", patience=0)
    loop = scripted([3.0, 2.0, 1.0, 1.5, 0.5], es)
    assert loop.state.epoch == 3 and es.stop_rule == "patience"
    assert "did not improve for 1 check(s)" in loop.state.stop_reason
    assert "for 0 check(s)" not in loop.state.stop_reason


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
def test_nonfinite_stop_reason_says_non_finite(bad):
    es = EarlyStopping("val/score", patience=5)
    loop = scripted([1.0, bad, 0.5], es)
    assert es.stop_rule == "non-finite" and loop.state.epoch == 1
    assert "non-finite" in loop.state.stop_reason and f"val/score = {bad}" in loop.state.stop_reason


def test_nonfinite_step_limit_is_not_reset_by_a_finite_validation():
    # every batch is NaN: the steps are skipped, the weights stay finite and so does
    # val/loss; the run of non-finite steps still reaches max_nonfinite across epochs
    es = EarlyStopping("val/loss", patience=50, on_nonfinite="skip_batch", max_nonfinite=10)
    loop = tiny_loop([es], train_data=nan_data(range(8)))
    loop.fit(max_epochs=10)
    assert es.stop_rule == "non-finite" and es.nonfinite_steps == 10
    assert "10 optimizer steps in a row" in loop.state.stop_reason
    assert loop.state.epoch == 1 and loop.state.global_step == 0


class Logged:
    """Every value ``on_log`` delivered, by name."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    @hookimpl
    def on_log(self, metrics, step):
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(v)


def test_skip_batch_keeps_the_skipped_loss_out_of_the_logged_loss():
    # the core leaves the default step's train/loss of a skipped step unrecorded, so a
    # monitor on the epoch loss sees only the steps that trained
    logged = Logged()
    es = EarlyStopping("train/loss_epoch", check_on="train_epoch", patience=50, on_nonfinite="skip_batch")
    loop = tiny_loop([es, logged], train_data=nan_data([3, 5]))
    loop.fit(max_epochs=3)
    assert es.nonfinite_steps == 6
    assert loop.state.stop_reason == "max_epochs", loop.state.stop_reason
    assert all(math.isfinite(v) for v in logged.values["train/loss_epoch"])
    assert all(math.isfinite(v) for v in logged.values["train/loss"])


def test_rollback_from_a_safetensors_checkpoint(tmp_path):
    pytest.importorskip("hookloop_checkpoint")
    pytest.importorskip("safetensors")
    from hookloop_checkpoint import Checkpoint, load_checkpoint

    w = Weights()
    saved: list[str] = []

    class Saved:
        @hookimpl
        def on_checkpoint_saved(self, loop, path):
            saved.append(str(path))

    ckpt = Checkpoint(tmp_path, format="safetensors", top_k=-1, filename="e{epoch}", verbose=False,
                      signals=())
    es = EarlyStopping("val/score", patience=50, on_nonfinite="rollback", rollback_source="checkpoint")
    loop = scripted([3.0, 2.0, NAN, 1.0], es, plugins=[w, ckpt, Saved()])
    assert list(tmp_path.glob("*.safetensors"))
    assert es.rollbacks == 1 and loop.state.stop_reason == "max_epochs"
    epoch1 = load_checkpoint(tmp_path / "e1.pt")["model"]
    assert _equal(epoch1, w.by_epoch[2])  # rolled back at epoch 2's check
    assert not _equal(w.by_epoch[2], w.by_epoch[3])
