"""Core dispatch contracts: one compiled path for every hook kind, keyword calls,
registration checks, names, ordering, aliases, isolated hooks and readable tracebacks."""

from __future__ import annotations

import functools
import logging
import traceback
import types
import warnings
from typing import Any

import pluggy
import pytest

from hookloop import only
from hookloop.plugins import (
    ISOLATED_HOOKS,
    Callers,
    Hooks,
    PluginError,
    PluginManager,
    available_plugins,
    base_name,
    hookimpl,
)


class State:
    def __init__(self, global_step: int = 0, epoch: int = 0) -> None:
        self.global_step = global_step
        self.epoch = epoch


class FakeLoop:
    def __init__(self, global_step: int = 0) -> None:
        self.state = State(global_step)


# ------------------------------------------------------------------ callers


def test_callers_and_deprecated_hooks_property() -> None:
    pm = PluginManager()
    assert isinstance(pm.callers, Callers) and Hooks is Callers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pm.callers.on_log is None  # no warning on the new name
    with pytest.warns(FutureWarning, match=r"PluginManager.hooks is renamed to PluginManager.callers"):
        assert pm.hooks is pm.callers


# ------------------------------------------------------------------ keyword calls


def test_keyword_only_parameters_are_called_by_keyword() -> None:
    seen = []

    class KwOnly:
        def on_log(self, *, metrics, step, loop=None, unused=7):
            seen.append((dict(metrics), step, loop, unused))

    pm = PluginManager()
    pm.register(KwOnly())
    pm.callers.on_log("L", {"a": 1.0}, 3, 0.5)
    pm.callers.on_log(loop="L", metrics={"a": 2.0}, step=4, time=0.5)
    # parameters with a default are not passed (pluggy's rule)
    assert seen == [({"a": 1.0}, 3, None, 7), ({"a": 2.0}, 4, None, 7)]
    assert "_f0(metrics=metrics, step=step)" in pm.callers.on_log.__hookloop_source__


def test_arguments_bind_by_name_whatever_the_call_form() -> None:
    seen = []

    def forwarding(func):
        @functools.wraps(func)
        def wrapper(self, **kwargs):  # takes keywords only; its signature reads as func's
            return func(self, **kwargs)

        return wrapper

    class Mixed:
        def on_log_text(self, text, name, *, step, time=None):
            seen.append(("mixed", text, name, step, time))

    class Decorated:
        @forwarding
        def on_log_text(self, name, text):
            seen.append(("decorated", name, text))

    pm = PluginManager()
    pm.register(Mixed())
    pm.register(Decorated())
    pm.callers.on_log_text("L", "tag", "hello", 3, 1.0)
    assert seen == [("mixed", "hello", "tag", 3, None), ("decorated", "tag", "hello")]
    src = pm.callers.on_log_text.__hookloop_source__
    assert "_f0(text, name, step=step)" in src and "_f1(name=name, text=text)" in src


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("def on_log(self, metrics, /): pass", r"'metrics' is positional-only"),
        ("def on_log(self, *args): pass", r"'\*args' is not allowed"),
        ("def on_log(self, loop, **kwargs): pass", r"'\*\*kwargs' is not allowed"),
        ("def on_log(self, *, epoch): pass", r"parameter 'epoch'.*does not provide"),
    ],
)
def test_bad_signatures_are_refused_at_registration(source: str, pattern: str) -> None:
    ns: dict[str, Any] = {}
    exec(source, ns)
    plugin = type("Bad", (), {"on_log": ns["on_log"]})()
    pm = PluginManager()
    with pytest.raises(PluginError, match=rf"'Bad'.*Bad\.on_log.*{pattern}.*loop, metrics, step, time"):
        pm.register(plugin)
    assert pm.get_plugins() == set() and pm.callers.on_log is None


# ------------------------------------------------------------------ wrappers and policies


class Plain:
    def __init__(self) -> None:
        self.calls = 0

    def on_fit_start(self, loop):
        self.calls += 1
        return "plain"


