"""Every bad input gets a clear, early error: one table of bad inputs, each paired with
the error it must produce (plugin specs, data, control calls, resume mismatches, entry
points), and the documented effects of the inputs that are accepted."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hookloop import Loop, PluginError, ResumeError, available_plugins, hookimpl
from hookloop.discovery import AvailablePlugin, missing_plugin_message
from hookloop.testing import HookRecorder, tiny_data, tiny_loop, tiny_model

CLASH_SITE = Path(__file__).parent / "fixtures" / "site" / "clash"


class Plugin:
    def on_fit_start(self, loop):
        pass


class Misspelled:
    def on_train_batch_ned(self, loop):  # unmarked: must not be ignored
        pass


class MarkedMisspelled:
    @hookimpl
    def on_fit_strat(self, loop):
        pass


class BadNotHooks:
    hookloop_not_hooks = 3


def loop_with(plugins: Any = None, **kwargs: Any) -> Loop:
    return Loop(tiny_model(), None, kwargs.pop("train_data", None), plugins=plugins, autoload=False,
                **kwargs)


def fit_with(plugin: Any, **kwargs: Any) -> Loop:
    loop = tiny_loop([plugin], **kwargs)
    loop.fit(max_epochs=2)
    return loop


def calls(hook: str, action: Callable[[Loop], Any]) -> Any:
    """A plugin that calls ``action(loop)`` in ``hook`` (once per fit for epoch hooks)."""
    return type("Caller", (), {hook: lambda self, loop: action(loop)})()


def same_plugin_twice() -> Loop:
    p = Plugin()
    return loop_with([p, p])


def fit_with_resume(resume: Any) -> None:
    tiny_loop().fit(max_epochs=1, resume=resume)


class EmptyStream:
    """An iterable without a length that yields nothing."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())


def state_of(**kwargs: Any) -> dict[str, Any]:
    loop = tiny_loop(**kwargs)
    loop.fit(max_steps=1)
    return loop.state_dict()


def load_into_other_model() -> None:
    state = state_of()
    tiny_loop(model=nn.Sequential(nn.Linear(4, 3))).load_state_dict(state)


def load_into_other_optimizer() -> None:
    state = state_of()
    model = tiny_model()
    tiny_loop(model=model, optimizer=torch.optim.Adam(model.parameters())).load_state_dict(state)


def load_bad_format() -> None:
    state = state_of()
    state["format"] = "something-else/9"
    tiny_loop().load_state_dict(state)


def load_not_a_dict() -> None:
    tiny_loop().load_state_dict(["not", "a", "dict"])  # type: ignore[arg-type]


def untouched_after_failed_resume() -> None:
    loop = tiny_loop(model=nn.Sequential(nn.Linear(4, 3)))
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    with pytest.raises(ResumeError):
        loop.load_state_dict(state_of())
    assert all(torch.equal(before[k], v) for k, v in loop.model.state_dict().items())
    assert loop.state.global_step == 0
    raise ResumeError("nothing was restored (checked)")


