"""Compiled dispatch: same semantics as pluggy's HookCaller, proven by running the same
plugins through both paths; frequency filters applied by the plan."""

from __future__ import annotations

import random

import pluggy
import pytest

from hookloop import only
from hookloop._dispatch import PlanEntry, compile_hook
from hookloop.plugins import PluginManager, hookimpl
from hookloop.testing import HookRecorder, tiny_loop

spec = pluggy.HookspecMarker("eq")
impl = pluggy.HookimplMarker("eq")


class Specs:
    @spec
    def plain(self, loop, a, b):
        """test hook"""

    @spec(firstresult=True)
    def first(self, loop, a, b):
        """test hook"""


def _make_plugin(i: int, rng: random.Random, log: list) -> object:
    kind = rng.choice(["plain", "plain", "tryfirst", "trylast", "wrapper", "old_wrapper"])
    args = rng.choice([("loop", "a", "b"), ("a",), ("b", "loop"), (), ("b",)])
    ret = rng.choice([None, i, f"r{i}"])
    opts = {"tryfirst": kind == "tryfirst", "trylast": kind == "trylast",
            "wrapper": kind == "wrapper", "hookwrapper": kind == "old_wrapper"}
    argstr = ", ".join(args)
    ns: dict = {"log": log, "ret": ret, "i": i}
    if kind == "wrapper":
        body = (f"def f(self{', ' if args else ''}{argstr}):\n"
                f"    log.append(('pre', i, ({argstr}{',' if args else ''})))\n"
                "    res = yield\n    log.append(('post', i))\n    return res\n")
    elif kind == "old_wrapper":
        body = (f"def f(self{', ' if args else ''}{argstr}):\n"
                "    log.append(('oldpre', i))\n    outcome = yield\n"
                "    log.append(('oldpost', i))\n")
    else:
        body = (f"def f(self{', ' if args else ''}{argstr}):\n"
                f"    log.append(('call', i, ({argstr}{',' if args else ''})))\n    return ret\n")
    exec(body, ns)
    func = ns["f"]
    attrs = {}
    for hook in ("plain", "first"):
        clone = type(func)(func.__code__, ns, hook)
        attrs[hook] = impl(**opts)(clone)
    return type(f"P{i}", (), attrs)()


@pytest.mark.parametrize("seed", range(80))
def test_compiled_equals_pluggy(seed: int) -> None:
    rng = random.Random(seed)
    log: list = []
    pm = pluggy.PluginManager("eq")
    pm.add_hookspecs(Specs)
    for i in range(rng.randint(0, 7)):
        pm.register(_make_plugin(i, rng, log), name=f"p{i}")
    kwargs = {"loop": "L", "a": 1, "b": 2}
    for hook, firstresult in (("plain", False), ("first", True)):
        log.clear()
        expected = getattr(pm.hook, hook)(**kwargs)
        expected_log = list(log)
        impls = getattr(pm.hook, hook).get_hookimpls()
        entries = [PlanEntry(i) for i in reversed(impls)]
        compiled = compile_hook(hook, ["loop", "a", "b"], entries, firstresult=firstresult)
        log.clear()
        got = compiled(**kwargs) if compiled is not None else ([] if not firstresult else None)
        assert got == expected
        assert log == expected_log
        if compiled is not None:  # positional calls are equivalent too
            log.clear()
            assert compiled("L", 1, 2) == expected
            assert log == expected_log


def test_no_implementation_compiles_to_none() -> None:
    pm = PluginManager()
    assert all(getattr(pm.callers, name) is None for name in pm.plan())

    class P:
        def on_log(self, metrics):
            pass

    pm.register(P())
    assert pm.callers.on_log is not None
    assert pm.callers.on_train_batch_end is None
    pm.unregister(name="P")
    assert pm.callers.on_log is None


