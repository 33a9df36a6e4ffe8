"""The shared base of tracker plugins (TensorBoard, W&B, MLflow, ...).

A :class:`Tracker` turns hooks into backend calls that run on a worker thread through
a bounded queue, so a slow, failing or hanging backend never blocks or kills training:

- the training thread only enqueues (and only at log intervals, epoch ends and fit
  boundaries: trackers implement no per-step hook);
- after ``max_failures`` consecutive failed calls the tracker degrades: to spooling
  the remaining records as JSON lines under ``spool_dir`` when one is set, else to
  disabled; one warning says so;
- at the end of fit (or on a crash) the run is closed with status ``"success"`` or
  ``"failed"`` and a summary says what was and was not recorded; a degraded tracker
  stops sending but still closes the run it opened;
- records logged while no run is open (before ``fit``, or by plugins that run before
  the tracker at fit start) are held, up to ``held_size``, and delivered when the run
  opens; the rest are counted as dropped in that fit's summary;
- every record carries the training-thread time it was logged at (``on_log``'s
  ``time``); backends stamp values with ``self.record_time``, not the write time;
- one worker per fit: a worker that outlives ``close_timeout`` writes nothing more and
  only closes its own run (backend calls are serialised and checked against the fit's
  generation), so it never touches the next fit's run. Backend tracebacks are kept
  (``last_traceback``) and logged at DEBUG;
- with ``backend="process"`` the ``_backend_*`` calls run in a separate process
  (:mod:`hookloop._tracker_host`), so the SDK's Python work (imports, stores, clients)
  never holds the training process's GIL; everything above stays in the training
  process. The configuration and the ``open`` call are handed to that process on the
  training thread as the fit starts, so a training process killed right after still
  leaves an opened run, closed with status ``"killed"``.

Subclasses implement the ``_backend_*`` methods, which run on the worker thread (or in
the backend process) only.
Configuration values whose keys look like secrets, and values of secret environment
variables, are masked before anything reaches a backend (:func:`mask_secrets`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hookloop import _tracker_host
from hookloop.plugins import hookimpl
from hookloop.tracker_util import (
    MASK,
    SECRET_ENV_VARS,
    flatten_config,
    image_to_hwc_uint8,
    mask_argv,
    mask_secrets,
    mask_text,
    sdk_installed,
)

__all__ = [
    "MASK",
    "SECRET_ENV_VARS",
    "RecordDropped",
    "Tracker",
    "flatten_config",
    "image_to_hwc_uint8",
    "mask_argv",
    "mask_secrets",
    "mask_text",
    "sdk_installed",
]

log = logging.getLogger("hookloop.tracking")

_STOP = object()
BACKENDS = ("thread", "process")
"""Where a tracker's ``_backend_*`` calls run: its worker thread, or a separate process."""


class RecordDropped(Exception):
    """Raised by a ``_backend_*`` method that deliberately did not write its record
    (e.g. a step a resumed run already holds): the record is counted as dropped under
    ``str(exc)`` (or its kind), neither as recorded nor as a failure."""


class _Stale(Exception):
    """The worker belongs to an earlier fit (or was abandoned at close)."""


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