# (id, what to run, exception type, the error text it must produce)
BAD_INPUTS: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # 1. plugin specs, at Loop construction
    ("spec None", lambda: loop_with([None]), PluginError,
     r"plugins\[0\] = None: None is not a plugin\. Accepted plugin specs: a plugin object"),
    ("spec int", lambda: loop_with([5]), PluginError,
     r"plugins\[0\] = 5: a number \(int 5\) is not a plugin\. Accepted plugin specs"),
    ("spec 3-tuple", lambda: loop_with([("fake", {}, 3)]), PluginError,
     r"plugins\[0\] = \('fake', \{\}, 3\): a tuple of 3 item\(s\) is not a plugin spec; a pair is "
     r"\(name, options\)"),
    ("spec 1-list", lambda: loop_with([["fake"]]), PluginError,
     r"plugins\[0\] = \['fake'\]: a list of 1 item\(s\) is not a plugin spec"),
    ("plugins bare string", lambda: loop_with("checkpoint"), PluginError,
     r"plugins='checkpoint' is a single string, which would be read letter by letter; give a list "
     r"of specs: plugins=\['checkpoint'\]"),
    ("plugins one pair", lambda: loop_with(("checkpoint", {"dirpath": "x"})), PluginError,
     r"plugins=\('checkpoint', \{'dirpath': 'x'\}\) is one \(name, options\) pair; give a list"),
    ("plugins an object", lambda: loop_with(Plugin()), PluginError,
     r"plugins=<.*Plugin object.*> \(Plugin\) is not a list of plugin specs"),
    ("spec a class", lambda: loop_with([Plugin]), PluginError,
     r"plugins\[0\] = <class .*Plugin'>: Plugin is a class, not an instance: its hook methods need "
     r"self\. Pass an instance, Plugin\(\.\.\.\)"),
    ("named class", lambda: loop_with([("mine", Plugin)]), PluginError,
     r"plugins\[0\] = \('mine', <class .*Plugin'>\): Plugin is a class, not an instance"),
    ("spec a function", lambda: loop_with([lambda loop: None]), PluginError,
     r"plugins\[0\] = <function .*: a function \('.*<lambda>'\) is not a plugin"),
    ("options a string", lambda: loop_with([("checkpoint", "runs/ckpt")]), PluginError,
     r"plugins\[0\] = \('checkpoint', 'runs/ckpt'\): the options of 'checkpoint' must be a mapping "
     r"of keyword arguments \(or None\); got str 'runs/ckpt'"),
    ("options a list in a mapping", lambda: loop_with({"checkpoint": ["runs"]}), PluginError,
     r"plugins\['checkpoint'\] = \('checkpoint', \['runs'\]\): the options of 'checkpoint' must be "
     r"a mapping"),
    ("options an int", lambda: loop_with({"checkpoint": 3}), PluginError,
     r"the options of 'checkpoint' must be a mapping of keyword arguments \(or None\); got int 3"),
    ("pair without a name", lambda: loop_with([(3, {})]), PluginError,
     r"plugins\[0\] = \(3, \{\}\): the first item of a \(name, options\) pair must be a plugin name "
     r"\(a string\); got int 3"),
    ("mapping key not a name", lambda: loop_with({3: {}}), PluginError,
     r"plugins mapping key 3 \(int\) is not a plugin name"),
    ("empty name", lambda: loop_with([""]), PluginError,
     r"plugins\[0\] = '': an installed plugin name must be a non-empty string; got ''"),
    ("one instance twice", same_plugin_twice, PluginError,
     r"plugins\[1\] = <.*Plugin object.*>: plugin object .* is already registered as 'Plugin': one "
     r"instance is registered once \(it was given twice\); to run two of one kind, build a second "
     r"instance"),
    ("unmarked misspelled hook", lambda: loop_with([Misspelled()]), PluginError,
     r"plugin 'Misspelled': method Misspelled\.on_train_batch_ned looks like a hook, but no hook is "
     r"named 'on_train_batch_ned'; did you mean 'on_train_batch_end'\?.*If it is not meant as a "
     r"hook, list it in the attribute hookloop_not_hooks = \('on_train_batch_ned',\)"),
    ("marked misspelled hook", lambda: loop_with([MarkedMisspelled()]), PluginError,
     r"plugin 'MarkedMisspelled' implements unknown hook 'on_fit_strat'; did you mean 'on_fit_start'"),
    ("bad hookloop_not_hooks", lambda: loop_with([BadNotHooks()]), PluginError,
     r"plugin 'BadNotHooks': hookloop_not_hooks=3; expected a tuple of method names"),
    # 2. data, at construction or at fit start
    ("train_data not iterable", lambda: tiny_loop(train_data=5), TypeError,
     r"train_data must be an iterable of batches \(a DataLoader, a list of batches, \.\.\.\); got int 5"),
    ("train_data a string", lambda: tiny_loop(train_data="data.csv"), TypeError,
     r"train_data must be an iterable of batches .*; got str 'data\.csv'"),
    ("val_data not iterable", lambda: tiny_loop(val_data=object()), TypeError,
     r"val_data must be an iterable of batches .*; got object <object object"),
    ("loss_fn not callable", lambda: tiny_loop(loss_fn="mse"), TypeError,
     r"loss_fn must be callable; got str 'mse'"),
    ("step_fn not callable", lambda: tiny_loop(step_fn=3), TypeError,
     r"step_fn must be callable; got int 3"),
    ("val_metrics a list", lambda: tiny_loop(val_metrics=["acc"]), TypeError,
     r"val_metrics must be a mapping of name to fn\(output, target\); got list \['acc'\]"),
    ("val_metrics value", lambda: tiny_loop(val_metrics={"acc": "accuracy"}), TypeError,
     r"val_metrics\['acc'\] must be callable; got str 'accuracy'"),
    ("train_data empty list", lambda: tiny_loop(train_data=[]).fit(max_epochs=1), ValueError,
     r"train_data \(list\) is empty \(len 0\): there is nothing to train on\. Check the dataset"),
    ("train_data empty DataLoader",
     lambda: tiny_loop(train_data=torch.utils.data.DataLoader(
         torch.utils.data.TensorDataset(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)),
         batch_size=8, drop_last=True)).fit(max_epochs=1), ValueError,
     r"train_data \(DataLoader\) is empty \(len 0\).*drop_last=True"),
    ("train_data empty stream", lambda: tiny_loop(train_data=EmptyStream()).fit(max_epochs=1),
     ValueError, r"train_data \(EmptyStream\) yielded no batches in epoch 0: there is nothing to "
     r"train on\. Check the dataset"),
    ("resume a path", lambda: fit_with_resume("runs/ckpt/last.pt"), TypeError,
     r"resume must be a checkpoint dict made by loop\.state_dict\(\); got str 'runs/ckpt/last\.pt' "
     r"\(a path: load it first"),
    ("resume a number", lambda: fit_with_resume(3), TypeError,
     r"resume must be a checkpoint dict made by loop\.state_dict\(\); got int 3$"),
    ("max_epochs zero", lambda: tiny_loop().fit(max_epochs=0), ValueError,
     r"max_epochs must be a positive int; got 0"),
    ("both limits", lambda: tiny_loop().fit(max_epochs=1, max_steps=3), ValueError,
     r"give exactly one of max_epochs or max_steps"),
    # 3. control calls where they would act silently
    ("skip_optimizer_step outside fit", lambda: tiny_loop().skip_optimizer_step(), RuntimeError,
     r"loop\.skip_optimizer_step\(\) called outside fit: no optimizer step is pending\. Call it "
     r"during a batch, before its step"),
    ("skip_optimizer_step after the step",
     lambda: fit_with(calls("on_train_batch_end", lambda loop: loop.skip_optimizer_step())),
     RuntimeError, r"skip_optimizer_step\(\) called after the optimizer step of batch 0 "
     r"\(on_train_batch_end\): no optimizer step is pending"),
    ("skip_optimizer_step at epoch start",
     lambda: fit_with(calls("on_train_epoch_start", lambda loop: loop.skip_optimizer_step())),
     RuntimeError, r"skip_optimizer_step\(\) called in on_train_epoch_start of epoch 0"),
    ("skip_optimizer_step in validation",
     lambda: fit_with(calls("on_validation_start", lambda loop: loop.skip_optimizer_step())),
     RuntimeError, r"skip_optimizer_step\(\) called during validation"),
    ("skip_optimizer_step at fit start",
     lambda: fit_with(calls("on_fit_start", lambda loop: loop.skip_optimizer_step())),
     RuntimeError, r"skip_optimizer_step\(\) called between training epochs"),
    ("stop_epoch in validation",
     lambda: fit_with(calls("on_validation_end", lambda loop: loop.stop_epoch())),
     RuntimeError, r"loop\.stop_epoch\(\) called during validation: no training epoch is running, "
     r"so there is no epoch to end\..*to stop training, call loop\.request_stop\(reason\)"),
    ("stop_epoch at epoch end",
     lambda: fit_with(calls("on_train_epoch_end", lambda loop: loop.stop_epoch())),
     RuntimeError, r"stop_epoch\(\) called between training epochs \(on_resume, on_fit_start or "
     r"on_train_epoch_end\)"),
    ("stop_epoch in validate()", lambda: tiny_loop([calls(
        "on_validation_start", lambda loop: loop.stop_epoch())]).validate(), RuntimeError,
     r"stop_epoch\(\) called during validation \(outside fit\)"),
    ("stop_epoch outside fit", lambda: tiny_loop().stop_epoch(), RuntimeError,
     r"stop_epoch\(\) called outside fit"),
    ("request_stop in on_fit_end",
     lambda: fit_with(calls("on_fit_end", lambda loop: loop.request_stop("late"))),
     RuntimeError, r"loop\.request_stop\('late'\) called in on_fit_end, after the fit ended: there "
     r"is no training left to stop \(stop_reason: 'max_epochs'\)"),
    ("request_stop outside fit", lambda: tiny_loop().request_stop("early"), RuntimeError,
     r"loop\.request_stop\('early'\) called outside fit: there is no training left to stop"),
    # 4. resume mismatches: ResumeError before anything changes
    ("resume other model", load_into_other_model, ResumeError,
     r"nothing was restored:\n  model: unexpected keys in the checkpoint: \['2\.weight', "
     r"'2\.bias'\]\n  model: 0\.weight has shape \(16, 4\) in the checkpoint and \(3, 4\)"),
    ("resume other optimizer", load_into_other_optimizer, ResumeError,
     r"nothing was restored:\n  optimizer\[0\]: the checkpoint holds a SGD; the loop has a Adam"),
    ("resume bad format", load_bad_format, ResumeError,
     r"not a hookloop loop state \(format='something-else/9'"),
    ("resume not a dict", load_not_a_dict, ResumeError,
     r"a checkpoint is a dict made by loop\.state_dict\(\); got list"),
    ("resume changes nothing", untouched_after_failed_resume, ResumeError,
     r"nothing was restored \(checked\)"),
]