def test_manager_call_order_is_registration_order_by_tier() -> None:
    calls: list[str] = []

    def make(name, **opts):
        class P:
            @hookimpl(**opts)
            def on_train_batch_end(self, batch_idx):
                calls.append(name)
                return name

        return P()

    pm = PluginManager()
    for name, opts in [("a", {}), ("b", {"tryfirst": True}), ("c", {"trylast": True}),
                       ("d", {}), ("e", {"tryfirst": True})]:
        pm.register(make(name, **opts), name)
    # tryfirst, normal, trylast; each in registration order (not pluggy's LIFO)
    got = pm.callers.on_train_batch_end(None, None, None, 0)
    assert got == calls == ["b", "e", "a", "d", "c"]
    assert pm.plan()["on_train_batch_end"] == calls


def test_frequency_filters_run_in_the_plan() -> None:
    class Every:
        def __init__(self):
            self.steps, self.once, self.window, self.epochs = [], [], [], []

        @only(every_n_steps=3)
        def on_train_batch_end(self, loop):
            self.steps.append(loop.state.global_step)

        @hookimpl
        @only(once=True)
        def on_train_batch_start(self, loop):
            self.once.append(loop.state.global_step)

        @only(from_step=2, until_step=5)
        def on_before_optimizer_step(self, loop):
            self.window.append(loop.state.global_step)

        @only(every_n_epochs=2)
        def on_train_epoch_end(self, loop, epoch):
            self.epochs.append(epoch)

    p = Every()
    loop = tiny_loop([p])
    loop.fit(max_epochs=4)  # 8 steps per epoch
    assert p.steps == list(range(3, 33, 3))
    assert p.once == [0]
    assert p.window == [2, 3, 4]
    assert p.epochs == [1, 3]
    src = loop.pm.callers.on_train_batch_end.__hookloop_source__
    assert "% 3 == 0" in src  # the filter is compiled in, not a call per step
    loop.fit(max_epochs=5)  # once re-arms for a new fit
    assert p.once == [0, 32]


def test_only_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="every_n_steps=0"):
        only(every_n_steps=0)
    with pytest.raises(ValueError, match="from_step=-1"):
        only(from_step=-1)


def test_wrapper_hooks_keep_pluggy_semantics_in_the_loop() -> None:
    rec = HookRecorder(["on_log"])
    seen = []

    class Wrap:
        @hookimpl(wrapper=True)
        def on_log(self, metrics):
            seen.append(("before", dict(metrics)))
            result = yield
            seen.append(("after", len(result)))
            return result

    loop = tiny_loop([Wrap(), rec])
    loop.fit(max_epochs=1)
    assert len(rec.logged()) == len(seen) // 2 > 0
    assert seen[0][0] == "before" and seen[1] == ("after", 0)


def test_new_style_wrappers_compile_inline_and_see_exceptions() -> None:
    log: list = []

    class Outer:
        @hookimpl(wrapper=True)
        def on_fit_start(self, loop):
            log.append("outer-in")
            try:
                return (yield)
            except ValueError as exc:
                log.append(f"outer-caught {exc}")
                return ["recovered"]

    class Inner:
        @hookimpl(wrapper=True)
        def on_fit_start(self):
            log.append("inner-in")
            result = yield
            log.append("inner-out")
            return result

    class Plain:
        def on_fit_start(self):
            raise ValueError("boom")

    pm = PluginManager()
    for p in (Outer(), Inner(), Plain()):  # the first registered wrapper is the outermost
        pm.register(p)
    assert "_hookexec" not in pm.callers.on_fit_start.__hookloop_source__
    assert pm.callers.on_fit_start(None) == ["recovered"]
    assert log == ["outer-in", "inner-in", "outer-caught boom"]

    class NoYield:
        @hookimpl(wrapper=True)
        def on_fit_end(self):
            return None
            yield  # pragma: no cover

    pm.register(NoYield())
    with pytest.raises(RuntimeError, match="did not yield"):
        pm.callers.on_fit_end(None)