def _failing_wrapper(policy: str, where: str) -> Any:
    class W:
        hookloop_on_error = policy
        hookloop_max_failures = 2

        def __init__(self) -> None:
            self.calls = 0

        @hookimpl(wrapper=True)
        def on_fit_start(self):
            self.calls += 1
            if where == "setup":
                raise ValueError("wrapper setup broke")
            result = yield
            if where == "teardown":
                raise ValueError("wrapper teardown broke")
            return [*result, "wrapped"]

    return W()


@pytest.mark.parametrize("where", ["setup", "teardown"])
def test_wrapper_failure_under_warn_policy_is_skipped(where: str) -> None:
    pm = PluginManager()
    w, p = _failing_wrapper("warn", where), Plain()
    pm.register(w)
    pm.register(p)
    with pytest.warns(RuntimeWarning, match=f"'W' failed in on_fit_start: ValueError: wrapper {where}"):
        assert pm.callers.on_fit_start(None) == ["plain"]  # the inner call ran; its result kept
    assert pm.callers.on_fit_start(None) == ["plain"]
    assert p.calls == 2 and w.calls == 2
    assert "2 failure(s) in on_fit_start" in pm.failure_summary()[0]


@pytest.mark.parametrize("where", ["setup", "teardown"])
def test_wrapper_failure_under_disable_policy_disables(where: str) -> None:
    pm = PluginManager()
    w, p = _failing_wrapper("disable", where), Plain()
    pm.register(w)
    pm.register(p)
    with pytest.warns(RuntimeWarning, match="disabled after 2 consecutive failures"):
        for _ in range(4):
            assert pm.callers.on_fit_start(None) == ["plain"]
    assert w.calls == 2 and p.calls == 4
    assert pm.plan()["on_fit_start"] == ["Plain"]


def test_wrapper_failure_under_raise_policy_propagates() -> None:
    pm = PluginManager()
    pm.register(_failing_wrapper("raise", "setup"))
    pm.register(Plain())
    with pytest.raises(ValueError, match="wrapper setup broke"):
        pm.callers.on_fit_start(None)


def test_wrapper_passes_inner_exception_through_under_warn_policy() -> None:
    class W:
        hookloop_on_error = "warn"

        @hookimpl(wrapper=True)
        def on_fit_start(self):
            return (yield)

    class Boom:
        def on_fit_start(self):
            raise KeyError("inner")

    pm = PluginManager()
    pm.register(W())
    pm.register(Boom())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the wrapper did not fail: no warning
        with pytest.raises(KeyError, match="inner"):
            pm.callers.on_fit_start(None)
    assert pm.failure_summary() == []


def test_filters_apply_to_wrappers() -> None:
    calls = []

    class W:
        @hookimpl(wrapper=True)
        @only(every_n_steps=2)
        def on_train_batch_end(self, batch_idx):
            calls.append(("w", batch_idx))
            return (yield)

    class P:
        def on_train_batch_end(self, batch_idx):
            calls.append(("p", batch_idx))

    pm = PluginManager()
    pm.register(W())
    pm.register(P())
    for step in range(4):
        pm.callers.on_train_batch_end(FakeLoop(step), None, None, step)
    assert calls == [("w", 0), ("p", 0), ("p", 1), ("w", 2), ("p", 2), ("p", 3)]


def test_old_style_hookwrapper_is_compiled_and_can_replace_the_result() -> None:
    seen = []

    class Old:
        @hookimpl(hookwrapper=True)
        def on_fit_start(self, loop):
            outcome = yield
            assert isinstance(outcome, pluggy.Result)
            seen.append(outcome.get_result())
            outcome.force_result(["replaced"])

    pm = PluginManager()
    pm.register(Old())
    pm.register(Plain())
    assert "_hookexec" not in pm.callers.on_fit_start.__hookloop_source__
    assert pm.callers.on_fit_start(None) == ["replaced"]
    assert seen == [["plain"]]


