"""The behaviours of Lightning's, Ignite's and Keras's early-stopping tests, on
hookloop's EarlyStopping. Each test names the peer test it ports; where hookloop
differs on purpose the test checks hookloop's behaviour and says so (see the README's
"Differences from Lightning, Ignite and Keras" and tests/PEER_TESTS.md)."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from hookloop_earlystopping import EarlyStopping, MonitorNotFoundError, auto_mode

from hookloop.plugins import hookimpl
from hookloop.testing import tiny_data, tiny_loop

NAN = float("nan")
LIGHTNING = "Lightning tests/tests_pytorch/callbacks/test_early_stopping.py"
IGNITE = "Ignite tests/ignite/handlers/test_early_stopping.py"
KERAS = "Keras keras/src/callbacks/early_stopping_test.py"


def fit_scripted(values, es, *, on="validation", max_epochs=None, plugins=(), **kwargs):
    """Fit a tiny loop whose monitored value at epoch ``e`` is ``values[e]``: logged as
    ``val/score`` by validation, or as ``train/score`` by every training step (its
    epoch mean ``train/score_epoch`` is then ``values[e]``)."""

    def val_step(loop, batch):
        loop.log("val/score", float(values[loop.state.epoch]))

    def step(loop, batch):
        x, y = batch
        loop.log("train/score", float(values[loop.state.epoch]))
        return torch.nn.functional.cross_entropy(loop.model(x), y)

    if on == "validation":
        kwargs.update(val_step_fn=val_step, val_data=[0])
    else:
        kwargs.update(step_fn=step, val_data=None)
    loop = tiny_loop([es, *plugins], **kwargs)
    loop.fit(max_epochs=max_epochs or len(values))
    return loop


class Weights:
    """The model's weights after each epoch's check, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def on_validation_end(self, loop):
        self.by_epoch[loop.state.epoch] = {k: v.clone() for k, v in loop.module.state_dict().items()}


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- Lightning


def test_state_key_names_monitor_and_mode():
    # Lightning test_early_stopping_state_key
    a, b = EarlyStopping("val/loss"), EarlyStopping("val/acc", mode="max")
    assert "val/loss" in a.state_key and "min" in a.state_key
    assert a.state_key != b.state_key
    assert EarlyStopping("val/acc", mode="auto").state_key == b.state_key


def test_checkpoint_holds_the_state_of_its_epoch_and_restores_it():
    # Lightning test_resume_early_stopping_from_checkpoint
    blobs, states = [], []

    class Save:
        @hookimpl(trylast=True)
        def on_train_epoch_end(self, loop):
            buf = io.BytesIO()
            torch.save(loop.state_dict(), buf)
            blobs.append(buf.getvalue())
            states.append(loop.get_plugin("early_stopping").state_dict())

    es = EarlyStopping("train/score_epoch", check_on="train_epoch", patience=3)
    fit_scripted([5.0, 4.0, 4.5, 4.2], es, on="train_epoch", plugins=[Save()])
    assert len(blobs) == 4
    ckpt = torch.load(io.BytesIO(blobs[2]), weights_only=True)
    saved = next(v for k, v in ckpt["plugins"].items() if "early_stopping" in k)
    assert saved["wait"] == states[2]["wait"] == 1 and saved["best_score"] == 4.0
    fresh = EarlyStopping("train/score_epoch", check_on="train_epoch", patience=3)
    fresh.load_state_dict(saved)
    assert (fresh.best_score, fresh.wait, fresh.best_epoch) == (4.0, 1, 1)


def test_one_check_per_epoch():
    # Lightning test_early_stopping_no_extraneous_invocations
    es = EarlyStopping("val/loss", patience=100)
    tiny_loop([es]).fit(max_epochs=4)
    assert es.checks == 4


PATIENCE_CASES = [([6, 5, 5, 5, 5, 5], 3, 4), ([6, 5, 4, 4, 3, 3], 1, 3), ([6, 5, 6, 5, 5, 5], 3, 4)]


