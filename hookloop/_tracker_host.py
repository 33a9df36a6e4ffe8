"""The backend process of trackers: their SDK calls run here, out of the training
process and its GIL.

A tracker whose backend is ``"process"`` (:class:`hookloop.tracking.Tracker`) keeps
its queue, worker thread, failure counting and close logic in the training process;
only its ``_backend_*`` calls cross over. Each fit of each tracker gets a *channel*
(a Unix socket pair) to one shared host process: the training thread sends the
tracker's configuration and the ``open`` call as the fit starts, and the worker thread
sends every later call and waits for its reply (blocked in a system call, without the
GIL). In the host, every channel is served by a thread of its own, on a copy of the
tracker rebuilt from that configuration.

- The host runs at the lowest CPU priority (``nice`` 19, or ``HOOKLOOP_TRACKER_NICE``;
  on Linux its session's scheduling group and those of the processes it starts too)
  in a session of its own, so it yields cores to the training process and gets no
  terminal signals. On cores kept busy by other work it is slow to write, not the
  training.
- The host serves what a channel holds to its end: when the training process dies
  (SIGKILL) after the fit started, the host still performs the calls already sent,
  ``open`` included, then closes the run with status ``"killed"``, and exits within
  the tracker's ``close_timeout``.
- A channel ends when its worker ends; the host lives while channels are open and
  ``linger`` seconds after the last one ended (a later fit reuses it), and exits at
  once when the training process is gone.
- A tracker the host cannot rebuild (its class lives in ``__main__`` or in a
  function, or its configuration does not pickle), or a host that does not start,
  leaves the tracker on its worker thread in the training process for that fit.

Linux and macOS (Unix sockets with descriptor passing); elsewhere trackers use their
worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["BackendGone", "Channel", "RemoteError", "available", "backend_identity", "open_channel",
           "shutdown", "wait_for_exit"]

log = logging.getLogger("hookloop.tracking")

LINGER_S = 10.0
"""Seconds an idle host waits for the next fit before it exits."""
_NICE = 19
_SNDBUF = 4 << 20
_BOOT = (
    "import json, os, sys\n"
    "nice = int(sys.argv[2])\n"
    "try:\n"
    "    os.nice(nice)\n"
    # a session of its own is a scheduling group of its own where Linux groups sessions
    # (autogroup): the group's weight, not the process's nice, sets its share against the
    # training process's group; lowered too, before the imports
    "    with open('/proc/self/autogroup', 'w') as fh:\n"
    "        fh.write(str(nice))\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "sys.path[:] = json.loads(os.environ.pop('HOOKLOOP_TRACKER_HOST_PATH'))\n"
    "from hookloop._tracker_host import serve_host\n"
    "serve_host(int(sys.argv[1]))\n"
)


def _nice() -> int:
    """The host's niceness: ``HOOKLOOP_TRACKER_NICE`` (0-19), else 19."""
    try:
        return max(0, min(19, int(os.environ.get("HOOKLOOP_TRACKER_NICE", _NICE))))
    except ValueError:
        return _NICE


class RemoteError(Exception):
    """A backend call that raised in the host: the exception's type name, message and
    traceback (as text)."""

    def __init__(self, type_name: str, text: str, tb: str = "",
                 exports: dict[str, Any] | None = None) -> None:
        super().__init__(f"{type_name}: {text}")
        self.type_name = type_name
        self.text = text
        self.traceback = tb
        self.exports = exports or {}
        """Attributes the failed call had set before it raised (a run id)."""


class BackendGone(RemoteError):
    """The host exited or the channel broke."""


