"""The hook contract: firing order as documented, docs in sync with the hookspecs, and
every hook exercised by a test."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from hookloop import hookimpl, hookspecs
from hookloop.plugins import HOOK_NAMES
from hookloop.testing import HookRecorder, tiny_data, tiny_loop

DOCS = Path(__file__).parent.parent / "docs"


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_hooks", DOCS / "gen_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_order() -> list[str]:
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- firing-order:start -->\n```text\n(.*?)```", text, re.S)
    assert block, "docs/hooks.md lost its firing-order block"
    return block.group(1).split()


def test_firing_order_matches_docs() -> None:
    rec = HookRecorder()
    loop = tiny_loop([rec], train_data=tiny_data(16, 8), val_data=tiny_data(8, 8, 1),
                     log_every_n_steps=2)
    loop.fit(max_epochs=2)
    assert rec.names() == documented_order()
    # the arguments match the documented meaning
    starts = rec.of("on_train_epoch_start")
    assert [c.kwargs["epoch"] for c in starts] == [0, 1]
    ends = rec.of("on_train_batch_end")
    assert [c.kwargs["batch_idx"] for c in ends] == [0, 1, 0, 1]
    logs = rec.logged()
    assert [s for s, _ in logs] == [2, 2, 2, 4, 4, 4]
    assert set(logs[0][1]) == {"train/loss"}
    assert set(logs[1][1]) == {"train/loss_epoch"}
    assert set(logs[2][1]) == {"val/loss", "val/acc"}
    epoch_end = rec.of("on_train_epoch_end")[0].kwargs["metrics"]
    assert set(epoch_end) == {"train/loss_epoch", "val/loss", "val/acc"}
    assert all(type(v) is float for _, m in logs for v in m.values())


def test_docs_generated_from_hookspecs() -> None:
    gen = _gen_module()
    expected = gen.render(documented_order())
    actual = (DOCS / "hooks.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/hooks.md is stale: run python docs/gen_hooks.py"


def test_every_hook_is_documented_in_its_spec() -> None:
    for name in HOOK_NAMES:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "fires" in doc.lower() or "fire" in doc.lower(), f"{name}: say when it fires"
        for arg in getattr(hookspecs, name).__code__.co_varnames[
            : getattr(hookspecs, name).__code__.co_argcount
        ]:
            assert f":param {arg}:" in doc, f"{name}: argument {arg!r} undocumented"
        assert "return" in doc.lower(), f"{name}: say what a return value means"
    assert sorted(HOOK_NAMES) == sorted(n for n in hookspecs.__all__ if n != "ALIASES")
    assert set(hookspecs.ALIASES.values()) <= set(HOOK_NAMES)


class _Announcer:
    """Fires on_checkpoint_saved the way the checkpoint plugin does."""

    @hookimpl
    def on_train_epoch_end(self, loop, metrics):
        h = loop.callers.on_checkpoint_saved
        if h is not None:
            h(loop, "/tmp/x.pt", dict(metrics), True)
        h = loop.callers.on_checkpoint_removed
        if h is not None:
            h(loop, "/tmp/x.pt")
        loop.log_text("note", "hello")
        loop.log_image("img", torch.zeros(3, 2, 2))
        loop.log_histogram("weights", loop.module[0].weight)
        loop.log_graph(torch.zeros(1, 4))
        loop.log_mesh("cloud", torch.zeros(1, 5, 3))
        loop.state_dict()


def test_every_hook_fires_in_some_run() -> None:
    rec = HookRecorder()
    loop = tiny_loop([_Announcer(), rec])
    loop.fit(max_epochs=1)
    loop.load_state_dict(loop.state_dict())
    loop.close()

    class Boom:
        def on_train_batch_start(self, batch_idx):
            raise RuntimeError("boom")

    loop2 = tiny_loop([Boom(), rec])
    with pytest.raises(RuntimeError, match="boom"):
        loop2.fit(max_epochs=1)
    assert set(rec.names()) == set(HOOK_NAMES)
    text = rec.of("on_log_text")[0].kwargs
    assert text["name"] == "note" and text["text"] == "hello"
    assert rec.of("on_checkpoint_saved")[0].kwargs["is_best"] is True
    assert rec.of("on_checkpoint_removed")[0].kwargs["path"] == "/tmp/x.pt"
    hist = rec.of("on_log_histogram")[0].kwargs
    assert hist["values"].shape == (64,) and hist["values"].device.type == "cpu"
    assert rec.of("on_log_graph")[0].kwargs["model"] is loop.module
    assert rec.of("on_log_mesh")[0].kwargs["faces"] is None
    assert isinstance(rec.of("on_exception")[0].kwargs["exception"], RuntimeError)


def test_firing_order_with_a_resume_and_the_alias_names() -> None:
    """The documented order holds for a resumed fit, and a plugin written with the alias
    names is called exactly where the canonical hooks fire."""

    class Aliased:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def on_batch_end(self) -> None:
            self.calls.append("on_train_batch_end")

        def on_epoch_end(self) -> None:
            self.calls.append("on_train_epoch_end")

    data = {"train_data": tiny_data(16, 8), "val_data": tiny_data(8, 8, 1), "log_every_n_steps": 2}
    first = tiny_loop(**data)
    first.fit(max_epochs=1)
    ckpt = first.state_dict()
    rec, aliased = HookRecorder(), Aliased()
    loop = tiny_loop([rec, aliased], **data)
    loop.fit(max_epochs=2, resume=ckpt)
    order = documented_order()
    second_epoch = order[order.index("on_train_epoch_end") + 1:]
    # fit(resume=...) skips on_resume; the restore fires on_load_checkpoint first
    assert rec.names() == ["on_load_checkpoint", "on_fit_start", *second_epoch]
    canonical = [n for n in rec.names() if n in ("on_train_batch_end", "on_train_epoch_end")]
    assert aliased.calls == canonical