@pytest.mark.parametrize(("values", "patience", "stop_epoch"), PATIENCE_CASES)
@pytest.mark.parametrize("on", ["validation", "train_epoch"])
def test_patience(values, patience, stop_epoch, on):
    # Lightning test_early_stopping_patience and test_early_stopping_patience_train
    monitor = "val/score" if on == "validation" else "train/score_epoch"
    es = EarlyStopping(monitor, patience=patience, check_on=on)
    loop = fit_scripted(values + [1.0] * 4, es, on=on, max_epochs=10)
    assert loop.state.epoch == stop_epoch == es.stopped_epoch


def test_pickle_round_trip_keeps_the_state():
    # Lightning test_pickling (vars() differ there only by object identity: compare states)
    es = EarlyStopping("foo", on_nonfinite="skip_batch", min_steps=3)
    es.best_score, es.wait = 0.5, 2
    again = pickle.loads(pickle.dumps(es))
    assert again.state_dict() == es.state_dict()
    assert (again.monitor, again.on_nonfinite, again.min_steps) == ("foo", "skip_batch", 3)


def test_training_metric_without_validation():
    # Lightning test_early_stopping_no_val_step
    es = EarlyStopping("train/loss_epoch", check_on="train_epoch", min_delta=0.1, patience=0)
    loop = tiny_loop([es], val_data=None)
    loop.fit(max_epochs=10)
    assert loop.state.stop_reason.startswith("early_stopping: patience exhausted")
    assert loop.state.epoch < 9


@pytest.mark.parametrize(
    ("stopping", "divergence", "values", "stop_epoch"),
    [(None, None, [8, 4, 2, 3, 4, 5, 8, 10], 5), (2.9, None, [9, 8, 7, 6, 5, 6, 4, 3, 2, 1], 8),
     (None, 15.9, [9, 4, 2, 16, 32, 64], 3)],
)
def test_thresholds(stopping, divergence, values, stop_epoch):
    # Lightning test_early_stopping_thresholds
    es = EarlyStopping("val/score", stopping_threshold=stopping, divergence_threshold=divergence)
    loop = fit_scripted(values + [1.0] * 10, es, max_epochs=20)
    assert loop.state.epoch == stop_epoch


@pytest.mark.parametrize("bad", [math.inf, NAN])
def test_non_finite_monitor(bad):
    # Lightning test_early_stopping_on_non_finite_monitor
    es = EarlyStopping("val/score", check_finite=True)
    loop = fit_scripted([4, 3, bad, 2, 1], es, max_epochs=5)
    assert loop.state.epoch == es.stopped_epoch == 2 and es.stop_rule == "non-finite"


@pytest.mark.parametrize(
    ("batches", "min_epochs", "min_steps", "stop_step"),
    [(3, 0, 10, 10), (5, 0, 10, 10), (3, 2, 0, 6), (5, 2, 0, 10),
     (3, 1, 10, 10), (5, 1, 10, 10), (3, 3, 10, 10), (5, 3, 10, 15)],
)
def test_min_epochs_and_min_steps(batches, min_epochs, min_steps, stop_step):
    # Lightning test_min_epochs_min_steps_global_step (there min_epochs/min_steps are
    # Trainer options; here they are the plugin's): a rule that fires at every check
    # stops training only once both minimums are reached, mid-epoch for min_steps
    es = EarlyStopping("train/loss_epoch", check_on="train_epoch", stopping_threshold=1e9,
                       min_epochs=min_epochs, min_steps=min_steps)
    loop = tiny_loop([es], val_data=None, train_data=tiny_data(8 * batches, 8))
    loop.fit(max_epochs=20)
    assert es.stop_rule == "stopping_threshold"
    assert loop.state.global_step == stop_step
    assert loop.state.epoch + 1 == max(math.ceil(min_steps / batches), min_epochs)


def test_a_deferred_stop_is_dropped_when_a_later_check_improves():
    # differs from Lightning on purpose: its Trainer keeps a stop requested before
    # min_epochs; here the verdict of the latest check decides
    es = EarlyStopping("val/score", patience=1, min_epochs=4)
    loop = fit_scripted([3.0, 3.0, 2.0, 1.0, 0.5, 0.5, 0.5], es)
    assert es.stopped_epoch == 5 and loop.state.epoch == 5


def test_bad_mode_names_the_value():
    # Lightning test_early_stopping_mode_options
    with pytest.raises(ValueError, match="mode='unknown_option'"):
        EarlyStopping("foo", mode="unknown_option")