class Tracker:
    """Base class of tracker plugins; see the module docstring for the guarantees.

    :param log_hparams: record ``loop.hparams`` (masked) once at fit start.
    :param histogram_every_n_epochs: histograms of weights (at the end of every Nth
        epoch) and gradients (at that epoch's first optimizer step, which costs one
        host-device copy there); ``None``: off.
    :param queue_size: records waiting for the worker; when full, new records are
        dropped and counted (training never waits).
    :param max_failures: consecutive failed backend calls before degrading.
    :param spool_dir: where to spool records after degrading (``None``: disable).
    :param close_timeout: seconds fit waits at the end for the worker to drain.
    :param metrics_interval: seconds the worker holds scalars to write them in one
        backend call (``_backend_metrics_batch``); 0 writes each ``on_log`` at once.
        Held scalars are written when the interval has passed and before the run is
        closed (at fit end or on a crash); a process killed outright loses them.
    :param held_size: records logged while no run is open (``loop.log_text`` before
        ``fit``, ``on_fit_start`` logging of plugins that run before the tracker, a
        model summary) that are held and delivered, in order, when the next run opens;
        beyond this bound they are dropped and counted in that run's summary.
    :param backend: ``"thread"`` (the worker thread calls the backend) or
        ``"process"`` (the worker thread hands each call to a separate process, which
        keeps the SDK's Python work off the training process's GIL); default: the
        environment variable ``HOOKLOOP_TRACKER_BACKEND``, else the class's
        :attr:`default_backend`. A tracker whose class lives in ``__main__`` or in a
        function, whose configuration does not pickle, or whose backend process does
        not start, runs on its worker thread for that fit (logged at INFO).
    """

    hookloop_rank_zero_only = True
    hookloop_on_error = "warn"
    # a resume without a tracker's state is incomplete (a new run), not wrong
    hookloop_state_required = False
    hookloop_after = ("summary", "checkpoint", "early_stopping")
    tracker_name = "tracker"
    uploads_artifacts = True
    """Whether ``_backend_artifact`` reads the file (then it gets a staged copy that
    outlives best-k rotation) or only records the path."""
    removes_artifacts = False
    """Whether ``_backend_artifact_removed`` deletes the artifact of a checkpoint the
    checkpoint plugin rotated away (``on_checkpoint_removed``)."""
    default_backend = "thread"
    """Where ``_backend_*`` calls run unless ``backend`` says otherwise."""
    backend_exports: tuple[str, ...] = ()
    """Attributes the ``_backend_*`` methods set that the training process reads (a run
    id): with the process backend, their new values come back after every call."""
    parent_only: frozenset[str] = frozenset({
        "_queue", "_thread", "_backend_lock", "_held", "_held_dropped", "_uploaded",
        "_close_status", "_channels", "_presented", "_staging", "on_before_optimizer_step",
    })
    """Attributes that stay in the training process (threads, queues, models): the
    rest of the instance is the configuration the backend process rebuilds it from."""

    def __init__(
        self,
        *,
        log_hparams: bool = True,
        histogram_every_n_epochs: int | None = None,
        queue_size: int = 10_000,
        max_failures: int = 3,
        spool_dir: str | os.PathLike[str] | None = None,
        close_timeout: float = 30.0,
        metrics_interval: float = 0.0,
        held_size: int = 1000,
        backend: str | None = None,
    ) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; expected one of {BACKENDS} or None")
        if histogram_every_n_epochs is not None and histogram_every_n_epochs <= 0:
            raise ValueError(f"histogram_every_n_epochs={histogram_every_n_epochs!r}; expected > 0")
        if queue_size <= 0 or max_failures <= 0:
            raise ValueError(f"queue_size={queue_size!r} and max_failures={max_failures!r} must be > 0")
        if held_size < 0:
            raise ValueError(f"held_size={held_size!r}; expected >= 0")
        self.log_hparams = log_hparams
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.queue_size = queue_size
        self.max_failures = max_failures
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.close_timeout = close_timeout
        if metrics_interval < 0:
            raise ValueError(f"metrics_interval={metrics_interval!r}; expected >= 0")
        self.metrics_interval = float(metrics_interval)
        self.held_size = held_size
        self.backend = backend
        if histogram_every_n_epochs:
            # gradients are cleared after every step: take them once per due epoch, just
            # before the first optimizer step. Defined per instance, so trackers without
            # histograms implement no per-step hook at all.
            self.on_before_optimizer_step = self._capture_grads
        self._grads_epoch = -1
        self._staging: Path | None = None
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        # records logged while no run is open, delivered when the next one opens
        self._held: deque[tuple[str, tuple[Any, ...], float]] = deque()
        self._held_dropped: Counter[str] = Counter()
        self._released = False
        self._uploaded: set[str] = set()  # announced paths this run uploaded
        # one worker per fit; only the worker of the current generation touches the
        # backend (under the lock), so a late worker never writes to the next fit's run
        self._generation = 0
        self._backend_lock = threading.Lock()
        self._owner: int | None = None  # generation whose backend run is open
        self._close_status: dict[int, tuple[str, float]] = {}
        # process backend: the channel of each fit (generation) whose worker runs, and
        # the generations whose open call the training thread sent already
        self._channels: dict[int, _tracker_host.Channel] = {}
        self._presented: set[int] = set()
        self.backend_identity: dict[str, Any] | None = None
        """The backend process of the current fit (host name, pid, start), or ``None``
        on the worker thread; checkpoints carry it so that a resume waits for a killed
        process's backend to finish its run first."""
        self._previous_backend: dict[str, Any] | None = None
        self.fit_start_time: float | None = None
        """Training-thread wall time (``time.time()``) the last fit started at: the start
        time backends give the run."""
        self.record_time: float = time.time()
        """Training-thread wall time (``time.time()``) of the record the worker is
        writing: backends stamp values with it (worker thread only)."""
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.recorded: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.spooled: Counter[str] = Counter()
        self.state = "idle"  # idle | running | spooling | disabled | closed
        self.last_error: str | None = None
        self.last_traceback: str | None = None
        self._consecutive = 0
        self.report: str = ""

    # ------------------------------------------------------------ backend API

    def _backend_open(self, loop_info: dict[str, Any]) -> None:
        """Start the backend run (worker thread). ``loop_info`` has ``rank``,
        ``world_size``, ``global_step``, ``resumed`` and ``time`` (the fit's start on
        the training thread)."""

    def _backend_hparams(self, params: dict[str, Any]) -> None:
        """Record masked hyperparameters."""

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalars at ``step`` (logged at ``self.record_time``)."""
        raise NotImplementedError

    def _backend_text(self, name: str, text: str, step: int) -> None:
        """Record text."""

    def _backend_image(self, name: str, image: Any, step: int) -> None:
        """Record an image (CPU tensor CHW in [0,1] or a matplotlib figure)."""

    def _backend_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        """Record a histogram of a CPU tensor."""

    def _backend_artifact(self, path: str, metrics: dict[str, float]) -> None:
        """Upload a checkpoint file or folder as an artifact."""

    def _backend_artifact_removed(self, path: str) -> None:
        """The checkpoint ``path`` (as announced) was rotated away: delete its artifact
        where the backend allows. Called only for paths uploaded by this run."""
        raise RecordDropped("artifact_removed")

    def _backend_flush(self) -> None:
        """Flush buffered writes."""

    def _backend_close(self, status: str) -> None:
        """Finish the run with ``status`` ``"success"`` or ``"failed"`` (at
        ``self.record_time``, the end of fit on the training thread), or ``"killed"``:
        the training process died and the backend process closes the run it left."""

    # ------------------------------------------------------------ backend process

    def backend_mode(self) -> str:
        """``"thread"`` or ``"process"``: where the next fit's backend calls are meant
        to run (``backend``, else ``HOOKLOOP_TRACKER_BACKEND``, else the class's
        default)."""
        mode = self.backend or os.environ.get("HOOKLOOP_TRACKER_BACKEND") or self.default_backend
        return mode if mode in BACKENDS else self.default_backend

    def _backend_payload(self) -> bytes | None:
        """What the backend process rebuilds this tracker from (``None``: it cannot)."""
        cls = type(self)
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            log.info("hookloop tracker %r: %s.%s cannot be imported by a backend process; its "
                     "backend runs on the worker thread", self.tracker_name, cls.__module__,
                     cls.__qualname__)
            return None
        import __main__

        # the loop's own bookkeeping on its plugins (``_hookloop_*``) stays here too
        state = {k: v for k, v in self.__dict__.items()
                 if k not in self.parent_only and not k.startswith("_hookloop")}
        context = {"environ": dict(os.environ), "cwd": os.getcwd(), "argv": list(sys.argv),
                   "main_file": getattr(__main__, "__file__", None)}
        try:
            return pickle.dumps({"cls": cls, "state": state, "context": context})
        except Exception as exc:
            log.info("hookloop tracker %r: its configuration does not pickle (%s: %s); its backend "
                     "runs on the worker thread", self.tracker_name, type(exc).__name__, exc)
            return None

    def _host_side(self) -> None:
        """Called in the backend process on the rebuilt copy: the training-process
        attributes get neutral values."""
        self._backend_lock = threading.Lock()
        self._queue = None
        self._thread = None
        self._held = deque()
        self._held_dropped = Counter()
        self._uploaded = set()
        self._close_status = {}
        self._channels = {}
        self._presented = set()
        self._staging = None

    def _backend_refresh(self) -> dict[str, Any]:
        """Training-process attributes sent along with the close call, which the
        backend reads then (the counts of :meth:`summary`)."""
        return {"recorded": self.recorded, "failed": self.failed, "dropped": self.dropped,
                "spooled": self.spooled, "last_error": self.last_error, "state": self.state}

    def _open_channel(self, gen: int, loop_info: dict[str, Any], at: float) -> None:
        """Process backend: hand the configuration and the open call to the backend
        process now, on the training thread (the messages wait in a socket; nothing
        waits for the process)."""
        self.backend_identity = None
        if self.backend_mode() != "process":
            return
        if not _tracker_host.available():
            log.info("hookloop tracker %r: no backend process on this platform; its backend runs "
                     "on the worker thread", self.tracker_name)
            return
        payload = self._backend_payload()
        if payload is None:
            return
        channel = None
        try:
            channel = _tracker_host.open_channel(payload)
            channel.send(("call", "open", (loop_info,), at, None))
        except Exception as exc:
            if channel is not None:
                channel.close()
            log.info("hookloop tracker %r: the backend process did not start (%s: %s); its "
                     "backend runs on the worker thread", self.tracker_name, type(exc).__name__, exc)
            return
        self._channels[gen] = channel
        self._presented.add(gen)
        self.backend_identity = channel.identity

    def _end_channel(self, gen: int) -> None:
        """The worker of ``gen`` is done: end its channel (the backend process closes
        a run still open)."""
        with self._backend_lock:
            # kept, closed: a late close through it fails instead of running here
            channel = self._channels.get(gen)
            self._presented.discard(gen)
            if channel is not None:
                channel.close()

    def _dispatch(self, kind: str, args: tuple[Any, ...], at: float, gen: int) -> None:
        """``_backend_<kind>(*args)`` here or in the backend process (under the lock)."""
        channel = self._channels.get(gen)
        if channel is None:
            if kind == "open" and args and isinstance(args[0], Mapping):
                _tracker_host.wait_for_exit(args[0].get("previous_backend"), self.close_timeout + 10.0)
            getattr(self, f"_backend_{kind}")(*args)
            return
        sent = kind == "open" and gen in self._presented
        self._presented.discard(gen)
        refresh = self._backend_refresh() if kind == "close" else None
        try:
            exports = channel.call(kind, args, at, refresh, sent=sent)
        except (_tracker_host.Unloadable, _tracker_host.BackendGone) as exc:
            if kind != "open" or channel.ready:
                raise
            # the backend process could not rebuild the tracker, or did not start
            log.info("hookloop tracker %r: no backend process (%s); its backend runs on the "
                     "worker thread", self.tracker_name, exc)
            self._channels.pop(gen, None)
            self.backend_identity = None
            channel.close()
            self._dispatch(kind, args, at, gen)
            return
        except (RecordDropped, _tracker_host.RemoteError) as exc:
            self._apply_exports(getattr(exc, "exports", None) or {})
            raise
        self._apply_exports(exports)

    def _apply_exports(self, exports: Mapping[str, Any]) -> None:
        for name, value in exports.items():
            setattr(self, name, value)

    # ------------------------------------------------------------ worker

    def _start(self, loop_info: dict[str, Any]) -> None:
        self._reset_counts()
        self._grads_epoch = -1
        self._generation += 1  # any worker still alive from an earlier fit is stale now
        gen = self._generation
        self.state = "running"
        q: queue.Queue[Any] = queue.Queue(self.queue_size)
        self._queue = q
        self._uploaded = set()
        at = float(loop_info.get("time") or time.time())
        self.fit_start_time = at
        loop_info = {**loop_info, "previous_backend": self._previous_backend}
        self._previous_backend = None
        self._open_channel(gen, loop_info, at)
        self._thread = threading.Thread(
            target=self._work, args=(q, gen), name=f"hookloop-{self.tracker_name}", daemon=True
        )
        self._thread.start()
        self._put("open", loop_info, at=at)
        held, self._held = self._held, deque()
        self.dropped.update(self._held_dropped)
        self._held_dropped = Counter()
        for kind, args, at in held:
            self._put(kind, *args, at=at)

    def _put(self, kind: str, *args: Any, at: float | None = None) -> None:
        """Queue a record for ``_backend_<kind>(*args)`` on the worker; never blocks.
        ``at``: when it was logged on the training thread (default: now). While no run
        is open, up to ``held_size`` records are held for the next one."""
        at = time.time() if at is None else at
        q = self._queue
        if q is None:
            if not self._released and len(self._held) < self.held_size:
                self._held.append((kind, args, at))
            else:
                self._held_dropped[kind] += 1
            return
        if self.state in ("disabled", "closed"):
            self.dropped[kind] += 1
            return
        try:
            q.put_nowait((kind, args, at))
        except queue.Full:
            self.dropped[kind] += 1

    def _work(self, q: queue.Queue[Any], gen: int) -> None:
        try:
            self._work_loop(q, gen)
        finally:
            self._end_channel(gen)

    def _work_loop(self, q: queue.Queue[Any], gen: int) -> None:
        batch: list[tuple[dict[str, float], int, float]] = []  # metrics held for one call
        last = time.monotonic()
        try:
            while True:
                if gen != self._generation:
                    raise _Stale
                wait = last + self.metrics_interval - time.monotonic() if batch else 1.0
                try:
                    item = q.get(timeout=max(0.0, min(wait, 1.0)))
                except queue.Empty:
                    item = None
                flush_batch = batch and (
                    item is _STOP or (item is not None and item[0] == "close")
                    or self.state != "running"
                    or time.monotonic() - last >= self.metrics_interval
                )
                if flush_batch:  # held scalars go out before the run closes
                    self._call_metrics(batch, gen)
                    for _ in batch:
                        q.task_done()
                    batch = []
                    last = time.monotonic()
                if item is None:
                    continue
                if item is _STOP:
                    q.task_done()
                    return
                kind, args, at = item
                if kind == "metrics" and self.state == "running":
                    batch.append((*args, at))  # task_done once written
                    if time.monotonic() - last >= self.metrics_interval:
                        self._call_metrics(batch, gen)
                        for _ in batch:
                            q.task_done()
                        batch = []
                        last = time.monotonic()
                    continue
                try:
                    self._handle(kind, args, at, gen)
                finally:
                    q.task_done()
        except _Stale:
            self._close_late(gen)

    def _handle(self, kind: str, args: tuple[Any, ...], at: float, gen: int) -> None:
        if kind == "close":
            # a degraded tracker stops sending, but the run it opened is still closed
            if self.state == "spooling":
                self._spool(kind, args, at)
            if self._owner == gen:
                self._call(kind, args, at, gen)
            elif self.state != "spooling":
                self.dropped[kind] += 1
        elif self.state == "running":
            self._call(kind, args, at, gen)
        elif self.state == "spooling":
            self._spool(kind, args, at)
        else:
            self.dropped[kind] += 1

    def _close_late(self, gen: int) -> None:
        """A worker whose fit already ended (close timed out) or that a new fit
        replaced: close its own run, if it opened one, and touch nothing else."""
        with self._backend_lock:
            if self._owner != gen:
                return
            self._owner = None
            status, at = self._close_status.get(gen, ("failed", time.time()))
            self.record_time = at
            try:
                self._dispatch("close", (status,), at, gen)
                log.info("hookloop tracker %r closed the run of an earlier fit late (%s)",
                         self.tracker_name, status)
            except Exception:
                log.debug("hookloop tracker %r: late close failed", self.tracker_name, exc_info=True)

    def _call_metrics(self, batch: list[tuple[dict[str, float], int, float]], gen: int) -> None:
        if self.state != "running":  # degraded while these were held
            for metrics, step, at in batch:
                if self.state == "spooling":
                    self._spool("metrics", (metrics, step), at)
                else:
                    self.dropped["metrics"] += 1
        elif len(batch) == 1:
            metrics, step, at = batch[0]
            self._call("metrics", (metrics, step), at, gen)
        else:
            self._call("metrics_batch", (batch,), batch[-1][2], gen, count_as="metrics", n=len(batch))

    def _backend_metrics_batch(self, records: list[tuple[dict[str, float], int, float]]) -> None:
        """Record several ``(metrics, step, time)`` at once (held for
        ``metrics_interval``); backends with a batch API override this to make one call."""
        for metrics, step, at in records:
            self.record_time = at
            self._backend_metrics(metrics, step)

    def _call(self, kind: str, args: tuple[Any, ...], at: float, gen: int,
              count_as: str | None = None, n: int = 1) -> None:
        name = count_as or kind
        try:
            with self._backend_lock:
                if gen != self._generation:
                    raise _Stale
                if kind == "open" and self._owner is not None:
                    self._close_late_locked()
                self.record_time = at
                try:
                    # a record of kind K is handled by _backend_K; subclasses may queue their own
                    self._dispatch(kind, args, at, gen)
                finally:
                    if kind == "close":
                        self._owner = None
                if kind == "open":
                    self._owner = gen
        except _Stale:
            raise
        except RecordDropped as exc:
            if gen == self._generation:
                self.dropped[str(exc) or name] += n
        except Exception as exc:
            if isinstance(exc, _tracker_host.RemoteError):  # raised in the backend process
                tb, what = exc.traceback, (exc.type_name, exc.text)
                log.debug("hookloop tracker %r: %s failed in the backend process\n%s",
                          self.tracker_name, name, mask_text(tb))
            else:
                tb, what = traceback.format_exc(), (type(exc).__name__, str(exc))
                log.debug("hookloop tracker %r: %s failed", self.tracker_name, name, exc_info=True)
            if gen != self._generation:  # abandoned meanwhile: its summary is written
                return
            self.failed[name] += n
            self._consecutive += 1
            self.last_error = f"{what[0]}: {mask_text(what[1])}"
            self.last_traceback = mask_text(tb)
            if self._consecutive >= self.max_failures and self.state == "running":
                self._degrade()
        else:
            if kind != "flush" and gen == self._generation:  # a flush proves nothing
                self.recorded[name] += n
                self._consecutive = 0
        finally:
            if kind == "artifact" and self._staging is not None and Path(args[0]).is_relative_to(
                self._staging
            ):  # uploaded or failed: unstage
                shutil.rmtree(Path(args[0]).parent, ignore_errors=True)

    def _close_late_locked(self) -> None:
        """Close a run an earlier fit's worker left open (called under the lock)."""
        owner, self._owner = self._owner, None
        status, at = self._close_status.get(owner or 0, ("failed", time.time()))
        self.record_time = at
        try:
            self._dispatch("close", (status,), at, owner or 0)
        except Exception:
            log.debug("hookloop tracker %r: late close failed", self.tracker_name, exc_info=True)

    def _degrade(self) -> None:
        if self.spool_dir is not None:
            self.state = "spooling"
            where = f"spooling the rest to {self._spool_path()}"
        else:
            self.state = "disabled"
            where = "disabled for the rest of the run"
        warnings.warn(
            f"hookloop tracker {self.tracker_name!r} failed {self._consecutive} times in a "
            f"row (last: {self.last_error}); {where}. Training continues.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _spool_path(self) -> Path:
        assert self.spool_dir is not None
        return self.spool_dir / f"{self.tracker_name}-spool.jsonl"

    def _spool(self, kind: str, args: tuple[Any, ...], at: float) -> None:
        if kind in ("open", "flush", "image", "histogram", "graph", "mesh"):
            self.dropped[kind] += 1
            return
        try:
            assert self.spool_dir is not None
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            record = {"kind": kind, "time": at,
                      "args": [a if isinstance(a, (str, int, float, dict, list)) else repr(a)
                               for a in args]}
            with self._spool_path().open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=repr) + "\n")
            self.spooled[kind] += 1
        except Exception as exc:
            self.state = "disabled"
            self.dropped[kind] += 1
            self.last_error = f"spool failed: {exc}"

    def _finish(self, status: str) -> None:
        if self._queue is None:
            return
        q, thread, gen = self._queue, self._thread, self._generation
        end = time.time()
        self._close_status[gen] = (status, end)
        deadline = time.monotonic() + self.close_timeout
        # wait (bounded) for room: the close record must not be dropped from a full queue
        for record in (("flush", (), end), ("close", (status,), end), _STOP):
            try:
                q.put(record, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                if record is not _STOP:
                    self.dropped[record[0]] += 1
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.last_error = (
                    f"backend did not finish within {self.close_timeout}s; "
                    f"{q.qsize()} record(s) abandoned"
                )
                self.dropped["pending"] += q.qsize()
                # the late worker writes nothing more; it only closes its own run
                self._generation += 1
        if self.state == "running":
            self.state = "closed"
        if self._staging is not None and (thread is None or not thread.is_alive()):
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._queue = None
        self.report = self.summary()
        if self.failed or self.dropped or self.spooled:
            log.warning("%s", self.report)
            warnings.warn(self.report, RuntimeWarning, stacklevel=2)
        else:
            log.info("%s", self.report)

    def summary(self) -> str:
        """What was and was not recorded during the last fit."""

        def fmt(c: Counter[str]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"

        text = (
            f"hookloop tracker {self.tracker_name!r}: recorded {fmt(self.recorded)}; "
            f"failed {fmt(self.failed)}; dropped {fmt(self.dropped)}"
        )
        if self.spooled:
            text += f"; spooled {fmt(self.spooled)} to {self._spool_path()}"
        if self.last_error:
            text += f"; last error: {self.last_error}"
        return text

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until every queued record was handled (tests and artifact uploads);
        returns False on timeout."""
        q = self._queue
        if q is None:
            return True
        end = time.monotonic() + timeout
        while q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.005)
        return not q.unfinished_tasks

    # ------------------------------------------------------------ hooks

    def _loop_info(self, loop: Any) -> dict[str, Any]:
        state = loop.state
        return {"rank": state.rank, "world_size": state.world_size,
                "global_step": state.global_step, "resumed": state.global_step > 0,
                "time": time.time()}

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        """Start the worker, open the run, deliver what was held and record the masked
        hyperparameters."""
        self._start(self._loop_info(loop))
        if self.log_hparams:
            self._put("hparams", mask_secrets(loop.hparams))

    @hookimpl
    def on_log(self, metrics: Mapping[str, float], step: int, time: float) -> None:
        """Queue the scalars at ``step``, stamped with ``time`` (their reduction on the
        training thread)."""
        self._put("metrics", dict(metrics), step, at=time)

    @hookimpl
    def on_log_text(self, name: str, text: str, step: int, time: float) -> None:
        """Queue text (secrets masked)."""
        self._put("text", name, mask_text(text), step, at=time)

    @hookimpl
    def on_log_image(self, name: str, image: Any, step: int, time: float) -> None:
        """Queue an image."""
        self._put("image", name, image, step, at=time)

    @hookimpl
    def on_log_histogram(self, name: str, values: torch.Tensor, step: int,
                         time: float) -> None:
        """Queue a histogram of ``values`` (a CPU copy made by the loop)."""
        self._put("histogram", name, values, step, at=time)

    @hookimpl
    def on_train_epoch_end(self, loop: Any, epoch: int) -> None:
        """Queue histograms (every N epochs, when enabled) and a flush."""
        n = self.histogram_every_n_epochs
        if n and (epoch + 1) % n == 0:
            step = loop.state.global_step
            for name, p in loop.module.named_parameters():
                self._put("histogram", f"weights/{name}", p.detach().float().cpu().clone(), step)
        self._put("flush")

    def _capture_grads(self, loop: Any) -> None:
        """Queue gradient histograms at the first optimizer step of a due epoch."""
        epoch = loop.state.epoch
        n = self.histogram_every_n_epochs
        if not n or (epoch + 1) % n or self._grads_epoch == epoch:
            return
        self._grads_epoch = epoch
        for name, p in loop.module.named_parameters():
            if p.grad is not None:
                self._put("histogram", f"grads/{name}", p.grad.detach().float().cpu().clone(),
                          loop.state.global_step)

    @hookimpl
    def on_checkpoint_saved(self, path: str, metrics: Mapping[str, float], is_best: bool) -> None:
        """Queue the best checkpoint as an artifact."""
        if is_best and not self.uploads_artifacts:
            self._put("artifact", str(path), dict(metrics))
        elif is_best:
            staged = self._stage(Path(path))
            if staged is not None:
                self._put("artifact", str(staged), dict(metrics))
        if is_best and self._queue is not None:
            self._uploaded.add(str(path))

    @hookimpl
    def on_checkpoint_removed(self, path: str) -> None:
        """A checkpoint this run uploaded was rotated away (best-k): queue the removal
        of its artifact, so the backend keeps what the checkpoint folder keeps."""
        if self.removes_artifacts and self._queue is not None and str(path) in self._uploaded:
            self._uploaded.discard(str(path))
            self._put("artifact_removed", str(path))

    def _stage(self, path: Path) -> Path | None:
        """Hard-link (or copy) a checkpoint into this tracker's staging folder, so a
        best-k rotation that deletes the file before the worker uploads it loses
        nothing. The staged copy is removed after the upload."""
        try:
            if self._staging is None:
                # beside the checkpoints: same file system, so a hard link, not a copy
                prefix = f".hookloop-upload-{self.tracker_name}-"
                try:
                    self._staging = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent.parent))
                except OSError:
                    self._staging = Path(tempfile.mkdtemp(prefix=prefix))
            target = Path(tempfile.mkdtemp(dir=self._staging)) / path.name
            if path.is_dir():
                shutil.copytree(path, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(path), str(target))
        except OSError as exc:
            self.failed["artifact"] += 1
            self.last_error = f"could not stage {path} for upload: {exc}"
            return None
        return target

    @hookimpl
    def on_fit_end(self) -> None:
        """Close the run as finished and report what was recorded."""
        self._finish("success")

    @hookimpl
    def on_exception(self) -> None:
        """Close the run as failed (the crash still propagates)."""
        self._finish("failed")

    @hookimpl
    def on_close(self) -> None:
        """Release what a fit left open (a run not yet finished is closed as failed:
        nothing ended it), records held for a fit that never came, and the staging
        folder."""
        self._finish("failed")
        self._released = True
        if self._held:
            self._held_dropped.update(kind for kind, _, _ in self._held)
            self._held.clear()
        if self._held_dropped:
            log.warning("hookloop tracker %r: no run opened after these were logged; dropped %s",
                        self.tracker_name, dict(self._held_dropped))
        if self._staging is not None and (self._thread is None or not self._thread.is_alive()):
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