@pytest.mark.parametrize(("make", "exc", "pattern"), [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(make: Callable[[], Any], exc: type[BaseException],
                                      pattern: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plugin failure summaries and the like
        with pytest.raises(exc, match=pattern):
            make()


# ------------------------------------------------------ 1. the accepted spec forms


def test_every_documented_spec_form_is_accepted(fake_dist: Path) -> None:
    mine = Plugin()
    with pytest.warns(RuntimeWarning, match="fake_broken"):
        loop = Loop(tiny_model(), None, None, autoload=False, plugins=[
            mine,                                                   # an object
            "fake",                                                 # an installed name
            ("fake", {"scale": 2.0, "hookloop_name": "fake_t"}),    # a tuple pair, named
            ["fake", {"scale": 3.0, "hookloop_name": "fake_l"}],    # a list pair (JSON, YAML)
            {"fake": {"scale": 4.0, "hookloop_name": "fake_m"}},    # a mapping item (YAML)
            ("chosen", Plugin()),                                   # a named object
        ])
    assert list(loop.pm.plan()["on_train_batch_end"]) == ["fake", "fake_t", "fake_l", "fake_m"]
    assert [loop.get_plugin(n).scale for n in ("fake", "fake_t", "fake_l", "fake_m")] == [1, 2, 3, 4]
    assert loop.get_plugin("Plugin") is mine and loop.get_plugin("chosen") is not None
    loop2 = Loop(tiny_model(), None, None, autoload=False,
                 plugins={"fake": {"scale": 5.0}, "mine": Plugin()})  # the mapping form
    assert loop2.get_plugin("fake").scale == 5.0 and loop2.get_plugin("mine") is not None


def test_two_specs_for_one_name_name_the_right_spec(fake_dist: Path) -> None:
    with pytest.warns(RuntimeWarning, match="fake_broken"), pytest.raises(
        PluginError,
        match=r"plugins\[2\] = \['fake', \{'scale': 3\.0\}\]: plugin 'fake' is already registered; "
              r"options \{'scale': 3\.0\} would be ignored: it was loaded from 'fake' with options "
              r"\{'scale': 2\.0\}.*give this one its own name with the option hookloop_name",
    ):
        loop_with([Plugin(), ("fake", {"scale": 2.0}), ["fake", {"scale": 3.0}]])
    # the same options again, or none, enable the one already there
    loop = loop_with([("fake", {"scale": 2.0}), ("fake", {"scale": 2.0}), "fake"])
    assert loop.pm.plan()["on_train_batch_end"] == ["fake"]
    with pytest.raises(PluginError, match=r"plugins\[1\] = 'fake': cannot load plugin 'fake' as "
                                          r"'fake': that name is taken by <.*Plugin object"):
        loop_with([("fake", Plugin()), "fake"])
    with pytest.raises(PluginError, match=r"option hookloop_name='' must be a non-empty string"):
        loop_with([("fake", {"hookloop_name": ""})])


def test_a_method_named_on_something_can_opt_out() -> None:
    class Helper:
        hookloop_not_hooks = ("on_disk",)

        def on_disk(self, path):  # a helper, not a hook
            return path

        def on_fit_start(self, loop):
            pass

    loop = loop_with([Helper()])
    assert loop.pm.plan()["on_fit_start"] == ["Helper"]


# ------------------------------------------------------ 2. data


def test_a_generator_warns_at_construction_and_stops_when_exhausted() -> None:
    batches = tiny_data(32, 8, 0)
    with pytest.warns(RuntimeWarning, match=r"train_data is an iterator \(generator\): it can be "
                                            r"iterated once"):
        loop = tiny_loop(train_data=(b for b in batches), val_data=None)
    rec = HookRecorder(["on_train_epoch_end", "on_fit_end"])
    loop.add_plugins([rec])
    with pytest.warns(RuntimeWarning, match=r"train_data \(generator\) yielded no batches in epoch 1 "
                                            r"after 4 in earlier epochs: an iterator or generator "
                                            r"can be iterated only once; training stops"):
        state = loop.fit(max_epochs=5)
    assert state.global_step == 4 and state.epoch == 1
    assert state.stop_reason == "train_data exhausted"
    assert rec.names() == ["on_train_epoch_end", "on_fit_end"]  # epoch 1 did not "complete"


def test_val_data_without_len_and_iterators_for_validation_warn() -> None:
    with pytest.warns(RuntimeWarning, match=r"val_data is an iterator .*later validations see no "
                                            r"batch"):
        tiny_loop(val_data=iter(tiny_data(16, 8, 1)))


# ------------------------------------------------------ 3. control calls: their effects


def test_request_stop_in_on_fit_start_runs_no_epoch() -> None:
    rec = HookRecorder(["on_train_epoch_start", "on_train_epoch_end", "on_fit_end"])
    loop = tiny_loop([calls("on_fit_start", lambda loop: loop.request_stop("not today")), rec])
    state = loop.fit(max_epochs=3)
    assert state.global_step == 0 and state.stop_reason == "not today"
    assert rec.names() == ["on_fit_end"]


def test_stops_in_on_train_epoch_start_run_no_batch() -> None:
    class SkipFirstEpoch:
        def on_train_epoch_start(self, loop, epoch):
            if epoch == 0:
                loop.stop_epoch()

    loop = tiny_loop([SkipFirstEpoch()])
    loop.fit(max_epochs=3)
    assert loop.state.global_step == 16  # 8 batches in each of epochs 1 and 2

    rec = HookRecorder(["on_train_batch_end", "on_validation_end", "on_train_epoch_end"])
    loop = tiny_loop([calls("on_train_epoch_start", lambda loop: loop.request_stop("now")), rec])
    state = loop.fit(max_epochs=3)
    assert state.global_step == 0 and state.stop_reason == "now"
    assert rec.names() == ["on_validation_end", "on_train_epoch_end"]


def test_a_skip_acts_on_its_own_batch_only_and_a_stop_on_its_own_fit() -> None:
    steps: list[bool] = []

    class SkipBatchTwo:
        def on_train_batch_start(self, loop, batch_idx):
            if batch_idx == 2:
                loop.skip_optimizer_step()

        def on_train_batch_end(self, loop):
            steps.append(loop.state.stepped)

    loop = tiny_loop([SkipBatchTwo()])
    loop.fit(max_epochs=1)
    assert steps == [True, True, False, True, True, True, True, True]

    class StopAtStep:
        def on_train_batch_end(self, loop):
            if loop.state.global_step == 3:
                loop.request_stop("three")

        def on_train_epoch_start(self, loop, epoch):
            pass

    loop = tiny_loop([StopAtStep()])
    assert loop.fit(max_steps=10).global_step == 3
    state = loop.fit(max_steps=6)  # a new fit starts with the stop flag cleared
    assert state.global_step == 6 and state.stop_reason == "max_steps"


def test_a_skip_in_an_unfinished_accumulation_window_does_not_carry_over() -> None:
    stepped: list[tuple[int, bool]] = []

    class SkipLastMicroBatch:
        def on_train_batch_start(self, loop, batch_idx):
            if loop.state.epoch == 0 and batch_idx == 7:
                loop.skip_optimizer_step()  # the window (7, 8) is never finished

        def on_train_batch_end(self, loop, batch_idx):
            stepped.append((loop.state.epoch, loop.state.stepped))

    loop = tiny_loop([SkipLastMicroBatch()], train_data=_Unsized(tiny_data(56, 8, 0)), grad_accum=2)
    loop.fit(max_epochs=2)
    assert [s for e, s in stepped if e == 1][1] is True  # epoch 1's first step ran


class _Unsized:
    """Batches without a length (the loop cannot see the last window coming)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


# ------------------------------------------------------ 5. entry points


def test_a_name_registered_by_two_distributions_is_reported_and_chosen_deterministically(
    fake_dist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for order in ("clash first", "clash last"):
        if order == "clash first":
            monkeypatch.syspath_prepend(str(CLASH_SITE))
        else:
            monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(CLASH_SITE)]
                                + [str(CLASH_SITE)])
        with pytest.warns(RuntimeWarning) as record:
            found = available_plugins(refresh=True)
        text = "\n".join(str(w.message) for w in record)
        assert ("the name 'fake' in entry-point group 'hookloop' is registered by 2 distributions: "
                "hookloop-fake 0.1.0 (hookloop_fake:FakeCounter), hookloop-fake-clash 0.1.0 "
                "(hookloop_fake_clash:OtherCounter); using hookloop-fake's") in text, order
        assert found["fake"].distribution == "hookloop-fake"
        assert found["fake"].shadowed == ["hookloop-fake-clash 0.1.0 (hookloop_fake_clash:OtherCounter)"]


@pytest.mark.parametrize(
    ("name", "installed", "expected", "unexpected"),
    [
        ("earlystopping", ["early_stopping"], r"did you mean 'early_stopping'\?$", "pip install"),
        ("earlystopping", [], r"did you mean 'early_stopping' \(not installed: pip install "
                              r"hookloop-earlystopping\)\?", None),
        ("EarlyStopping", ["early_stopping", "checkpoint"], r"did you mean 'early_stopping'", None),
        ("chekpoint", ["checkpoint"], r"did you mean 'checkpoint'", "pip install"),
        ("gradual_unfreeze", [], r"provided by the distribution hookloop-freeze: pip install "
                                 r"hookloop-freeze", None),
        ("tensorboard", ["checkpoint"], r"pip install hookloop-tensorboard", None),
        ("myplugin", ["checkpoint"], r"\(available: checkpoint\); install the distribution that "
                                     r"provides it, or pass the plugin object itself", "pip install"),
    ],
)
def test_missing_plugin_names_get_near_misses_and_real_distributions(
    name: str, installed: list[str], expected: str, unexpected: str | None
) -> None:
    found = {n: AvailablePlugin(n, "x", "0") for n in installed}
    text = missing_plugin_message(name, found)
    assert text.startswith(f"no hookloop plugin named {name!r} is installed")
    assert re.search(expected, text), text
    if unexpected:
        assert unexpected not in text
    assert "hookloop-myplugin" not in text


def test_a_near_miss_through_loop(fake_dist: Path) -> None:
    with pytest.warns(RuntimeWarning, match="fake_broken"), pytest.raises(
        PluginError, match=r"plugins\[0\] = 'fak': no hookloop plugin named 'fak' is installed "
                           r"\(available: .*\); did you mean 'fake'"
    ):
        loop_with(["fak"])
