"""Test helpers for hookloop and plugin authors: a hook recorder, a host-device sync
guard, a tiny model and data, a helper that runs a plugin through a short fit, and a
snapshot of a finished run to prove that a resumed run ends where an uninterrupted one
does (:func:`snapshot_run`, :func:`assert_same_run`).

Typical plugin test::

    from hookloop.testing import run_plugin

    def test_my_plugin(tmp_path):
        loop, rec = run_plugin(MyPlugin(tmp_path), max_epochs=2)
        assert rec.names().count("on_train_epoch_end") == 2

Proving that a plugin's state resumes: run once without interruption, once crashing
after a ``loop.state_dict()`` was saved and resuming in a new loop, then compare::

    expected = snapshot_run(full_loop, full_recorder)
    resumed = snapshot_run(new_loop, new_recorder)
    resumed.log = crashed_recorder.logged() + resumed.log
    assert_same_run(expected, resumed)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hookloop import hookspecs
from hookloop.loop import Loop
from hookloop.plugins import HOOK_NAMES, hookimpl
from hookloop.testing.mounts import tmpfs_mount_prefix, unmount
from hookloop.testing.syncguard import SyncEvent, SyncGuard

__all__ = [
    "HookCall",
    "HookRecorder",
    "RunSnapshot",
    "SyncEvent",
    "SyncGuard",
    "assert_same_run",
    "find_in_files",
    "run_differences",
    "run_plugin",
    "snapshot_run",
    "tiny_data",
    "tiny_loop",
    "tiny_model",
    "tmpfs_mount_prefix",
    "unmount",
]


@dataclass
class HookCall:
    """One recorded hook call: its name and the arguments it received (``loop``
    left out)."""

    name: str
    kwargs: dict[str, Any]
    step: int
    epoch: int


def _make_recorder_class() -> type:
    namespace: dict[str, Any] = {"hookimpl": hookimpl}
    lines = ["class _Base:"]
    aliases = getattr(hookspecs, "ALIASES", {})
    for name in HOOK_NAMES:
        if name in aliases:  # a second name of a hook: only canonical names are implemented
            continue
        spec = getattr(hookspecs, name)
        args = list(spec.__code__.co_varnames[: spec.__code__.co_argcount])
        kw = ", ".join(f"{a!r}: {a}" for a in args if a != "loop")
        lines += [
            "    @hookimpl",
            f"    def {name}(self, {', '.join(args)}):",
            f"        self._record({name!r}, loop, {{{kw}}})",
        ]
    exec("\n".join(lines), namespace)
    return namespace["_Base"]


class HookRecorder(_make_recorder_class()):  # type: ignore[misc]
    """A plugin that implements every hook and records each call in order.

    :param hooks: record only these hook names (default: all).
    """

    def __init__(self, hooks: Sequence[str] | None = None) -> None:
        self.only = set(hooks) if hooks is not None else None
        self.calls: list[HookCall] = []

    def _record(self, name: str, loop: Any, kwargs: dict[str, Any]) -> None:
        if self.only is None or name in self.only:
            state = loop.state
            self.calls.append(HookCall(name, kwargs, state.global_step, state.epoch))

    def names(self) -> list[str]:
        """The hook names in call order."""
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[HookCall]:
        """The calls of one hook."""
        return [c for c in self.calls if c.name == name]

    def logged(self) -> list[tuple[int, dict[str, float]]]:
        """Every ``on_log`` call as ``(step, metrics)``."""
        return [(c.kwargs["step"], c.kwargs["metrics"]) for c in self.of("on_log")]


def find_in_files(roots: Sequence[Any], needles: Sequence[str]) -> list[str]:
    """``"<file>: <needle>"`` for every needle found in the bytes of any file under
    ``roots`` (folders or files); an empty list means none was written anywhere. Used
    to prove that secrets never reach what a tracker writes."""
    from pathlib import Path

    hits = []
    for root in map(Path, roots):
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def tiny_model(seed: int = 0, in_features: int = 4, classes: int = 3) -> nn.Module:
    """A small two-layer classifier, seeded."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def tiny_data(
    n: int = 64, batch_size: int = 8, seed: int = 0, in_features: int = 4, classes: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of ``(x, y)`` batches of a learnable classification problem."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    # the same labelling rule for every seed, so validation data matches training data
    w = torch.randn(in_features, classes, generator=torch.Generator().manual_seed(1234))
    y = (x @ w).argmax(dim=1)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(dim=1) == target).float().mean()


def tiny_loop(plugins: Sequence[Any] = (), *, seed: int = 0, lr: float = 0.1, **kwargs: Any) -> Loop:
    """A :class:`Loop` over :func:`tiny_model` and :func:`tiny_data` with validation
    (``val/loss``, ``val/acc``), cross-entropy and SGD; ``kwargs`` go to ``Loop``."""
    torch.manual_seed(seed)
    model = kwargs.pop("model", None)
    model = tiny_model(seed) if model is None else model
    kwargs.setdefault("val_data", tiny_data(32, 8, seed + 1))
    kwargs.setdefault("loss_fn", nn.functional.cross_entropy)
    kwargs.setdefault("val_metrics", {"acc": _accuracy})
    kwargs.setdefault("log_every_n_steps", 4)
    kwargs.setdefault("autoload", False)
    optimizer = kwargs.pop("optimizer", None)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train = kwargs.pop("train_data", None)
    train = tiny_data(64, 8, seed) if train is None else train
    return Loop(model, optimizer, train, plugins=list(plugins), **kwargs)


def run_plugin(
    plugin: Any, *, max_epochs: int | None = 2, max_steps: int | None = None, **kwargs: Any
) -> tuple[Loop, HookRecorder]:
    """Run ``plugin`` (an object or an installed plugin name) through a short fit of
    :func:`tiny_loop` with a :class:`HookRecorder` after it; returns both."""
    recorder = HookRecorder()
    plugins = [*kwargs.pop("plugins", []), plugin, recorder]
    loop = tiny_loop(plugins, **kwargs)
    if max_steps is not None:
        max_epochs = None
    loop.fit(max_epochs=max_epochs, max_steps=max_steps)
    return loop, recorder


# ---------------------------------------------------------------------- resume checks




from hookloop.testing.compare import (  # noqa: E402  (compare uses HookRecorder from above)
    RunSnapshot,
    assert_same_run,
    run_differences,
    snapshot_run,
)