def available() -> bool:
    """Whether this platform can run a host (Unix sockets with descriptor passing)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds") and bool(sys.executable)


# ----------------------------------------------------------------------------- identity


def _start_ticks(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), which tells a
    process apart from a later one that reuses its pid; ``None`` for a zombie or no
    such process (or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # exited, not yet reaped
        return None
    return fields[19]


def backend_identity(pid: int) -> dict[str, Any]:
    """What identifies the host ``pid`` (started by this process) across processes:
    host name, pid and start time of the host and of this training process."""
    me = os.getpid()
    return {"hostname": socket.gethostname(), "pid": pid, "start": _start_ticks(pid),
            "parent": me, "parent_start": _start_ticks(me)}


def _alive(identity: dict[str, Any], pid_key: str = "pid", start_key: str = "start") -> bool:
    pid = identity.get(pid_key)
    if identity.get("hostname") != socket.gethostname() or not isinstance(pid, int):
        return False
    start = identity.get(start_key)
    if start is None:  # no /proc: the pid alone
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return _start_ticks(pid) == start


def wait_for_exit(identity: dict[str, Any] | None, timeout: float) -> bool:
    """Wait (up to ``timeout`` s) until the host described by ``identity`` (from a
    checkpoint) has exited, if the training process that started it is gone: it may
    still be writing the run of that killed process, which a resume continues. A host
    whose training process lives (this one) is not waited for. Returns whether it is
    gone or not waited for."""
    if not identity or _alive(identity, "parent", "parent_start"):
        return True
    end = time.monotonic() + timeout
    while _alive(identity):
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------------- parent side


class _Host:
    """A running host process and its control socket (training process side)."""

    def __init__(self) -> None:
        ctrl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, "HOOKLOOP_TRACKER_HOST_PATH": json.dumps(sys.path)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child.fileno()), str(_nice())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        except BaseException:
            ctrl.close()
            raise
        finally:
            child.close()
        self.ctrl: socket.socket | None = ctrl
        self.refs = 0
        self.identity = backend_identity(self.proc.pid)
        self.timer: threading.Timer | None = None
        _children.add(self)

    def alive(self) -> bool:
        return self.ctrl is not None and self.proc.poll() is None

    def retire(self) -> None:
        """No more channels: close the control socket (the host finishes and exits)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ctrl, self.ctrl = self.ctrl, None
        if ctrl is not None:
            ctrl.close()
            threading.Thread(target=self.proc.wait, name="hookloop-tracker-host-reaper",
                             daemon=True).start()


_lock = threading.Lock()
_current: list[_Host | None] = [None]
_children: weakref.WeakSet[_Host] = weakref.WeakSet()
_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


