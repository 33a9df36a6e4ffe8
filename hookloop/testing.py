"""Test helpers for hookloop and plugin authors: a hook recorder, a host-device sync
guard, a tiny model and data, and a helper that runs a plugin through a short fit.

Typical plugin test::

    from hookloop.testing import run_plugin

    def test_my_plugin(tmp_path):
        loop, rec = run_plugin(MyPlugin(tmp_path), max_epochs=2)
        assert rec.names().count("on_train_epoch_end") == 2
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hookloop import hookspecs
from hookloop.loop import Loop
from hookloop.plugins import HOOK_NAMES, hookimpl

__all__ = [
    "HookCall",
    "HookRecorder",
    "SyncEvent",
    "SyncGuard",
    "find_in_files",
    "run_plugin",
    "tiny_data",
    "tiny_loop",
    "tiny_model",
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


@dataclass
class SyncEvent:
    """One host-device sync point: the operation, where the loop was, the thread that
    raised it and the code that called it.

    :param op: the operation (``"item"``, ``"tolist"``, ``"__bool__"``, ``"to"``...).
    :param step: ``loop.state.global_step`` when it happened (``None`` without a loop).
    :param stage: ``loop.state.stage`` when it happened (``None`` without a loop).
    :param thread: the name of the thread that raised it.
    :param where: ``"file:line in function"`` of the innermost calling frame outside
        torch.
    :param stack: the calling frames, innermost first (at most 12), same format.
    """

    op: str
    step: int | None
    stage: str | None
    thread: str = ""
    where: str = ""
    stack: tuple[str, ...] = ()


# Tensor methods and torch functions that force a host-device sync on an accelerator.
_SYNC_METHODS = (
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
    "__complex__", "__format__", "nonzero", "to",
    "masked_select", "unique", "equal", "allclose", "is_nonzero",
)
_SYNC_FUNCS = ("nonzero", "masked_select", "unique", "equal", "allclose", "is_nonzero")

_STACK_DEPTH = 12
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = __file__

# Guards now active, in entry order; the patches are in place while it is not empty.
_active_guards: list[SyncGuard] = []
# (owner, name, had its own attribute, the original) for every patched attribute
_patched: list[tuple[Any, str, bool, Any]] = []
_guards_lock = threading.Lock()
# per thread: inside a counted operation or a guard's bookkeeping (nothing is counted)
_busy = threading.local()


def _to_cpu(args: Any, kwargs: Any) -> bool:
    target = kwargs.get("device")
    if target is None:
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                target = a
                break
    if target is None:
        return False
    if torch.device(target).type != "cpu":
        return False
    source = args[0] if args else None
    # a copy to the CPU syncs on an accelerator. On a CPU run, an explicit .to("cpu")
    # is counted (it would sync on a GPU run, as .cpu() is); device-agnostic code that
    # moves a tensor to the device it is already on (e.g. to(first_device) inside
    # clip_grad_norm_) is not
    return isinstance(target, str) or (isinstance(source, torch.Tensor) and source.device.type != "cpu")


def _frames(frame: Any) -> tuple[str, tuple[str, ...]]:
    stack: list[str] = []
    where = ""
    while frame is not None and len(stack) < _STACK_DEPTH:
        code = frame.f_code
        text = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        stack.append(text)
        if not where and not code.co_filename.startswith(_TORCH_DIR):
            where = text
        frame = frame.f_back
    return where or (stack[0] if stack else ""), tuple(stack)


def _report(op: str, frame: Any) -> None:
    """Record one sync in every active guard (called with ``_busy.on`` set)."""
    guards = tuple(_active_guards)
    if not guards:
        return
    where, stack = _frames(frame)
    thread = threading.current_thread().name
    for guard in guards:
        guard._hit(op, thread, where, stack)


def _counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    check = _to_cpu if name == "to" else None

    @functools.wraps(original)
    def counted(*args: Any, **kwargs: Any) -> Any:
        if getattr(_busy, "on", False):  # an operation inside a counted one, or bookkeeping
            return original(*args, **kwargs)
        _busy.on = True
        try:
            if check is None or check(args, kwargs):
                _report(name, sys._getframe(1))
            return original(*args, **kwargs)
        finally:
            _busy.on = False

    return counted


def _install_patches() -> None:
    targets = [(torch.Tensor, n) for n in _SYNC_METHODS] + [(torch, n) for n in _SYNC_FUNCS]
    for owner, name in targets:
        if not hasattr(owner, name):
            continue
        own = name in vars(owner)
        original = vars(owner)[name] if own else getattr(owner, name)
        _patched.append((owner, name, own, original))
        setattr(owner, name, _counting(name, getattr(owner, name)))


def _remove_patches() -> None:
    while _patched:
        owner, name, own, original = _patched.pop()
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@dataclass
class SyncGuard:
    """Count host-device synchronisation points raised inside a ``with`` block, by
    every thread of the process.

    While a guard is active the tensor methods that force a sync on an accelerator
    (``item``, ``tolist``, ``numpy``, ``cpu``, ``__bool__``, ``__float__``, ``__int__``,
    ``__index__``, ``__format__``, ``nonzero``, ``masked_select``, ``unique``, ``equal``,
    ``allclose``, ``is_nonzero``, ``to`` a CPU device) and the torch functions
    ``nonzero``, ``masked_select``, ``unique``, ``equal``, ``allclose`` and
    ``is_nonzero`` are replaced process-wide by counting wrappers, so threads started
    before or inside the block are seen too; the originals are put back exactly when
    the last active guard exits (also when the block raises). Nested guards each count
    what happens inside them. An operation called from inside a counted one (``format``
    of a tensor calls ``item``) is counted once. Counting works on every device, so a
    CPU test proves what a GPU run would do. On CUDA the guard also turns on
    ``torch.cuda.set_sync_debug_mode("warn")`` and counts the warnings it raises.

    :param loop: if given, each event records ``loop.state.global_step`` and stage.
    """

    loop: Any = None
    events: list[SyncEvent] = field(default_factory=list)
    cuda_events: int = 0

    def _hit(self, op: str, thread: str = "", where: str = "", stack: tuple[str, ...] = ()) -> None:
        state = getattr(self.loop, "state", None)
        self.events.append(SyncEvent(op, getattr(state, "global_step", None),
                                     getattr(state, "stage", None), thread, where, stack))

    @property
    def count(self) -> int:
        """Number of sync points seen (interception plus CUDA debug warnings)."""
        return len(self.events) + self.cuda_events

    def steps(self) -> set[int | None]:
        """The global steps at which a sync happened."""
        return {e.step for e in self.events}

    def threads(self) -> set[str]:
        """The names of the threads that raised a sync."""
        return {e.thread for e in self.events}

    def __enter__(self) -> SyncGuard:
        with _guards_lock:
            if not _active_guards:
                try:
                    _install_patches()
                except BaseException:
                    _remove_patches()
                    raise
            _active_guards.append(self)
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            self._old_debug = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._warn_ctx = warnings.catch_warnings(record=True)
            self._warned = self._warn_ctx.__enter__()
            warnings.simplefilter("always")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._cuda:
                torch.cuda.set_sync_debug_mode(self._old_debug)
                self._warn_ctx.__exit__(*exc)
                self.cuda_events += sum(
                    "synchroniz" in str(w.message).lower() for w in self._warned
                )
        finally:
            with _guards_lock:
                _active_guards[:] = [g for g in _active_guards if g is not self]
                if not _active_guards:
                    _remove_patches()


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