def test_old_style_hookwrapper_sees_exceptions() -> None:
    seen = []

    class Old:
        @hookimpl(hookwrapper=True)
        def on_fit_start(self):
            outcome = yield
            seen.append(type(outcome.exception).__name__)

    class Boom:
        def on_fit_start(self):
            raise KeyError("inner")

    pm = PluginManager()
    pm.register(Old())
    pm.register(Boom())
    with pytest.raises(KeyError):
        pm.callers.on_fit_start(None)
    assert seen == ["KeyError"]


def test_firstresult_hook_returns_the_first_non_none() -> None:
    calls = []

    def make(name: str, value: Any) -> Any:
        def on_resume(self, loop):
            calls.append(name)
            return value

        return type(name, (), {"on_resume": on_resume})()

    class Wrap:
        @hookimpl(wrapper=True)
        def on_resume(self):
            result = yield
            calls.append(("wrap saw", result))
            return result

    pm = PluginManager()
    assert pm.callers.on_resume is None
    for p in (make("none", None), make("first", {"step": 1}), make("second", {"step": 2})):
        pm.register(p)
    assert pm.callers.on_resume(None) == {"step": 1}
    assert calls == ["none", "first"]
    calls.clear()
    pm.register(Wrap())
    assert pm.callers.on_resume(None) == {"step": 1}
    assert calls == ["none", "first", ("wrap saw", {"step": 1})]


# ------------------------------------------------------------------ isolated hooks