@pytest.mark.parametrize("on", ["validation", "train_epoch"])
@pytest.mark.parametrize("order", ["abc_first", "cba_first"])
def test_several_early_stoppers_the_first_to_fire_stops(on, order):
    # Lightning test_multiple_early_stopping_callbacks (single process; under DDP the
    # monitored values are reduced before any plugin sees them, see tests/distributed)
    abc = [8, 4, 2, 3, 4, 5, 8, 10]
    prefix = "val" if on == "validation" else "train"
    suffix = "" if on == "validation" else "_epoch"

    def log(loop):
        loop.log(f"{prefix}/abc", float(abc[loop.state.epoch]))
        loop.log(f"{prefix}/cba", 0.0)

    def step(loop, batch):
        log(loop)
        return torch.nn.functional.cross_entropy(loop.model(batch[0]), batch[1])

    one = EarlyStopping(f"{prefix}/abc{suffix}", check_on=on)
    two = EarlyStopping(f"{prefix}/cba{suffix}", patience=3, check_on=on)
    pairs = [("es_abc", one), ("es_cba", two)]
    plugins = pairs if order == "abc_first" else pairs[::-1]
    kwargs = ({"val_step_fn": lambda loop, b: log(loop), "val_data": [0]} if on == "validation"
              else {"step_fn": step, "val_data": None})
    loop = tiny_loop(plugins, **kwargs)
    loop.fit(max_epochs=20)
    assert loop.state.epoch == 3 and two.stop_rule == "patience"


def test_checks_follow_the_validation_frequency():
    # Lightning test_check_on_train_epoch_end_smart_handling (check_val_every_n_epoch;
    # hookloop validates only at epoch ends, so its val_check_interval case does not apply)
    es = EarlyStopping("val/score", patience=1)
    loop = fit_scripted([1.0] * 10, es, val_every_n_epochs=2)
    assert es.checks == 2 and loop.state.epoch == 3


@pytest.mark.parametrize(
    ("values", "kwargs", "rule", "text"),
    [([10.0] * 10, {"patience": 2}, "patience", "did not improve"),
     ([5.0, 3.0, 1.0, 0.5, 0.1], {"stopping_threshold": 0.6}, "stopping_threshold", "threshold reached"),
     ([1.0, 2.0, 5.0, 10.0, 15.0], {"divergence_threshold": 8.0}, "divergence_threshold", "diverged"),
     ([1.0, 0.5, NAN, NAN], {}, "non-finite", "non-finite"),
     ([5.0, 4.0, 3.0], {"patience": 3}, None, None)],
)
def test_stop_rules_and_reasons(values, kwargs, rule, text):
    # Lightning test_early_stopping_reasons (an enum there, rule names here)
    es = EarlyStopping("val/score", **kwargs)
    loop = fit_scripted(values, es)
    assert es.stop_rule == rule
    if rule is None:
        assert es.stop_reason is None and es.stopped_epoch is None and loop.state.stop_reason == "max_epochs"
    else:
        assert text in es.stop_reason and es.stopped_epoch > 0
        assert loop.state.stop_reason == f"early_stopping: {es.stop_reason}"
    again = EarlyStopping("val/score", **kwargs)
    again.load_state_dict(es.state_dict())
    assert (again.stop_rule, again.stop_reason) == (es.stop_rule, es.stop_reason)


def test_an_older_state_without_the_newer_keys_loads():
    # Lightning test_early_stopping_reasons, backward-compatibility case
    es = EarlyStopping("val/loss", patience=3)
    es.load_state_dict({"best_score": 0.5, "wait": 2, "stopped_epoch": 5})
    assert (es.best_score, es.wait, es.stopped_epoch, es.stop_rule) == (0.5, 2, 5, None)


# ---------------------------------------------------------------------- Ignite


def test_argument_validation():
    # Ignite test_args_validation (score_function and trainer arguments do not apply)
    with pytest.raises(ValueError, match="patience must be a non-negative int; got -1"):
        EarlyStopping("val/score", patience=-1)
    # differs on purpose: a negative min_delta is taken as its size (Keras), not refused
    assert EarlyStopping("val/score", min_delta=-0.1).min_delta == 0.1


