"""The host-device sync guard of :mod:`hookloop.testing`."""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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


