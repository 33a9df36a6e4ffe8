"""Plugin manager: registration checks, entry points, switches, ordering, fault
policies, CLI and tracing."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hookloop import Loop, PluginError, available_plugins, hookimpl
from hookloop.cli import main as cli_main
from hookloop.plugins import PluginManager
from hookloop.testing import HookRecorder, tiny_loop, tiny_model


def test_unknown_hook_names_plugin_and_hook() -> None:
    class Typo:
        @hookimpl
        def on_train_batch_ned(self, loop):
            pass

    with pytest.raises(PluginError, match=r"'Typo'.*on_train_batch_ned.*did you mean 'on_train_batch_end'"):
        PluginManager().register(Typo())


def test_argument_missing_from_spec_is_an_error() -> None:
    class BadArg:
        def on_log(self, metrics, epoch):
            pass

    with pytest.raises(PluginError, match=r"BadArg.*on_log.*epoch"):
        PluginManager().register(BadArg())


def test_register_modules_and_duplicate_names() -> None:
    mod = types.ModuleType("myplug")
    calls = []
    mod.on_fit_start = lambda loop: calls.append("mod")
    pm = PluginManager()
    assert pm.register(mod) == "myplug"
    assert pm.register(HookRecorder(["on_log"])) == "HookRecorder"
    assert pm.register(HookRecorder(["on_log"])) == "HookRecorder-2"
    pm.callers.on_fit_start(None)
    assert calls == ["mod"]


def test_plugins_called_in_list_order_and_declared_order() -> None:
    calls = []

    def make(name, after=(), before=()):
        cls = type(name, (), {
            "hookloop_after": after, "hookloop_before": before,
            "on_fit_start": lambda self: calls.append(name),
        })
        return cls()

    loop = tiny_loop([make("a"), make("b"), make("c")])
    loop.pm.callers.on_fit_start(loop)
    assert calls == ["a", "b", "c"]
    calls.clear()
    # "tracker" declares it runs after "producer" although listed first
    loop = tiny_loop([make("tracker", after=("producer",)), make("x"), make("producer")])
    loop.pm.callers.on_fit_start(loop)
    assert calls == ["x", "producer", "tracker"]
    assert loop.pm.plan()["on_fit_start"] == ["x", "producer", "tracker"]
    with pytest.raises(PluginError, match="cycle"):
        tiny_loop([make("p", after=("q",)), make("q", after=("p",))])


def test_plan_is_printable() -> None:
    class Filtered:
        hookloop_on_error = "warn"

        @hookimpl(tryfirst=True)
        def on_train_batch_end(self):
            pass

    pm = PluginManager()
    pm.register(Filtered())
    text = pm.format_plan()
    assert "on_train_batch_end:\n  1. Filtered  [tryfirst, on_error=warn]" in text
    assert "on_log: (no implementations; not called)" in text


# -------------------------------------------------------------- fault policies


class Failing:
    def __init__(self, policy: str, max_failures: int = 3):
        self.hookloop_on_error = policy
        self.hookloop_max_failures = max_failures
        self.calls = 0

    def on_train_batch_end(self):
        self.calls += 1
        raise ValueError("plugin bug")


def test_raise_policy_propagates_and_fires_on_exception() -> None:
    rec = HookRecorder(["on_exception", "on_fit_end"])
    loop = tiny_loop([Failing("raise"), rec])
    with pytest.raises(ValueError, match="plugin bug"):
        loop.fit(max_epochs=1)
    assert rec.names() == ["on_exception"]


def test_warn_policy_keeps_calling_and_others_still_run() -> None:
    bad = Failing("warn")
    rec = HookRecorder(["on_train_batch_end"])
    loop = tiny_loop([bad, rec])
    with pytest.warns(RuntimeWarning, match="'Failing' failed in on_train_batch_end"):
        loop.fit(max_epochs=1)
    assert bad.calls == 8 and len(rec.calls) == 8
    assert loop.plugin_failures and "8 failure(s)" in loop.plugin_failures[0]


def test_disable_policy_stops_after_n_consecutive_failures() -> None:
    bad = Failing("disable", max_failures=2)
    rec = HookRecorder(["on_train_batch_end"])
    loop = tiny_loop([bad, rec])
    with pytest.warns(RuntimeWarning, match="disabled after 2 consecutive failures"):
        loop.fit(max_epochs=1)
    assert bad.calls == 2 and len(rec.calls) == 8
    assert "disabled" in loop.plugin_failures[0]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_never_swallowed(exc: type[BaseException]) -> None:
    class Interrupt:
        hookloop_on_error = "warn"

        def on_train_batch_end(self, batch_idx):
            if batch_idx == 2:
                raise exc()

    rec = HookRecorder(["on_exception"])
    loop = tiny_loop([Interrupt(), rec])
    with pytest.raises(exc):
        loop.fit(max_epochs=1)
    assert isinstance(rec.calls[0].kwargs["exception"], exc)
    assert loop.state.epoch_batches_done == 3


def test_failing_on_exception_does_not_mask_the_crash() -> None:
    class BadHandler:
        def on_exception(self):
            raise OSError("handler broke")

    class Crash:
        def on_train_batch_start(self):
            raise RuntimeError("original")

    with pytest.raises(RuntimeError, match="original"):
        tiny_loop([BadHandler(), Crash()]).fit(max_epochs=1)


def test_bad_policy_is_rejected() -> None:
    class P:
        hookloop_on_error = "ignore"

        def on_log(self):
            pass

    with pytest.raises(PluginError, match="on_error='ignore'"):
        PluginManager().register(P())


def test_rank_zero_only_plugins_are_left_out_on_other_ranks() -> None:
    class Tracker:
        hookloop_rank_zero_only = True

        def on_log(self):
            pass

    pm = PluginManager()
    pm.register(Tracker())
    assert pm.callers.on_log is not None
    pm.set_rank(1)
    assert pm.callers.on_log is None


# -------------------------------------------------------------- entry points


def test_entry_point_plugin_by_name_with_options(fake_dist: Path) -> None:
    with pytest.warns(RuntimeWarning, match="'fake_broken'.*failed to import"):
        found = available_plugins()
    assert found["fake"].distribution == "hookloop-fake" and found["fake"].version == "0.1.0"
    assert found["fake_broken"].error and "not installed" in found["fake_broken"].error
    rec = HookRecorder(["on_log"])
    loop = tiny_loop([("fake", {"scale": 2.0}), rec], autoload=True)
    loop.fit(max_epochs=1)
    fake = loop.get_plugin("fake")
    assert fake.scale == 2.0 and fake.batches == 8
    assert any("fake/batches" in m for _, m in rec.logged())
    # the always-on module was registered by autoload and called
    import hookloop_fake.always as always

    assert always.starts == [0]
    assert loop.state_dict()["plugins"]["fake"] == {"batches": 8}


def test_mapping_form_and_unknown_name(fake_dist: Path) -> None:
    with pytest.warns(RuntimeWarning, match="fake_broken"):
        loop = Loop(tiny_model(), None, None, plugins={"fake": {"scale": 3.0}}, autoload=False)
    assert loop.get_plugin("fake").scale == 3.0
    with pytest.raises(PluginError, match=r"no hookloop plugin named 'nope'.*available: .*fake"):
        Loop(tiny_model(), None, None, plugins=["nope"], autoload=False)
    with pytest.raises(PluginError, match="bad options"):
        Loop(tiny_model(), None, None, plugins={"fake": {"colour": 1}}, autoload=False)


def test_switches(fake_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    loop = Loop(tiny_model(), None, None)
    assert loop.get_plugin("fake_always") is None
    monkeypatch.delenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("HOOKLOOP_BLOCK_PLUGINS", "fake_always,fake_broken")
    found = available_plugins(refresh=True)
    assert found["fake_always"].blocked == "in HOOKLOOP_BLOCK_PLUGINS"
    assert Loop(tiny_model(), None, None).get_plugin("fake_always") is None
    monkeypatch.delenv("HOOKLOOP_BLOCK_PLUGINS")
    monkeypatch.setenv("HOOKLOOP_PLUGINS", "fake")
    found = available_plugins(refresh=True)
    assert found["fake_always"].blocked == "not in HOOKLOOP_PLUGINS"
    assert found["fake"].blocked is None
    with pytest.raises(PluginError, match="blocked"):
        Loop(tiny_model(), None, None, plugins=["fake_always"])
    monkeypatch.setenv("HOOKLOOP_PLUGINS", "")
    assert all(p.blocked for p in available_plugins(refresh=True).values())


def test_cli_lists_plugins_and_plan(fake_dist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(RuntimeWarning):
        assert cli_main(["plugins", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "fake  " in out and "hookloop-fake" in out and "0.1.0" in out
    assert "on_train_batch_end" in out and "always-on" in out
    assert "import failed: ImportError" in out
    assert re.search(r"on_fit_start:\n(  \d+\. .*\n)*  \d+\. fake_always", out)


def test_trace_prints_each_call() -> None:
    code = (
        "from hookloop.testing import tiny_loop, HookRecorder\n"
        "tiny_loop([HookRecorder(['on_fit_start'])]).fit(max_epochs=1)\n"
    )
    env = {**__import__("os").environ, "HOOKLOOP_TRACE": "1", "HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert "[hookloop] on_fit_start -> HookRecorder" in res.stderr
    assert "[hookloop] on_train_batch_end -> HookRecorder" in res.stderr


def test_failed_registration_leaves_nothing_registered() -> None:
    class Wrap:
        @hookimpl(hookwrapper=True)
        def on_log(self):
            yield

    class HalfValid:  # on_fit_start is valid; pluggy refuses on_log, found after it
        def on_fit_start(self):
            pass

        @hookimpl(wrapper=True)
        def on_log(self):
            return None  # not a generator function

    pm = PluginManager()
    pm.register(Wrap())
    half = HalfValid()
    with pytest.raises(PluginError, match=r"'HalfValid'.*generator"):
        pm.register(half)
    assert pm.get_plugins() == {pm.get_plugin("Wrap")}
    assert not pm.is_registered(half) and pm.get_plugin("HalfValid") is None
    assert pm.hook.on_fit_start.get_hookimpls() == []
    assert pm.plan()["on_log"] == ["Wrap"] and pm.plan()["on_fit_start"] == []
    assert pm.callers.on_fit_start is None
    assert [n for n, _ in pm.plugin_items()] == ["Wrap"]
    assert pm.register(object(), "HalfValid") == "HalfValid"  # the name is free again


def test_declared_order_keeps_wrappers_around_plain_impls() -> None:
    calls = []

    class W:
        hookloop_after = ("p",)

        @hookimpl(wrapper=True)
        def on_fit_start(self):
            calls.append("w-before")
            result = yield
            calls.append("w-after")
            return result

    class P:
        def on_fit_start(self):
            calls.append("p")

    pm = PluginManager()
    pm.register(W(), "w")
    pm.register(P(), "p")
    pm.callers.on_fit_start(None)
    assert calls == ["w-before", "p", "w-after"]


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_switch_values_that_mean_off(value: str, monkeypatch: pytest.MonkeyPatch, fake_dist: Path) -> None:
    monkeypatch.setenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD", value)
    with pytest.warns(RuntimeWarning, match="fake_broken"):
        loop = Loop(tiny_model(), None, None)
    assert loop.get_plugin("fake_always") is not None


def test_loading_a_registered_name_again(fake_dist: Path) -> None:
    with pytest.warns(RuntimeWarning, match="fake_broken"):
        loop = Loop(tiny_model(), None, None, plugins=[("fake", {"scale": 2.0})], autoload=False)
    first = loop.get_plugin("fake")
    assert loop.add_plugins(["fake"]) == ["fake"] and loop.get_plugin("fake") is first
    with pytest.raises(PluginError, match=r"'fake' is already registered; options \{'scale': 5.0\}"):
        loop.add_plugins([("fake", {"scale": 5.0})])
