"""Run snapshots and their comparison, for :mod:`hookloop.testing`."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hookloop.loop import Loop
from hookloop.resume import get_loader_state, get_rng
from hookloop.testing import HookRecorder


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


def _rng_states(data: Any) -> dict[str, Any]:
    rng = get_rng()
    version, internal, gauss = rng["python"]
    rng["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                     "gauss": gauss}
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = {"name": name, "keys": keys, "pos": pos, "has_gauss": has_gauss,
                        "cached": cached}
    if "cuda" in rng:
        rng["cuda"] = [s.clone() for s in rng["cuda"]]
    rng["loader"] = get_loader_state(data)
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
