"""A tracker for tests of the tracker machinery (:class:`hookloop.tracking.Tracker`):
its backend appends every call it receives to a JSON-lines file, with the process and
thread that made it, so a test can see what reached the backend in either backend mode
(the worker thread, or the backend process), even after the training process died.

::

    from hookloop.testing.trackers import CallLogTracker, read_call_log

    tracker = CallLogTracker(tmp_path / "calls.jsonl", backend="process")
    tiny_loop([tracker]).fit(max_steps=4)
    calls = read_call_log(tmp_path / "calls.jsonl")
    assert calls[0]["kind"] == "open" and calls[-1]["args"] == ["success"]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from hookloop.tracking import RecordDropped, Tracker

__all__ = ["CallLogTracker", "read_call_log"]


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


class CallLogTracker(Tracker):
    """A tracker whose backend writes each call as one JSON line to ``path``:
    ``{"kind", "args", "time", "pid", "thread", "argv", "cwd"}`` (``time`` is the
    training-thread time of the record, ``argv`` and ``cwd`` what the backend saw).

    :param path: the JSON-lines file (appended to).
    :param fail: kinds whose calls raise ``ConnectionError``.
    :param drop: kinds whose calls raise :class:`hookloop.tracking.RecordDropped`.
    :param sleep: seconds each call of the given kinds sleeps first (a slow or hanging
        backend), e.g. ``{"open": 2.0}``.
    :param tracker_options: options of :class:`hookloop.tracking.Tracker`
        (``backend``, ``close_timeout``, ``max_failures``, ...).
    """

    tracker_name = "calllog"
    hookloop_name = "calllog"
    default_backend = "process"

    def __init__(self, path: str | os.PathLike[str], *, fail: Collection[str] = (),
                 drop: Collection[str] = (), sleep: dict[str, float] | None = None,
                 **tracker_options: Any) -> None:
        super().__init__(**tracker_options)
        self.path = Path(path)
        self.fail = frozenset(fail)
        self.drop = frozenset(drop)
        self.sleep = dict(sleep or {})

    def _write(self, kind: str, *args: Any) -> None:
        delay = self.sleep.get(kind, 0.0)
        if delay:
            time.sleep(delay)
        if kind in self.fail:
            raise ConnectionError(f"{kind}: backend down")
        if kind in self.drop:
            raise RecordDropped(f"{kind}_skipped")
        line = {"kind": kind, "args": _plain(list(args)), "time": self.record_time, "pid": os.getpid(),
                "thread": threading.current_thread().name, "argv": list(sys.argv), "cwd": os.getcwd()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()

    def _backend_open(self, loop_info: dict[str, Any]) -> None:
        self._write("open", loop_info)

    def _backend_hparams(self, params: dict[str, Any]) -> None:
        self._write("hparams", params)

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write("metrics", metrics, step)

    def _backend_text(self, name: str, text: str, step: int) -> None:
        self._write("text", name, text, step)

    def _backend_histogram(self, name: str, values: Any, step: int) -> None:
        self._write("histogram", name, list(values.shape), step)

    def _backend_artifact(self, path: str, metrics: dict[str, float]) -> None:
        self._write("artifact", Path(path).name, metrics)

    def _backend_close(self, status: str) -> None:
        self._write("close", status)


def read_call_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The calls a :class:`CallLogTracker` wrote to ``path``, in order (none when the
    file does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
