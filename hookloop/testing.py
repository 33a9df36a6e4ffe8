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

import copy
import dataclasses
import functools
import math
import os
import random
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
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


# ---------------------------------------------------------------------- resume checks


@dataclass
class RunSnapshot:
    """Everything a resume must restore, taken by :func:`snapshot_run` right after a
    fit; compare two with :func:`assert_same_run`.

    Tensors are cloned to the CPU and containers copied, so later training does not
    change a snapshot. Paths in a comparison start with the field names below.

    :param parameters: ``loop.module``'s named parameters.
    :param buffers: ``loop.module``'s named buffers.
    :param optimizers: each optimizer's ``state_dict()``.
    :param schedulers: each scheduler's ``state_dict()``.
    :param scaler: the GradScaler's ``state_dict()`` (``None`` without one).
    :param rng: the global RNG states at the moment of the snapshot (``python``,
        ``torch``, ``numpy`` if installed, ``cuda`` if initialised) and, under
        ``loader``, the states of the train loader's own ``torch.Generator`` objects.
    :param plugins: each registered plugin's ``state_dict()`` under its name.
    :param counters: ``loop.state.counters()``; metric stamps (if the state has them)
        without their wall-clock ``time``, which no resume can repeat.
    :param log: the ``on_log`` stream as ``(step, metrics)`` pairs (``None`` when no
        recorder was given).
    """

    parameters: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizers: list[Any]
    schedulers: list[Any]
    scaler: Any
    rng: dict[str, Any]
    plugins: dict[str, Any]
    counters: dict[str, Any]
    log: list[tuple[int, dict[str, Any]]] | None = None

    def fields(self) -> dict[str, Any]:
        """The snapshot as a mapping of field name to value, in comparison order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _copy(obj: Any) -> Any:
    """A deep copy whose tensors are detached CPU clones (numpy arrays become tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_copy(v) for v in obj)
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
        return torch.from_numpy(obj.copy())
    try:
        return copy.deepcopy(obj)
    except Exception:  # not copyable: compared as it is
        return obj