@pytest.mark.parametrize("hook", ISOLATED_HOOKS)
def test_isolated_hooks_call_every_impl_and_log(hook: str, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def make(name: str, fail: bool) -> Any:
        def impl(self, loop):
            calls.append(name)
            if fail:
                raise OSError(f"{name} broke")

        return type(name, (), {hook: impl})()

    pm = PluginManager()
    for name, fail in (("a", True), ("b", False), ("c", True)):
        pm.register(make(name, fail))
    args = (None, RuntimeError("crash")) if hook == "on_exception" else (None,)
    with caplog.at_level(logging.ERROR, logger="hookloop"):
        assert getattr(pm.callers, hook)(*args) == []
    assert calls == ["a", "b", "c"]
    errors = [r for r in caplog.records if r.name == "hookloop"]
    assert [r.getMessage() for r in errors] == [
        f"hookloop plugin 'a' failed in {hook}", f"hookloop plugin 'c' failed in {hook}"]
    assert all(r.exc_info and isinstance(r.exc_info[1], OSError) for r in errors)
    assert "a broke" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("hook", ISOLATED_HOOKS)
def test_isolated_hooks_let_keyboard_interrupt_through(hook: str) -> None:
    def stop(self):
        raise KeyboardInterrupt

    pm = PluginManager()
    pm.register(type("Stop", (), {hook: stop})())
    args = (None, RuntimeError("crash")) if hook == "on_exception" else (None,)
    with pytest.raises(KeyboardInterrupt):
        getattr(pm.callers, hook)(*args)


@pytest.mark.parametrize("hook", ISOLATED_HOOKS)
def test_isolated_hooks_log_a_plugin_exit(hook: str, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def exits(self):
        raise SystemExit(3)

    @hookimpl(wrapper=True)
    def wrap(self):
        calls.append("before")
        yield
        calls.append("after")

    pm = PluginManager()
    pm.register(type("Wrap", (), {hook: wrap})())
    pm.register(type("Exits", (), {hook: exits})())
    pm.register(type("Later", (), {hook: lambda self: calls.append("later")})())
    args = (None, RuntimeError("crash")) if hook == "on_exception" else (None,)
    with caplog.at_level(logging.ERROR, logger="hookloop"):
        getattr(pm.callers, hook)(*args)
    assert calls == ["before", "later", "after"]
    assert f"hookloop plugin 'Exits' failed in {hook}" in caplog.text and "SystemExit" in caplog.text


# ------------------------------------------------------------------ registration


def test_names_follow_registration_order() -> None:
    class Tracker:
        def on_log(self):
            pass

    class Named:
        hookloop_name = "tb"

    pm = PluginManager()
    first, second, third = Tracker(), Tracker(), Tracker()
    assert pm.register(first) == "Tracker"
    assert pm.register(second) == "Tracker-2"
    assert pm.register(Named()) == "tb" and pm.register(Named()) == "tb-2"
    assert pm.register(third) == "Tracker-3"  # appending never renames the others
    assert pm.get_plugin("Tracker") is first and pm.get_plugin("Tracker-2") is second
    assert [n for n, _ in pm.plugin_items()] == ["Tracker", "Tracker-2", "tb", "tb-2", "Tracker-3"]
    assert pm.plan()["on_log"] == ["Tracker", "Tracker-2", "Tracker-3"]
    assert base_name(third) == "Tracker" and base_name(Named()) == "tb"
    assert base_name(types.ModuleType("mod")) == "mod"


def test_explicit_names_win_and_clashes_are_errors() -> None:
    class Tracker:
        pass

    pm = PluginManager()
    a, b = Tracker(), Tracker()
    assert pm.register(a, "Tracker-2") == "Tracker-2"
    assert pm.register(b) == "Tracker"
    with pytest.raises(PluginError, match=r"as 'Tracker'.*taken by <.*Tracker object"):
        pm.register(Tracker(), "Tracker")
    with pytest.raises(PluginError, match=r"plugin object .*Tracker.* is already registered as 'Tracker'"):
        pm.register(b)
    with pytest.raises(PluginError, match="already registered as 'Tracker-2'"):
        pm.register(a, "other")
    assert pm.register(Tracker()) == "Tracker-3"


def test_unregister_then_register_keeps_order_of_the_rest() -> None:
    calls = []

    def make(name: str) -> Any:
        return type(name, (), {"on_fit_start": lambda self: calls.append(name)})()

    pm = PluginManager()
    for name in "abc":
        pm.register(make(name))
    pm.unregister(name="a")
    pm.register(make("a"))
    pm.callers.on_fit_start(None)
    assert calls == ["b", "c", "a"]
    assert [n for n, _ in pm.plugin_items()] == ["b", "c", "a"]


def test_ordering_declared_by_base_name_survives_renaming() -> None:
    calls = []

    class Producer:
        def on_fit_start(self):
            calls.append("producer")

    class Consumer:
        hookloop_after = ("Producer",)

        def on_fit_start(self):
            calls.append("consumer")

    pm = PluginManager()
    pm.register(Consumer())
    pm.register(Producer(), "metrics_producer")  # a different registered name
    pm.register(Producer())
    pm.callers.on_fit_start(None)
    assert calls == ["producer", "producer", "consumer"]
    assert pm.plan()["on_fit_start"] == ["metrics_producer", "Producer", "Consumer"]


def test_wrappers_run_outside_plain_impls_in_registration_order() -> None:
    calls = []

    def wrapper(name: str, **opts: Any) -> Any:
        @hookimpl(wrapper=True, **opts)
        def on_fit_start(self):
            calls.append(f"{name}<")
            result = yield
            calls.append(f">{name}")
            return result

        return type(name, (), {"on_fit_start": on_fit_start})()

    def old(name: str) -> Any:
        @hookimpl(hookwrapper=True)
        def on_fit_start(self):
            calls.append(f"{name}<")
            yield
            calls.append(f">{name}")

        return type(name, (), {"on_fit_start": on_fit_start})()

    def plain(name: str, **opts: Any) -> Any:
        @hookimpl(**opts)
        def on_fit_start(self):
            calls.append(name)

        return type(name, (), {"on_fit_start": on_fit_start})()

    pm = PluginManager()
    for p in (plain("p1"), wrapper("w1"), plain("p2", trylast=True), old("o1"),
              plain("p3", tryfirst=True), wrapper("w2", tryfirst=True), plain("p4")):
        pm.register(p)
    pm.callers.on_fit_start(None)
    assert calls == ["w2<", "w1<", "o1<", "p3", "p1", "p4", "p2", ">o1", ">w1", ">w2"]


def test_many_wrappers_nest_beyond_one_function() -> None:
    depth = []

    def wrapper(i: int) -> Any:
        @hookimpl(wrapper=True)
        def on_fit_start(self):
            depth.append(i)
            result = yield
            return [*result, i]

        return type(f"W{i}", (), {"on_fit_start": on_fit_start})()

    pm = PluginManager()
    for i in range(12):
        pm.register(wrapper(i))
    pm.register(Plain())
    assert pm.callers.on_fit_start(None) == ["plain", *reversed(range(12))]
    assert depth == list(range(12))


# ------------------------------------------------------------------ aliases


def test_alias_methods_implement_the_canonical_hook() -> None:
    calls = []

    class Marked:
        @hookimpl(tryfirst=True)
        def on_batch_end(self, batch_idx):
            calls.append(("marked", batch_idx))

    class Unmarked:
        def on_epoch_end(self, epoch, metrics):
            calls.append(("unmarked", epoch))

    pm = PluginManager()
    pm.register(Marked())
    pm.register(Unmarked())
    plan = pm.plan()
    assert plan["on_train_batch_end"] == ["Marked"] and plan["on_train_epoch_end"] == ["Unmarked"]
    assert "on_batch_end" not in plan and "on_epoch_end" not in plan
    assert not hasattr(pm.callers, "on_batch_end")
    assert "\non_batch_end" not in pm.format_plan() and "\non_epoch_end" not in pm.format_plan()
    assert "on_train_batch_end:\n  1. Marked  [tryfirst]" in pm.format_plan()
    pm.callers.on_train_batch_end(None, None, None, 5)
    pm.callers.on_train_epoch_end(None, 1, {})
    assert calls == [("marked", 5), ("unmarked", 1)]


def test_both_names_of_one_hook_is_an_error() -> None:
    class Both:
        def on_batch_end(self):
            pass

        def on_train_batch_end(self):
            pass

    pm = PluginManager()
    both = r"'Both'.*on_train_batch_end twice.*Both\.on_batch_end.*Both\.on_train_batch_end"
    with pytest.raises(PluginError, match=both):
        pm.register(Both())
    assert pm.get_plugins() == set()


def test_alias_argument_errors_name_the_method_and_hook() -> None:
    class Bad:
        def on_batch_end(self, step):
            pass

    with pytest.raises(PluginError, match=r"Bad\.on_batch_end \(hook on_train_batch_end\).*'step'"):
        PluginManager().register(Bad())


def test_available_plugins_show_canonical_hook_names(fake_dist: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.warns(RuntimeWarning, match="fake_broken"):
        found = available_plugins()
    entry = found["fake"]
    cls = type("Aliased", (), {"on_batch_end": lambda self: None, "on_log": lambda self: None})
    monkeypatch.setattr(entry, "obj", cls)
    from hookloop.discovery import _impl_names

    assert _impl_names(cls) == ["on_log", "on_train_batch_end"]


# ------------------------------------------------------------------ load and tracebacks


def test_load_accepts_a_name_option(fake_dist: Any) -> None:
    pm = PluginManager()
    with pytest.warns(RuntimeWarning, match="fake_broken"):
        assert pm.load("fake", {"scale": 2.0}) == "fake"
    assert pm.load("fake", {"hookloop_name": "fake_b", "scale": 3.0}) == "fake_b"
    assert pm.get_plugin("fake").scale == 2.0 and pm.get_plugin("fake_b").scale == 3.0
    assert pm.load("fake", {"hookloop_name": "fake_b"}) == "fake_b"  # already there: nothing built
    pm.register(object(), "taken")
    with pytest.raises(PluginError, match="as 'taken': that name is taken"):
        pm.load("fake", {"hookloop_name": "taken"})
    with pytest.raises(PluginError, match="name=3"):
        pm.load("fake", {"hookloop_name": 3})


def test_tracebacks_show_the_generated_plan_line() -> None:
    class Boom:
        def on_log(self, loop, metrics):
            raise ValueError("inside the plugin")

    pm = PluginManager()
    pm.register(Boom())
    try:
        pm.callers.on_log(None, {}, 0, 0.0)
    except ValueError:
        text = traceback.format_exc()
    else:  # pragma: no cover
        raise AssertionError("no exception")
    assert "<hookloop plan on_log " in text
    assert "_r = _f0(loop, metrics)" in text