@pytest.mark.parametrize(
    ("values", "patience", "stop_epoch"),
    [([1.0, 0.8, 0.88], 2, 2),  # test_simple_early_stopping
     ([42.0, 42.0], 1, 1),  # test_simple_early_stopping_on_plateau
     ([1.0, 0.8, 1.2], 2, None),  # test_simple_no_early_stopping
     ([1.0, 0.8, 1.2, 1.5, 0.9, 1.0, 0.99, 1.1, 0.9, 1.0], 3, 6),  # test_with_engine_early_stopping
     ([0.047] * 10, 4, 4),  # test_with_engine_early_stopping_on_plateau
     ([1.0, 0.8, 1.2, 1.23, 0.9, 1.0, 1.1, 1.253, 1.26, 1.2], 5, None)],  # test_with_engine_no_early_stopping
)
def test_scores(values, patience, stop_epoch):
    # Ignite: the tests named above (a score is higher-better: mode="max")
    es = EarlyStopping("val/score", mode="max", patience=patience)
    loop = fit_scripted(values, es)
    assert es.stopped_epoch == stop_epoch
    if stop_epoch is None:
        assert loop.state.stop_reason == "max_epochs" and loop.state.epoch == len(values)
    else:
        assert loop.state.epoch == stop_epoch


def test_state_moves_to_a_new_object_mid_run():
    # Ignite test_state_dict: a resumed run with a fresh plugin stops where it would have
    values = [1.0, 0.8, 0.88, 0.5]
    first = tiny_loop([EarlyStopping("val/score", mode="max", patience=2)],
                      val_step_fn=lambda loop, b: loop.log("val/score", values[loop.state.epoch]),
                      val_data=[0])
    first.fit(max_epochs=1)
    es = EarlyStopping("val/score", mode="max", patience=2)
    loop = tiny_loop([es], val_step_fn=lambda loop, b: loop.log("val/score", values[loop.state.epoch]),
                     val_data=[0])
    loop.fit(max_epochs=4, resume=first.state_dict())
    assert es.stopped_epoch == 2 and es.checks == 3


@pytest.mark.parametrize("cumulative", [True, False])
def test_min_delta(cumulative):
    # Ignite test_early_stopping_on_delta: the same stop with either cumulative_delta
    es = EarlyStopping("val/score", mode="max", patience=2, min_delta=0.1, cumulative_delta=cumulative)
    fit_scripted([1.0, 2.0, 2.01, 3.0, 3.01, 3.02, 4.0], es)
    assert es.stopped_epoch == 5


def test_last_event_delta():
    # Ignite test_early_stopping_on_last_event_delta: with cumulative_delta=False a gain
    # within min_delta becomes the reference, so 0.0 -> 0.3 -> 0.6 never improves
    es = EarlyStopping("val/score", mode="max", patience=2, min_delta=0.4, cumulative_delta=False)
    fit_scripted([0.0, 0.3, 0.6, 1.0], es)
    assert es.stopped_epoch == 2 and es.best_score == 0.6 and es.best_epoch == 0


def test_cumulative_delta():
    # Ignite test_early_stopping_on_cumulative_delta (hookloop's default, as Lightning's
    # and Keras's): small gains add up against the last improvement
    es = EarlyStopping("val/score", mode="max", patience=2, min_delta=0.4)
    loop = fit_scripted([0.0, 0.3, 0.6], es)
    assert loop.state.stop_reason == "max_epochs" and es.best_score == 0.6 and es.wait == 0


# ---------------------------------------------------------------------- Keras


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [("val_mse", "min"), ("val/loss", "min"), ("loss", "min"), ("acc", "max"), ("val_accuracy", "max"),
     ("hinge", "min"), ("f1_score", "max"), ("val/auc", "max"), ("val/precision", "max"),
     ("val/recall", "max"), ("val/acc_loss", "min"), ("val/top1_error", "min")],
)
def test_auto_mode(monitor, mode):
    # Keras test_early_stopping (the mode="auto" cases; Keras asks the metric objects,
    # hookloop decides by name, see auto_mode)
    assert auto_mode(monitor) == mode
    assert EarlyStopping(monitor, mode="auto").mode == mode