def _loader_generators(data: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects of a DataLoader (its own, its sampler's)."""
    gens = {}
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["loader"] = gen
    sampler = getattr(data, "sampler", None)
    gen = getattr(sampler, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["sampler"] = gen
    batch_sampler = getattr(data, "batch_sampler", None)
    gen = getattr(getattr(batch_sampler, "sampler", None), "generator", None)
    if isinstance(gen, torch.Generator):
        gens.setdefault("sampler", gen)
    return gens


def _rng_states(data: Any) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    rng["loader"] = {name: gen.get_state() for name, gen in _loader_generators(data).items()}
    return rng


def _counters(state: Any) -> dict[str, Any]:
    counters = _copy(state.counters())
    stamps = getattr(state, "metric_stamps", None)
    if "metric_stamps" in counters and isinstance(stamps, Mapping):
        # when each value was reduced, not the wall-clock time it happened at
        counters["metric_stamps"] = {
            name: {f.name: getattr(stamp, f.name) for f in dataclasses.fields(stamp)
                   if f.name != "time"} if dataclasses.is_dataclass(stamp) else _copy(stamp)
            for name, stamp in stamps.items()
        }
    return counters


def snapshot_run(loop: Loop, recorder: HookRecorder | None = None) -> RunSnapshot:
    """Capture what a resume must restore, right after ``loop.fit`` returned: the
    module's parameters and buffers, every optimizer, scheduler and the scaler, the
    global RNG states (as they are now) and the train loader's generators, every
    plugin's ``state_dict()``, the loop counters and, if ``recorder`` is given, its
    ``on_log`` stream (steps and metrics; not times).

    :param loop: the loop, after its fit.
    :param recorder: a :class:`HookRecorder` registered in the loop for its whole run.
    """
    module = loop.module
    plugins: dict[str, Any] = {}
    for name, plugin in loop.pm.plugin_items():
        getter = getattr(plugin, "state_dict", None)
        if callable(getter) and not isinstance(plugin, type):
            plugins[name] = _copy(getter())
    log = None
    if recorder is not None:
        log = [(int(step), _copy(dict(metrics))) for step, metrics in recorder.logged()]
    return RunSnapshot(
        parameters={n: _copy(p) for n, p in module.named_parameters()},
        buffers={n: _copy(b) for n, b in module.named_buffers()},
        optimizers=[_copy(opt.state_dict()) for opt in loop.optimizers],
        schedulers=[_copy(s.state_dict()) for s in loop.schedulers],
        scaler=_copy(loop.scaler.state_dict()) if loop.scaler is not None else None,
        rng=_rng_states(loop.train_data),
        plugins=plugins,
        counters=_counters(loop.state),
        log=log,
    )


def _ignored(path: str, ignore: Sequence[str]) -> bool:
    return any(path == p or (path.startswith(p) and path[len(p)] in ".[") for p in ignore)


def _numbers_equal(a: float, b: float, rtol: float, atol: float) -> bool:
    if a == b:
        return True
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * abs(b)


def _tensor_diff(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> str | None:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if a.is_floating_point() or a.is_complex():
        if rtol == 0 and atol == 0:
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        else:
            same = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    elif rtol == 0 and atol == 0:
        same = a == b
    else:
        same = torch.isclose(a.double(), b.double(), rtol=rtol, atol=atol)
    if bool(same.all()):
        return None
    bad = ~same
    da, db = a[bad], b[bad]
    if da.dtype == torch.bool:
        da, db = da.int(), db.int()
    diff = (da - db).abs() if (da.is_complex() or da.is_floating_point()) else (
        da.double() - db.double()).abs()
    finite = diff[~torch.isnan(diff)] if diff.is_floating_point() else diff
    max_diff = float(finite.max()) if finite.numel() else float("nan")
    return f"max abs diff {max_diff:.6g} ({int(bad.sum())} of {a.numel()} elements differ)"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _diff(a: Any, b: Any, path: str, out: list[str], rtol: float, atol: float,
          ignore: Sequence[str]) -> None:
    if _ignored(path, ignore):
        return
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            out.append(f"{path}: {type(a).__name__} != {type(b).__name__}")
            return
        msg = _tensor_diff(a, b, rtol, atol)
        if msg is not None:
            out.append(f"{path}: {msg}")
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in a:
            if key not in b:
                if not _ignored(f"{path}.{key}", ignore):
                    out.append(f"{path}.{key}: only in the first run")
            else:
                _diff(a[key], b[key], f"{path}.{key}", out, rtol, atol, ignore)
        for key in b:
            if key not in a and not _ignored(f"{path}.{key}", ignore):
                out.append(f"{path}.{key}: only in the second run")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, rtol, atol, ignore)
    elif _is_number(a) and _is_number(b):
        if not _numbers_equal(a, b, rtol, atol):
            out.append(f"{path}: {a!r} != {b!r} (abs diff {abs(a - b):.6g})")
    else:
        try:
            same = bool(a == b)
        except Exception:
            same = a is b
        if not same:
            out.append(f"{path}: {a!r} != {b!r}")


def _log_diff(a: list[Any] | None, b: list[Any] | None, out: list[str], rtol: float,
              atol: float) -> None:
    if a is None or b is None:
        if (a is None) != (b is None):
            out.append("log: recorded in only one run (give both snapshots a recorder)")
        return
    for i, (x, y) in enumerate(zip(a, b)):
        found: list[str] = []
        if x[0] != y[0]:
            found.append("step")
        _diff(x[1], y[1], "metrics", found, rtol, atol, ())
        if found:
            out.append(f"log[{i}]: step {x[0]} {x[1]} != step {y[0]} {y[1]}")
            return
    if len(a) != len(b):
        i = min(len(a), len(b))
        extra = a[i] if len(a) > len(b) else b[i]
        out.append(f"log: {len(a)} entries != {len(b)}; first extra: log[{i}] = step "
                   f"{extra[0]} {extra[1]}")


def run_differences(a: RunSnapshot, b: RunSnapshot, *, ignore: Sequence[str] = (),
                    rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    """Every difference between two snapshots, one line each (``path: what``); empty
    when they are the same. See :func:`assert_same_run` for the arguments."""
    out: list[str] = []
    for name, value in a.fields().items():
        other = getattr(b, name)
        if name == "log":
            if not _ignored("log", ignore):
                _log_diff(value, other, out, rtol, atol)
        else:
            _diff(value, other, name, out, rtol, atol, ignore)
    return out


def assert_same_run(a: RunSnapshot, b: RunSnapshot, *, ignore: Sequence[str] = (),
                    rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that two runs ended in the same state, e.g. an uninterrupted fit and a
    fit resumed from a checkpoint: parameters and buffers, optimizers, schedulers,
    scaler, RNG states, plugin states, counters and the ``on_log`` stream.

    Bit-exact by default (``torch.equal`` semantics for tensors, ``==`` for numbers;
    NaN equals NaN). Raises ``AssertionError`` listing every difference, by path
    (``optimizers[0].state.3.exp_avg``, ``plugins.<name>.<key>``, ``rng.numpy``...),
    with the max abs diff of tensors; for the log stream, its first differing entry.

    :param ignore: dotted path prefixes to skip, e.g. ``"plugins.tensorboard"`` or
        ``"rng.numpy"``.
    :param rtol: relative tolerance for floating values.
    :param atol: absolute tolerance for floating values.
    """
    out = run_differences(a, b, ignore=ignore, rtol=rtol, atol=atol)
    if out:
        raise AssertionError(f"the runs differ in {len(out)} place(s):\n  " + "\n  ".join(out))