class Channel:
    """One tracker fit's connection to the host (training process side). Calls are
    made by one thread at a time (the tracker's backend lock)."""

    def __init__(self, sock: socket.socket, host: _Host) -> None:
        self._conn: Connection | None = Connection(sock.detach())
        self._host = host
        self.identity = host.identity
        self.ready = False  # the host rebuilt the tracker
        _channels.add(self)

    def send(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` (the host replies to each, in order)."""
        conn = self._conn
        if conn is None:
            raise BackendGone("BackendGone", "the channel to the tracker backend process is closed")
        data = _dumps(message)  # a record that does not pickle fails here, as that record
        try:
            conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            raise self._gone(exc) from exc

    def reply(self) -> tuple[Any, ...]:
        """The next reply (blocks, without the GIL, until it comes)."""
        conn = self._conn
        if conn is None:
            raise BackendGone("BackendGone", "the channel to the tracker backend process is closed")
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise self._gone(exc) from exc
        return pickle.loads(data)  # type: ignore[no-any-return]

    def call(self, kind: str, args: tuple[Any, ...], at: float, refresh: dict[str, Any] | None,
             sent: bool = False) -> dict[str, Any]:
        """Run ``_backend_<kind>(*args)`` in the host (``sent``: the call was sent
        already); returns the attributes it changed. Raises
        :class:`hookloop.tracking.RecordDropped`, :class:`Unloadable` (the host could
        not rebuild the tracker), :class:`BackendGone` or :class:`RemoteError`."""
        if not sent:
            self.send(("call", kind, args, at, refresh))
        while True:
            out = self.reply()
            if out[0] != "ready":
                break
            self.ready = True
        if out[0] == "ok":
            return out[1]  # type: ignore[no-any-return]
        if out[0] == "dropped":
            from hookloop.tracking import RecordDropped

            exc = RecordDropped(out[1])
            exc.exports = out[2]  # type: ignore[attr-defined]
            raise exc
        if out[0] == "unloadable":
            raise Unloadable("Unloadable", out[1])
        raise RemoteError(out[1], out[2], out[3], out[4])

    def _gone(self, exc: BaseException) -> BackendGone:
        code = self._host.proc.poll()
        why = f"exited with code {code}" if code is not None else f"{type(exc).__name__}: {exc}"
        return BackendGone("BackendGone", f"the tracker backend process {why}")

    def close(self) -> None:
        """End the channel: the host closes a run still open and serves nothing more."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(OSError, ValueError):
            conn.send_bytes(_dumps(("end",)))
        with contextlib.suppress(OSError):
            conn.close()
        _release(self._host)

    def _forget(self) -> None:
        """In a forked child: drop the descriptor without ending anything."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


def _dumps(message: tuple[Any, ...]) -> bytes:
    # plain pickle: multiprocessing's pickler would hand tensors over as shared memory
    # (torch registers that), which a process it did not start cannot open
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class Unloadable(RemoteError):
    """The host could not rebuild the tracker (its reply to the channel's ``init``)."""


def open_channel(payload: bytes) -> Channel:
    """A channel to the host (started when none runs), initialised with ``payload``
    (the pickled tracker and process context). Sending never waits for the host to
    start: the messages wait in the socket."""
    with _lock:
        host = _current[0]
        if host is None or not host.alive():
            if host is not None:
                host.retire()
            host = _current[0] = _Host()
        if host.timer is not None:
            host.timer.cancel()
            host.timer = None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(OSError):
                mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            assert host.ctrl is not None
            socket.send_fds(host.ctrl, [b"c"], [theirs.fileno()])
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        host.refs += 1
        channel = Channel(mine, host)
    channel.send(("init", payload))
    return channel


def _release(host: _Host) -> None:
    with _lock:
        host.refs -= 1
        if host.refs > 0 or host.ctrl is None:
            return
        if _current[0] is not host:
            host.retire()
            return
        timer = threading.Timer(LINGER_S, _expire, args=(host,))
        timer.daemon = True
        timer.name = "hookloop-tracker-host-linger"
        host.timer = timer
        timer.start()


def _expire(host: _Host) -> None:
    with _lock:
        if host.refs == 0:
            if _current[0] is host:
                _current[0] = None
            host.retire()


def shutdown(wait: float = 0.0) -> None:
    """Let the idle host exit now instead of after ``LINGER_S`` (channels still open
    keep it until they end); with ``wait`` > 0, wait that long for it to exit."""
    with _lock:
        host, _current[0] = _current[0], None
        if host is None:
            return
        if host.refs == 0:
            host.retire()
    if wait > 0 and host.refs == 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.proc.wait(wait)


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) must not hold the host's sockets: the
    host would not see the training process end."""
    for channel in list(_channels):
        channel._forget()
    for host in list(_children):
        ctrl, host.ctrl = host.ctrl, None
        if ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl.close()
        host.timer = None
    _current[0] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------- host side


def _lower_children(done: set[str]) -> None:
    """Give the processes this host started (an SDK's service, such as W&B's) the host's
    low priority: they inherit its nice value, but one that starts a session of its own
    gets a scheduling group of its own at full weight (Linux autogroup). ``done``: pids
    already seen."""
    me = str(os.getpid())
    nice = str(os.getpriority(os.PRIO_PROCESS, 0)) if hasattr(os, "getpriority") else None
    if nice is None or not os.path.isdir("/proc"):
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry in done:
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = fh.read().rsplit(")", 1)[1].split()[1]
            if ppid == me:
                done.add(entry)
                with open(f"/proc/{entry}/autogroup", "w", encoding="ascii") as fh:
                    fh.write(nice)
        except (OSError, IndexError):
            continue


def _watch_children() -> None:
    done: set[str] = set()
    while True:
        _lower_children(done)
        time.sleep(0.5)


_context_lock = threading.Lock()
_applied_env: set[str] = set()


def _apply_context(context: dict[str, Any]) -> None:
    """Make this process look like the training process to SDKs that record where a
    run comes from: its environment (a variable a previous channel brought and the
    training process no longer has is removed; what SDKs set here stays), working
    directory, ``sys.argv`` and main file."""
    with _context_lock:
        env = context.get("environ")
        if env is not None:
            for key in _applied_env - env.keys():
                os.environ.pop(key, None)
            os.environ.update(env)
            _applied_env.clear()
            _applied_env.update(env)
        cwd = context.get("cwd")
        if cwd:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        if context.get("argv") is not None:
            sys.argv[:] = list(context["argv"])
        main = sys.modules.get("__main__")
        if main is not None and context.get("main_file"):
            main.__file__ = context["main_file"]


class _Served:
    """The host's side of one channel."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.tracker: Any = None
        self.exported: dict[str, Any] = {}
        self.open = False
        self.parent_gone = False
        self.close_timeout = 30.0
        self.unloadable = "not initialised"

    def send(self, message: tuple[Any, ...]) -> None:
        if self.parent_gone:
            return
        try:
            data = _dumps(message)
        except Exception as exc:  # an exported value that does not pickle
            data = _dumps(("error", type(exc).__name__, f"reply does not pickle: {exc}", "", {}))
        try:
            self.conn.send_bytes(data)
        except (OSError, ValueError):
            self.parent_gone = True  # keep serving what was sent; nobody reads replies

    def exports(self) -> dict[str, Any]:
        names = getattr(type(self.tracker), "backend_exports", ())
        now = {name: getattr(self.tracker, name, None) for name in names}
        diff = {k: v for k, v in now.items() if k not in self.exported or self.exported[k] != v}
        self.exported.update(diff)
        return diff

    def init(self, payload: bytes) -> None:
        try:
            data = pickle.loads(payload)
            _apply_context(data.get("context", {}))
            cls, state = data["cls"], data["state"]
            tracker = cls.__new__(cls)
            tracker.__dict__.update(state)
            tracker._host_side()
            self.close_timeout = float(state.get("close_timeout", 30.0))
        except Exception as exc:
            self.unloadable = f"{type(exc).__name__}: {exc}"
            self.send(("unloadable", self.unloadable))
            return
        self.tracker = tracker
        self.exported = {name: state.get(name) for name in getattr(cls, "backend_exports", ())}
        self.send(("ready",))

    def call(self, kind: str, args: tuple[Any, ...], at: float, refresh: dict[str, Any] | None) -> None:
        from hookloop.tracking import RecordDropped

        tracker = self.tracker
        if refresh:
            tracker.__dict__.update(refresh)
        tracker.record_time = at
        try:
            if kind == "open":
                info = args[0] if args else {}
                wait_for_exit(info.get("previous_backend"), self.close_timeout + 10.0)
            getattr(tracker, f"_backend_{kind}")(*args)
        except RecordDropped as exc:
            tracker.dropped[str(exc) or kind] += 1
            self.send(("dropped", str(exc), self.exports()))
        except BaseException as exc:  # every failure goes back as a reply
            tracker.failed[kind] += 1
            tracker.last_error = f"{type(exc).__name__}: {exc}"
            self.send(("error", type(exc).__name__, str(exc), traceback.format_exc(), self.exports()))
        else:
            if kind == "metrics_batch":
                tracker.recorded["metrics"] += len(args[0])
            else:
                tracker.recorded[kind] += 1
            if kind == "open":
                self.open = True
            self.send(("ok", self.exports()))
        finally:
            if kind == "close":
                self.open = False

    def serve(self) -> None:
        ended = False
        try:
            while True:
                try:
                    data = self.conn.recv_bytes()
                except (EOFError, OSError):
                    break
                try:
                    message = pickle.loads(data)
                except Exception as exc:  # e.g. a record of a class this process cannot import
                    self.send(("error", type(exc).__name__, f"record does not unpickle: {exc}",
                               traceback.format_exc(), {}))
                    continue
                if message[0] == "end":
                    ended = True
                    break
                if message[0] == "init":
                    self.init(message[1])
                elif self.tracker is None:
                    self.send(("unloadable", self.unloadable))
                else:
                    self.call(*message[1:])
            if self.open:
                self._close_orphan(ended)
        finally:
            with contextlib.suppress(OSError):
                self.conn.close()

    def _close_orphan(self, ended: bool) -> None:
        """The channel ended with the run still open: the training process died (no
        ``end``), or its worker gave up before closing. Close the run."""
        tracker = self.tracker
        status = "failed" if ended else "killed"
        if not ended:
            tracker.last_error = ("the training process ended before closing the run; its backend "
                                  "process wrote what had been sent and closed the run")
        tracker.record_time = time.time()
        try:
            tracker._backend_close(status)
        except Exception:
            log.debug("hookloop tracker backend: closing an orphaned run failed", exc_info=True)


def _serve_channel(served: _Served) -> None:
    served.serve()


def serve_host(ctrl_fd: int) -> None:
    """The host process's main loop: a thread per channel received on ``ctrl_fd``;
    when the control socket ends, finish the channels and exit."""
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the training process closes the runs
    ctrl = socket.socket(fileno=ctrl_fd)
    if os.path.exists("/proc/self/autogroup"):
        threading.Thread(target=_watch_children, name="hookloop-tracker-children", daemon=True).start()
    threads: list[threading.Thread] = []
    served: list[_Served] = []
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 8)
        except OSError:
            break
        if not data and not fds:
            break
        for fd in fds:
            served.append(_Served(Connection(fd)))
            t = threading.Thread(target=_serve_channel, args=(served[-1],),
                                 name="hookloop-tracker-channel", daemon=True)
            t.start()
            threads.append(t)
    # the training process released this host or died: serve what the open channels hold
    end = time.monotonic() + max((s.close_timeout for s in served), default=0.0) + 10.0
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    if any(t.is_alive() for t in threads):
        os._exit(0)
    logging.shutdown()
    sys.exit(0)