def test_unknown_monitor_raises():
    # Keras test_early_stopping, the unknown-monitor case
    with pytest.raises(MonitorNotFoundError, match="'unknown' was never logged"):
        tiny_loop([EarlyStopping("unknown", patience=0)]).fit(max_epochs=2)


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_keras_patience(patience):
    # Keras test_early_stopping_patience
    es = EarlyStopping("train/score_epoch", check_on="train_epoch", patience=patience)
    fit_scripted([10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5], es, on="train_epoch")
    assert es.stopped_epoch == max(patience, 1) + 2


def test_a_second_fit_on_the_same_loop_continues():
    # Keras test_early_stopping_reuse: differs on purpose. Keras resets the callback on
    # every fit; a second hookloop fit on one loop continues the run (and its patience)
    es = EarlyStopping("val/score", patience=3)
    values = [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5]
    loop = tiny_loop([es], val_step_fn=lambda loop, b: loop.log("val/score", values[loop.state.epoch]),
                     val_data=[0])
    loop.fit(max_epochs=8)
    assert es.stopped_epoch == 3
    loop.fit(max_epochs=8)
    assert es.stopped_epoch == 4 and es.wait == 4  # the next check goes on counting


def test_a_new_loop_starts_fresh():
    # Keras test_early_stopping_reuse_across_models
    es = EarlyStopping("val/loss", patience=5)
    for seed in range(2):
        loop = tiny_loop([es], seed=seed)
        assert es.best_score == math.inf and es.wait == 0 and es.checks == 0
        loop.fit(max_epochs=7)
        assert loop.state.epoch >= 5


def test_baseline_trains_at_least_patience_epochs():
    # Keras test_early_stopping_with_baseline
    es = EarlyStopping("val/score", patience=3, baseline=0.6)
    loop = fit_scripted([0.9] * 20, es)
    assert loop.state.epoch + 1 >= 3 and es.stopped_epoch == 2


def test_restore_best_weights():
    # Keras test_early_stopping_final_weights_when_restoring_model_weights, first case
    w = Weights()
    es = EarlyStopping("val/score", patience=2, restore_best_weights=True)
    loop = fit_scripted([0.2, 0.15, 0.1, 0.11, 0.12], es, plugins=[w])
    assert es.stopped_epoch == 4 and equal(loop.module.state_dict(), w.by_epoch[2])


@pytest.mark.parametrize("below", [True, False])
def test_restore_when_the_baseline_is_never_beaten(below):
    # Keras test_early_stopping_final_weights_when_restoring_model_weights, baseline
    # case: Keras restores the best check's weights; hookloop does with
    # restore_below_baseline=True and by default keeps the last weights
    w = Weights()
    es = EarlyStopping("val/score", patience=5, baseline=0.5, restore_best_weights=True,
                       restore_below_baseline=below)
    loop = fit_scripted([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], es, plugins=[w])
    assert loop.state.epoch + 1 == 5 and es.best_epoch is None
    assert equal(loop.module.state_dict(), w.by_epoch[2 if below else 4])


def test_restore_below_baseline_when_another_plugin_stops():
    # Keras test_early_stopping_final_weights_when_restoring_model_weights, third case
    class StopAt3:
        @hookimpl
        def on_train_epoch_end(self, loop, epoch):
            if epoch == 3:
                loop.request_stop("another plugin")

    w = Weights()
    es = EarlyStopping("val/score", patience=5, baseline=0.5, restore_best_weights=True,
                       restore_below_baseline=True)
    loop = fit_scripted([0.9, 0.8, 0.7, 0.71, 0.72, 0.73], es, plugins=[w, StopAt3()])
    assert loop.state.epoch + 1 == 4 and equal(loop.module.state_dict(), w.by_epoch[2])


@pytest.mark.parametrize(("patience", "at_least"), [(3, 5), (0, 2)])
def test_start_from_epoch(patience, at_least):
    # Keras test_early_stopping_with_start_from_epoch
    es = EarlyStopping("val/score", patience=patience, start_from_epoch=2)
    loop = fit_scripted([1.0] * 20, es)
    assert loop.state.epoch + 1 >= at_least
    assert es.stopped_epoch == 2 + patience + (patience == 0)
