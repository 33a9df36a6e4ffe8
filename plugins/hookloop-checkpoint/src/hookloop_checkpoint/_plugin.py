"""The ``Checkpoint`` plugin: when to save, what to keep, how to write, how to resume."""

from __future__ import annotations

import _thread
import contextlib
import copy
import difflib
import logging
import math
import os
import shutil
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hookloop.errors import MonitorNotFoundError
from hookloop.plugins import hookimpl
from hookloop.resume import COMPILED_PREFIX, state_key
from hookloop_checkpoint._agreement import Agreement
from hookloop_checkpoint._io import (
    _TMP_RE,
    BUILTIN_FIELDS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    TMP_MARK,
    atomic_write,
    cleanup_tmp_files,
    fsync_dir,
    missing_fields,
    read_manifest,
    render_filename,
    sanitize_name,
    template_fields,
    write_manifest,
)
from hookloop_checkpoint._load import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    _load_any,
    is_sharded_checkpoint,
    load_shards,
)
from hookloop_checkpoint._sharded import finalize, remove_path, split, tmp_name, write_state
from hookloop_checkpoint._staging import StagingBuffer

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = ["Checkpoint", "CheckpointWriteError", "MonitorNotFoundError", "SaveStat"]

log = logging.getLogger("hookloop.checkpoint")

MODES = ("min", "max")
FORMATS = ("torch", "safetensors")


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, read-only directory, permissions, an
    error while serialising); the previous checkpoints are intact."""


@dataclass
class SaveStat:
    """Timing of one save.

    :ivar path: the checkpoint's main file (the directory of a sharded checkpoint).
    :ivar stall_s: seconds the training loop was blocked by this save (for an async
        save: building the state and copying it to CPU memory).
    :ivar write_s: seconds spent serialising and writing (on the writer thread for an
        async save; for an async sharded save, the wait for DCP's write at the next save
        or at the end of fit, plus the listing); ``None`` until the write finished.
    :ivar nbytes: bytes written (all files of the checkpoint).
    """

    path: str
    stall_s: float
    write_s: float | None = None
    nbytes: int = 0


class _Job:
    """One write, run inline (sync) or on the writer thread (async)."""

    def __init__(self, fn: Callable[[], dict[str, Any]], entry: dict[str, Any], prev: list[dict[str, Any]],
                 is_best: bool, metrics: dict[str, float], stat: SaveStat,
                 removed: list[dict[str, Any]]) -> None:
        self.fn = fn
        self.removed = removed
        self.entry = entry
        self.prev = prev
        self.is_best = is_best
        self.metrics = metrics
        self.stat = stat
        self.files: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.done: threading.Event | None = None  # set when an async write finished
        self.owner = True  # this rank lists the checkpoint (rank 0); others wrote shards only

    def run(self) -> None:
        start = time.perf_counter()
        try:
            self.files = self.fn()
        except BaseException as exc:  # surfaced on the training thread
            self.error = exc
        self.stat.write_s = time.perf_counter() - start
        self.fn = None  # type: ignore[assignment]  # drop the state (its tensors: the staging buffer's)

    def start(self) -> None:
        """Run on a writer thread of its own; :attr:`done` is set when it finished.

        Started with ``_thread`` rather than ``threading.Thread``: ``Thread.start`` waits
        until the new thread has run, and a writer that begins by serialising holds the
        GIL for a switch interval (5 ms) before it lets go, all of it added to the
        training thread's stall (measured: 5-9 ms per save against 0.1 ms)."""
        self.done = threading.Event()
        _thread.start_new_thread(self._run_and_signal, ())

    def _run_and_signal(self) -> None:
        try:
            self.run()
        finally:
            assert self.done is not None
            self.done.set()


def _plain_keys(model_state: Mapping[str, Any]) -> dict[str, Any]:
    """Model keys as the uncompiled model names them (``torch.compile`` adds
    ``_orig_mod.``), so a checkpoint loads into a compiled model and a plain one alike."""
    if not any(COMPILED_PREFIX in k for k in model_state):
        return dict(model_state)
    plain = {k.replace(COMPILED_PREFIX, ""): v for k, v in model_state.items()}
    return plain if len(plain) == len(model_state) else dict(model_state)


def _alias(fname: str, name: str, last_name: str) -> str:
    """The stable-name counterpart of one file of checkpoint ``name``."""
    return last_name + fname[len(name):]


def _entry_paths(entry: Mapping[str, Any]) -> set[str]:
    """What a listed checkpoint occupies in its folder: the directory of a sharded one,
    the files of another."""
    if entry.get("sharded"):
        return {entry["primary"]}
    return set(entry.get("files") or {entry["primary"]: None})


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _publish(directory: Path, entry: dict[str, Any], files: dict[str, Any], manifest: dict[str, Any],
             removed: list[dict[str, Any]], last_name: str | None, undo: Callable[[], None],
             trash: Path | None = None) -> None:
    """List the complete new checkpoint in the manifest, then delete what it replaces
    (``removed``, and ``trash``: a same-named sharded checkpoint moved aside). When the
    manifest cannot be written, ``undo`` takes the new checkpoint away again."""
    name = entry["name"]
    try:
        done = {**entry, "files": files}
        manifest["checkpoints"] = [done if e["seq"] == entry["seq"] else e for e in manifest["checkpoints"]]
        manifest["last"] = done["primary"]
        own = set(files) | _entry_paths(done)
        doomed = sorted(set().union(*(_entry_paths(old) for old in removed)) - own)
        # listed before the deletion: a run killed in between deletes them at its next start
        manifest["removing"] = doomed
        if last_name is not None:
            manifest["last_alias"] = f"{last_name}.pt"
            manifest["last_alias_files"] = [_alias(f, name, last_name) for f in files]
        write_manifest(directory, manifest)
    except BaseException:
        undo()
        raise
    if last_name is not None:
        for fname in files:
            _link_atomic(directory / fname, directory / _alias(fname, name, last_name))
    # only now, with the new checkpoint listed, delete what it replaces
    for fname in [*doomed, *([trash.name] if trash is not None else [])]:
        path = directory / fname
        try:
            if path.is_dir() and not path.is_symlink():  # a sharded checkpoint
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the new checkpoint is durable and listed: not a failed save
            log.warning("hookloop.checkpoint: cannot delete %s, replaced by %s: %s; it is "
                        "deleted at the next fit start", directory / fname, entry["primary"], exc)
    if doomed or trash is not None:
        with contextlib.suppress(OSError):
            fsync_dir(directory)


def _link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src``: a hard link (a copy where the file system
    has none) put in place with ``os.replace``, so ``dst`` is never missing or partial."""
    tmp = dst.parent / f".{dst.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f:
            atomic_write(tmp, lambda out: shutil.copyfileobj(f, out))
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dst.parent)


def _signum(sig: int | str | signal.Signals) -> int:
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else f"SIG{sig.upper()}"
        if not hasattr(signal, name):
            raise ValueError(f"unknown signal {sig!r}")
        return int(getattr(signal, name))
    return int(sig)


class Checkpoint:
    """Crash-safe checkpoints of the whole loop state, best-k selection, async saving,
    preemption handling and resume.

    When the loop's model is sharded with FSDP2 (``loop.sharded``: ``fully_shard``), a
    checkpoint is a directory ``<name>/``: every rank writes its shards of the model and
    optimizer state into it with ``torch.distributed.checkpoint`` (``async_save`` uses
    ``dcp.async_save``), rank 0 adds the rest of the loop state as ``loop.pt``, renames
    the directory into place and lists it in the manifest. Policy, naming, best-k,
    retention and ``resume`` work as for files; ``format="safetensors"``,
    ``save_model``, ``weights_only`` and ``last_name`` are refused for sharded models.

    :param dirpath: directory of the checkpoints and of their manifest
        (``checkpoints.json``), created if needed.
    :param monitor: metric ranking the checkpoints (e.g. ``"val/loss"``); ``None``
        keeps the newest ``top_k``. A metric that is never logged raises
        :class:`MonitorNotFoundError` listing the metrics that exist. A save is ranked
        only by a monitored value that belongs to the step being saved
        (``loop.state.metric_stamps``), so a checkpoint is never ranked with another
        state's score; a step save due at an epoch's last batch with a validation
        monitor waits for that epoch's validation and is written after it, and one due
        at a step the loop validates after (``Loop(val_every_n_steps=...)``) is written
        after that validation.
    :param mode: ``"min"`` or ``"max"``: which monitored values are better. NaN is never
        best; ties keep the older checkpoint.
    :param top_k: checkpoints kept by rank (``-1``: all; ``0``: none besides the last).
    :param save_last: always keep the newest checkpoint (the manifest's ``last``),
        and save the final state at the end of fit if it was not saved yet.
    :param every_n_epochs: save at the end of every Nth epoch (after validation and
        the epoch's scheduler step); ``None``/``0`` disables.
    :param every_n_steps: also save every N optimizer steps, mid-epoch.
    :param every_seconds: also save at the first optimizer step after this many
        seconds since the previous save.
    :param filename: template of the checkpoint name, with ``{epoch}`` (zero-based),
        ``{step}`` (global step) and any metric by its name (``{val/loss:.4f}``, or
        ``{val_loss}``). A malformed template (``{}``, ``{0}``, ``{epoch.real}``) raises
        ``ValueError`` here; a metric that is still missing once every metric had its
        chance (an epoch end with its validation) raises :class:`MonitorNotFoundError`
        listing the logged metrics; before that (a step save ahead of the first
        validation) it renders ``na``. Names are sanitised to plain file names inside
        ``dirpath`` (a score's ``-`` sign is kept); a clash gets ``-v1``, ``-v2``...
    :param format: ``"torch"`` (one ``.pt`` file) or ``"safetensors"`` (the weights in
        ``<name>.safetensors``, the rest of the state in ``<name>.pt``).
    :param save_model: also write the whole model object with ``torch.save(model)`` to
        ``<name>.model.pt``. That file is a pickle: load it only from a trusted source
        (``torch.load(path, weights_only=False)``); this package's loaders refuse it.
    :param async_save: copy the state to CPU memory on the training thread and write it
        on a background thread. At most one write is in flight: a save requested while
        the previous write runs waits for it first (no save is dropped). Writer errors
        are raised at the next save or at the end of fit; fit returns only once the
        last write is durable. The copy goes into a staging buffer kept across saves
        (one extra copy of the state in host memory, pinned when the state is on CUDA),
        released at ``loop.close()`` or when ``async_save`` is turned off. For a sharded
        model, DCP's own ``async_save`` stages the shards to CPU memory and writes them
        on its thread, its collectives on a gloo process group of their own (created at
        the first such save, destroyed at ``loop.close()``); the staging buffer is not
        used, and the checkpoint is listed once every rank's write is done.
    :param resume: ``"latest"`` resumes from the newest complete checkpoint in
        ``dirpath`` when there is one (a fresh start when the directory has none), or a
        path to resume from; supplied through ``on_resume`` at the start of the first
        fit of each loop, so everything is restored before any ``on_fit_start``. Same
        effect as ``loop.fit(..., resume=load_checkpoint(..., loop=loop))``. A path may
        name the directory of one sharded checkpoint.
    :param signals: signals that trigger a save at the next optimizer-step boundary and
        a clean stop (preemption); the handlers installed before are called too and are
        restored at the end of fit. ``()`` disables. Add ``"SIGINT"`` to checkpoint on
        Ctrl-C instead of aborting mid-step.
    :param agree_every_n_steps: under DDP, how often the ranks exchange what decides a
        save that not every rank sees alike (a signal, ``every_seconds``): every this
        many optimizer steps each rank starts a non-blocking all-reduce on a gloo side
        group of CPU tensors and acts on its result at the next step, so every rank saves
        at the same step, within ``agree_every_n_steps + 1`` steps of a signal, with no
        host-device sync (see docs/distributed.md, "SLURM and preemption").
    :param exit_on_signal: after a signal-triggered save and stop, raise
        ``SystemExit(128 + signum)`` (143 for SIGTERM) at the end of fit; with
        ``False`` fit returns with ``state.stop_reason`` naming the signal.
    :param verbose: log each save at INFO level (path, metric, size).
    :param last_name: also keep ``<last_name>.pt`` (e.g. ``"last"``) as the newest
        checkpoint under a stable name: a hard link to it (a copy where the file system
        has none), replaced atomically after each save. It survives the rotation of the
        file it points at. Not listed as a checkpoint of its own.
    :param save_on_exception: when fit raises (including ``KeyboardInterrupt``), save
        the state at that moment (always kept, named by ``filename``, the manifest entry
        marked ``"reason": "exception"``). Only in one process: under DDP the other
        ranks cannot join a collective save, so it logs why it did not save.
    :param weights_only: save only the model's ``state_dict`` (no optimizer, counters,
        RNG or plugin state). Such a checkpoint loads with :func:`hookloop_checkpoint.load`
        but never resumes a run: ``load_checkpoint`` and ``resume="latest"`` skip it.
    :param enable_version_counter: ``True`` (default): a name that is taken gets
        ``-v1``, ``-v2``...; ``False``: the new checkpoint replaces the file of that name
        (atomically; the replaced checkpoint leaves the manifest).
    """

    hookloop_name = "checkpoint"
    hookloop_on_error = "raise"
    # without its bookkeeping the plugin rebuilds it from the manifest on disk: a resume
    # (or an evaluation loop without this plugin) is not wrong, only warned about
    hookloop_state_required = False

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        monitor: str | None = None,
        mode: str = "min",
        top_k: int = 1,
        save_last: bool = True,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        every_seconds: float | None = None,
        filename: str = "{epoch:03d}-{step}-{val/loss:.4f}",
        format: str = "torch",
        save_model: bool = False,
        async_save: bool = False,
        resume: str | os.PathLike[str] | None = None,
        signals: Iterable[int | str] = ("SIGTERM", "SIGUSR1"),
        exit_on_signal: bool = True,
        verbose: bool = True,
        last_name: str | None = None,
        save_on_exception: bool = False,
        weights_only: bool = False,
        enable_version_counter: bool = True,
        agree_every_n_steps: int = 10,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if format not in FORMATS:
            raise ValueError(f"format={format!r}; expected one of {FORMATS}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            raise ValueError(f"top_k must be an int >= -1; got {top_k!r}")
        if top_k == 0 and not save_last:
            raise ValueError("top_k=0 with save_last=False would never keep a checkpoint")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None; got {value!r}")
        if isinstance(agree_every_n_steps, bool) or not isinstance(agree_every_n_steps, int) \
                or agree_every_n_steps < 1:
            raise ValueError(f"agree_every_n_steps must be a positive int; got {agree_every_n_steps!r}")
        if every_seconds is not None and not (isinstance(every_seconds, (int, float)) and every_seconds > 0):
            raise ValueError(f"every_seconds must be a positive number; got {every_seconds!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a metric name or None; got {monitor!r}")
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"filename must be a non-empty template; got {filename!r}")
        template_fields(filename)  # a malformed template fails now, naming itself
        render_filename(filename, {"epoch": 0, "step": 0})
        if last_name is not None and (not isinstance(last_name, str) or sanitize_name(last_name) != last_name
                                      or last_name.endswith((".pt", ".safetensors"))):
            raise ValueError(f"last_name must be a plain file name without extension (e.g. 'last'); "
                             f"got {last_name!r}")
        if weights_only and str(resume) in ("latest", "last"):
            raise ValueError(f"weights_only=True with resume={resume!r}: weights-only checkpoints "
                             "cannot resume a run; drop resume or save full checkpoints")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.top_k = top_k
        self.save_last = bool(save_last)
        self.every_n_epochs = every_n_epochs or None
        self.every_n_steps = every_n_steps or None
        self.every_seconds = every_seconds
        self.filename = filename
        self.format = format
        self.save_model = bool(save_model)
        self.async_save = bool(async_save)
        self.resume = resume
        self.signals = tuple(_signum(s) for s in signals)
        self.exit_on_signal = bool(exit_on_signal)
        self.verbose = bool(verbose)
        self.last_name = last_name
        self.save_on_exception = bool(save_on_exception)
        self.weights_only = bool(weights_only)
        self.enable_version_counter = bool(enable_version_counter)
        self.agree_every_n_steps = agree_every_n_steps
        self._agreement = Agreement(agree_every_n_steps)
        self._fields = [f for f in template_fields(filename) if f not in BUILTIN_FIELDS]
        self._all_metrics_seen = False  # an epoch end with its validation happened
        self._skipped_unscored = 0  # saves not written: no finite score, save_last=False

        self.stats: list[SaveStat] = []
        """One :class:`SaveStat` per save of this plugin object, in order."""
        self._entries: list[dict[str, Any]] = []
        self._seq = 0
        self._best: str | None = None
        self._last_key: tuple[Any, ...] | None = None
        self._deferred = False  # a step save waiting for this epoch's validation
        self._deferred_step: int | None = None  # one waiting for a validation at that step
        self._job: _Job | None = None
        self._staging: StagingBuffer | None = None  # host copy of the state, async saves only
        self._async_group: Any = None  # process group of async sharded saves (DCP's thread)
        self._async_group_for: Any = None  # the default group it was made in
        self._resumed_for: Any = None  # weakref of the loop the resume was supplied to
        self._restored = False
        self._validated = False
        self._last_save_time = time.monotonic()
        self._remote: tuple[str, dict[str, float], bool] | None = None  # async save under DDP
        self._signal_pending: int | None = None  # agreed by every rank: act on it
        self._signal_local: int | None = None  # received by this process
        self._preempted: int | None = None
        self._prev_handlers: dict[int, Any] = {}
        self._warned_foreign = False
        self._warned_stray = False

    # ------------------------------------------------------------------ public

    @property
    def last_path(self) -> Path | None:
        """The newest complete checkpoint's main file (``None`` before the first save)."""
        done = [e for e in self._entries if e.get("files")]
        return self.dirpath / done[-1]["primary"] if done else None

    @property
    def best_path(self) -> Path | None:
        """The best checkpoint by ``monitor`` (``None`` without a monitor or a score)."""
        return self.dirpath / self._best if self._best else None

    @property
    def best_score(self) -> float | None:
        """The monitored value of the best checkpoint."""
        for e in self._entries:
            if e["primary"] == self._best:
                return e["score"]
        return None

    def wait(self, loop: Loop | None = None) -> None:
        """Wait until the in-flight async write is durable; raise its error, if any,
        and announce the checkpoint (``on_checkpoint_saved``) when ``loop`` is given."""
        self._finish_pending(loop, raise_errors=True)

    def save(self, loop: Loop, metrics: Mapping[str, float] | None = None) -> Path | None:
        """Save a checkpoint now (every rank must call it under DDP; rank 0 writes, or
        every rank its shards for a sharded model).

        Returns the path of the main file (of the directory, for a sharded model;
        already durable for a sync save), or ``None`` when the retention policy would not
        keep this checkpoint.
        """
        return self._save(loop, dict(metrics or {}))

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        """Identity of this plugin's state in a loop checkpoint: its folder and monitor,
        so two checkpoint plugins never swap state."""
        return state_key("checkpoint", dirpath=str(self.dirpath), monitor=self.monitor)

    def state_dict(self) -> dict[str, Any]:
        """Bookkeeping saved in the loop's checkpoint: the kept checkpoints with their
        scores, the best, the save counter and the monitor."""
        return {
            "entries": [dict(e) for e in self._entries],
            "seq": self._seq,
            "best": self._best,
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; checkpoints whose files are gone are dropped."""
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            log.warning("hookloop.checkpoint: resumed state ranked by %r (%s); now %r (%s): "
                        "the kept checkpoints are ranked again", state.get("monitor"),
                        state.get("mode"), self.monitor, self.mode)
        self._entries = [dict(e) for e in state.get("entries", [])]
        self._seq = int(state.get("seq", 0))
        self._best = state.get("best")
        self._restored = True

    # ------------------------------------------------------------------ hooks

    @hookimpl(tryfirst=True)
    def on_fit_start(self, loop: Loop) -> None:
        """Prepare the directory, resume if asked, install the signal handlers."""
        if loop.sharded:
            self._check_sharded_options()
        if loop.state.is_global_zero:
            try:
                self.dirpath.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointWriteError(
                    f"cannot create checkpoint directory {self.dirpath}: {exc}") from exc
            stale = cleanup_tmp_files(self.dirpath)
            if stale:
                log.info("hookloop.checkpoint: removed %d temporary file(s) of interrupted writes",
                         len(stale))
            self._cleanup_replaced()
        self._reconcile(loop)
        self._restored = False
        self._all_metrics_seen = False
        self._skipped_unscored = 0
        self._preempted = None
        self._signal_pending = None
        self._signal_local = None
        self._last_save_time = time.monotonic()
        if loop.state.world_size > 1:
            self._agreement.start()
        self._install_signals()

    @hookimpl
    def on_resume(self, loop: Loop) -> dict[str, Any] | None:
        """Supply the checkpoint named by ``resume`` at the first fit of a loop; the
        loop validates and restores it before any ``on_fit_start``. Under DDP the ranks
        compare what each found (one ``all_gather_object``) and every rank raises
        :class:`ResumeDisagreementError` when they differ (a node-local ``dirpath``)."""
        if self.resume is None or (self._resumed_for is not None and self._resumed_for() is loop):
            return None
        self._resumed_for = weakref.ref(loop)
        source = self.dirpath if str(self.resume) in ("latest", "last") else Path(self.resume)  # type: ignore[arg-type]
        ckpt: dict[str, Any] | None = None
        error: Exception | None = None
        try:
            ckpt = self._find_resume(source, loop)
        except Exception as exc:  # shared with the other ranks first, then raised
            error = exc
        if loop.state.world_size > 1:
            _agree_on_resume(source, ckpt, error)
        if error is not None:
            raise error
        if ckpt is not None and ckpt.get("sharded") and "model" not in ckpt:
            # the ranks agreed on this sharded checkpoint: now the collective load
            ckpt = load_shards(ckpt, loop)
        if ckpt is not None:
            info = ckpt.get("checkpoint", {})
            log.info("hookloop.checkpoint: resuming from %s (epoch %s, step %s)", info.get("path"),
                     ckpt["loop"].get("epoch"), ckpt["loop"].get("global_step"))
        return ckpt

    def _find_resume(self, source: Path, loop: Loop) -> dict[str, Any] | None:
        """The checkpoint at ``source``; ``None`` for a fresh start (no checkpoint in
        ``dirpath`` yet). A sharded checkpoint comes without its shards: loading them is
        a collective, made once the ranks agreed on what they found."""
        try:
            return _load_any(source, loop.device, "latest", weights_ok=False, loop=loop, shards=False)
        except CheckpointNotFoundError:
            if source == self.dirpath and not (self.dirpath / "checkpoints.json").exists():
                log.info("hookloop.checkpoint: no checkpoint in %s yet; starting fresh", self.dirpath)
                return None
            raise

    @hookimpl
    def on_load_checkpoint(self, loop: Loop) -> None:
        """The restored state is a saved one: the end of fit does not save it again (a
        resumed finished run writes nothing)."""
        self._last_key = self._state_key(loop)

    def _check_sharded_options(self) -> None:
        """Refuse the options that write one file of the whole model: a sharded model's
        checkpoint is a directory of shards written by every rank."""
        refused = [text for on, text in (
            (self.format != "torch", f"format={self.format!r}"),
            (self.save_model, "save_model=True"),
            (self.weights_only, "weights_only=True"),
            (self.last_name is not None, f"last_name={self.last_name!r}"),
        ) if on]
        if refused:
            raise ValueError(
                f"Checkpoint({', '.join(refused)}) is not supported with a model sharded by "
                f"fully_shard: its checkpoints are directories of shards that every rank writes "
                f"with torch.distributed.checkpoint. Drop {'these options' if len(refused) > 1 else 'it'}; "
                f"for one file of the full weights use torch.distributed.checkpoint.state_dict."
                f"get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                f"cpu_offload=True)) on every rank")

    def _cleanup_replaced(self) -> None:
        """Delete the files a previous run replaced but was killed before deleting (the
        manifest's ``removing`` list: written before the deletion, so a file in it that
        no checkpoint lists is ours and dead); warn once about other unlisted files."""
        try:
            disk = read_manifest(self.dirpath)
        except ValueError:
            return
        if disk is None:
            return
        listed: set[str] = set()
        for e in disk.get("checkpoints", []):
            listed |= set(e.get("files") or {e.get("primary"): None}) | {e.get("primary")}
        alias = set(disk.get("last_alias_files") or [])
        freed, gone = 0, []
        for fname in disk.get("removing") or []:
            if (not isinstance(fname, str) or fname in listed or fname in alias
                    or sanitize_name(fname) != fname):
                continue
            path = self.dirpath / fname
            try:
                size = _size(path)
                remove_path(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("hookloop.checkpoint: cannot delete %s, replaced by a newer checkpoint: %s; "
                            "delete it by hand", path, exc)
                continue
            freed += size
            gone.append(fname)
        own = listed | alias | {MANIFEST_NAME}
        for e in self._entries:
            own |= set(e.get("files") or {e["primary"]: None}) | {e["primary"]}
        try:
            names = os.listdir(self.dirpath)
        except OSError:
            return
        for fname in names:
            # a sharded checkpoint renamed into place by a run stopped before it was listed:
            # incomplete by the protocol (the manifest is the commit), removed like temporary files
            path = self.dirpath / fname
            if fname in own or _TMP_RE.match(fname) or not is_sharded_checkpoint(path):
                continue
            try:
                size = _size(path)
                remove_path(path)
            except OSError as exc:
                log.warning("hookloop.checkpoint: cannot delete %s, a sharded checkpoint that %s does "
                            "not list: %s", path, MANIFEST_NAME, exc)
                continue
            freed += size
            gone.append(fname)
        if gone:
            fsync_dir(self.dirpath)
            log.warning("hookloop.checkpoint: deleted %d file(s) or folder(s) (%.1f MB) that a stopped "
                        "run had replaced, or written but not listed: %s", len(gone), freed / 1e6, gone)
        if self._warned_stray:
            return
        stray = sorted(n for n in names if n.endswith((".pt", ".safetensors")) and n not in own
                       and not _TMP_RE.match(n))
        if stray:
            self._warned_stray = True
            size = sum((self.dirpath / n).stat().st_size for n in stray if (self.dirpath / n).is_file())
            log.warning("hookloop.checkpoint: %s holds %d checkpoint file(s) that %s does not list "
                        "(%s, %.1f MB), left by a run stopped between writing and listing them, or "
                        "put there by hand; they are left in place: delete them if unneeded",
                        self.dirpath, len(stray), MANIFEST_NAME, stray[:5], size / 1e6)

    def _reconcile(self, loop: Loop) -> None:
        """Match the bookkeeping with the files on disk (rank 0 reads the manifest)."""
        try:
            disk = read_manifest(self.dirpath) if self.dirpath.is_dir() else None
        except ValueError as exc:
            log.warning("hookloop.checkpoint: %s; it will be rewritten at the next save", exc)
            disk = None
        known = {e["primary"]: e for e in (disk or {}).get("checkpoints", [])}
        if self._restored:
            kept = []
            for e in self._entries:
                on_disk = known.get(e["primary"])
                if on_disk is not None:
                    kept.append({**e, "files": on_disk.get("files", e.get("files"))})
                elif all((self.dirpath / f).exists() for f in e.get("files") or {e["primary"]: None}):
                    kept.append(e)
            self._entries = kept
            if self._best not in {e["primary"] for e in kept}:
                self._best = self._pick_best(kept)
        foreign = sorted(set(known) - {e["primary"] for e in self._entries})
        if foreign and not self._warned_foreign and loop.state.is_global_zero:
            self._warned_foreign = True
            log.warning("hookloop.checkpoint: %s holds %d checkpoint(s) this run does not track "
                        "(%s); they are left in place", self.dirpath, len(foreign), foreign[:5])
        self._seq = max([self._seq, *(e.get("seq", 0) for e in known.values())])

    @hookimpl
    def on_train_epoch_start(self) -> None:
        """Reset the per-epoch validation flag."""
        self._validated = False
        self._deferred = False

    @hookimpl
    def on_validation_end(self, loop: Loop) -> None:
        """Note that validation ran this epoch (for the missing-monitor check), and write
        a step save that waited for a validation at its step (``val_every_n_steps``)."""
        self._validated = True
        if self._deferred_step is not None and self._deferred_step == loop.state.global_step:
            self._deferred_step = None
            self._save(loop, {})

    @hookimpl(trylast=True)
    def on_train_batch_end(self, loop: Loop) -> None:
        """Save every ``every_n_steps`` steps / ``every_seconds``, or when preempted;
        runs after the other plugins' ``on_train_batch_end``, so that their state in the
        checkpoint includes this step."""
        state = loop.state
        if not state.stepped:
            return  # never between accumulation micro-batches: gradients are not in the state
        time_due = self.every_seconds is not None and (
            time.monotonic() - self._last_save_time >= self.every_seconds
        )
        if state.world_size > 1:
            # ranks disagree on clocks and signal arrival: act on the vote every rank
            # started at the previous step, so that every rank saves at the same step
            agreed = self._agreement.step(state.global_step, self._signal_local, time_due)
            time_due = agreed is not None and self._take(agreed)
        if state.world_size == 1 and self._signal_local is not None:
            self._signal_pending = self._signal_local  # nobody else to agree with
        if self._signal_pending is not None and self._preempted is None:
            self._preempt(loop)
            return
        if time_due or (self.every_n_steps is not None and state.global_step % self.every_n_steps == 0):
            if self._validates_at_this_step(loop):
                self._deferred_step = loop.state.global_step
            elif self._waits_for_validation(loop):
                self._deferred = True
            else:
                self._save(loop, {})

    def _validates_at_this_step(self, loop: Loop) -> bool:
        """A step save whose validation monitor is not yet this step's, at a step after
        which the loop validates (``val_every_n_steps``): save after that validation."""
        every = getattr(loop, "val_every_n_steps", None)
        monitor = self.monitor
        if not every or monitor is None or not monitor.startswith("val/") or loop.val_data is None:
            return False
        stamp = loop.state.metric_stamps.get(monitor)
        fresh = stamp is not None and stamp.step == loop.state.global_step
        return not fresh and loop.state.global_step % every == 0

    def _waits_for_validation(self, loop: Loop) -> bool:
        """A step save at an epoch's last batch whose validation monitor is not yet
        this step's: the epoch's validation is about to run, so save after it."""
        monitor = self.monitor
        if monitor is None or not monitor.startswith("val/") or loop.val_data is None:
            return False
        stamp = loop.state.metric_stamps.get(monitor)
        if stamp is not None and stamp.step == loop.state.global_step:
            return False
        try:
            last = loop.state.epoch_batches_done == len(loop.train_data)  # type: ignore[arg-type]
        except TypeError:
            return False
        every = loop.val_every_n_epochs
        final = loop.state.max_epochs is not None and loop.state.epoch + 1 >= loop.state.max_epochs
        return last and ((loop.state.epoch + 1) % every == 0 or final)

    @hookimpl
    def on_train_epoch_end(self, loop: Loop, epoch: int, metrics: Mapping[str, float]) -> None:
        """Save at the end of every ``every_n_epochs`` epochs, after validation."""
        if self._preempted is not None:
            return  # the step-boundary checkpoint is the resume point
        if loop.state.world_size > 1:
            self._take(self._agreement.now(self._signal_local, False))
        elif self._signal_local is not None:
            self._signal_pending = self._signal_local
        if self._signal_pending is not None:
            self._preempt(loop, dict(metrics))
            return
        self._check_monitor(loop, metrics)
        if self._validated or loop.val_data is None:
            self._all_metrics_seen = True  # a template field still missing now never comes
        deferred, self._deferred = self._deferred, False
        if deferred or (self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0):
            self._save(loop, dict(metrics))

    @hookimpl(wrapper=True)
    def on_fit_end(self, loop: Loop) -> Any:
        """Save the final state if it was not saved, wait for the last write, restore the
        signal handlers; after the other plugins ran, exit on a preemption signal."""
        try:
            if self._preempted is None and self.save_last and self._state_key(loop) != self._last_key:
                self._save(loop, {})
            self._finish_pending(loop, raise_errors=True)
            if self._skipped_unscored and not self._entries and loop.state.is_global_zero:
                log.warning("hookloop.checkpoint: Checkpoint(monitor=%r, save_last=False) saved no "
                            "checkpoint in this fit: at all %d save(s) %r had no finite value of "
                            "that step. Log a finite %r, or pass save_last=True to keep the newest "
                            "state anyway",
                            self.monitor, self._skipped_unscored, self.monitor, self.monitor)
            if loop.state.world_size > 1:
                loop.barrier()
        finally:
            self._restore_signals()
        result = yield
        if self._preempted is not None and self.exit_on_signal:
            code = 128 + self._preempted
            log.warning("hookloop.checkpoint: exiting with code %d after %s", code,
                        signal.Signals(self._preempted).name)
            raise SystemExit(code)
        return result

    @hookimpl
    def on_close(self, loop: Loop) -> None:
        """Release the writer thread's pending job and the signal handlers if a fit left
        them (a crash that skipped ``on_exception``), and the async saves' staging buffer."""
        try:
            self._finish_pending(loop, raise_errors=False, sync_ranks=False)
        finally:
            self._staging = None  # no write reads it any more
            self._restore_signals()
            group, self._async_group = self._async_group, None
            if group is not None:
                import torch.distributed as tdist

                with contextlib.suppress(Exception):  # the default group may be gone already
                    tdist.destroy_process_group(group)

    @hookimpl
    def on_exception(self, loop: Loop, exception: BaseException) -> None:
        """Make the in-flight write durable (its error is logged, the original exception
        propagates) and restore the signal handlers."""
        try:
            # no barrier: the other ranks may be gone
            self._agreement.drop()
            self._finish_pending(loop, raise_errors=False, sync_ranks=False)
            if self.save_on_exception:
                self._save_on_exception(loop, exception)
        finally:
            self._restore_signals()

    def _save_on_exception(self, loop: Loop, exception: BaseException) -> None:
        if loop.state.world_size > 1:
            log.warning("hookloop.checkpoint: not saved on exception (%s): the other ranks cannot join "
                        "a collective save (world_size=%d); resume from the last regular checkpoint",
                        type(exception).__name__, loop.state.world_size)
            return
        if self._state_key(loop) == self._last_key:
            log.info("hookloop.checkpoint: %s: this state is already saved", type(exception).__name__)
            return
        save_last, self.save_last = self.save_last, True  # an exception save is always kept
        try:
            path = self._save(loop, {}, reason="exception")
            self._finish_pending(loop, raise_errors=True, sync_ranks=False)
            log.warning("hookloop.checkpoint: %s raised: saved the state at step %d to %s",
                        type(exception).__name__, loop.state.global_step, path)
        except Exception as exc:  # never replace the original exception
            log.error("hookloop.checkpoint: saving on exception (%s) failed: %r",
                      type(exception).__name__, exc)
        finally:
            self.save_last = save_last

    # ------------------------------------------------------------------ policy

    def _state_key(self, loop: Loop) -> tuple[Any, ...]:
        s = loop.state
        if s.epoch_done:  # the end of epoch e is the start of epoch e + 1
            return (s.epoch + 1, s.global_step, 0)
        return (s.epoch, s.global_step, s.epoch_batches_done)

    def _check_monitor(self, loop: Loop, metrics: Mapping[str, float]) -> None:
        monitor = self.monitor
        if monitor is None or monitor in metrics or monitor in loop.state.metrics:
            return
        if self._validated or loop.val_data is None:
            available = sorted({*loop.state.metrics, *metrics})
            close = difflib.get_close_matches(monitor, available, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MonitorNotFoundError(
                f"Checkpoint(monitor={monitor!r}): no such metric was logged{hint} "
                f"Available metrics: {available}"
            )

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _rank_key(self, e: Mapping[str, Any]) -> tuple[float, int]:
        score = e["score"]
        return (score if self.mode == "min" else -score, e["seq"])

    def _ranked(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.monitor is None:
            return sorted(entries, key=lambda e: -e["seq"])
        scored = [e for e in entries if e.get("score") is not None and math.isfinite(e["score"])]
        return sorted(scored, key=self._rank_key)

    def _pick_best(self, entries: list[dict[str, Any]]) -> str | None:
        if self.monitor is None:
            return None
        ranked = self._ranked(entries)
        return ranked[0]["primary"] if ranked else None

    def _retain(self, entries: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
        ranked = self._ranked(entries)
        top = ranked if self.top_k == -1 else ranked[: self.top_k]
        keep = {id(e) for e in top}
        if self.save_last:
            keep.add(id(new))
        return [e for e in entries if id(e) in keep]

    def _unique_name(self, base: str) -> str:
        taken = {e["name"] for e in self._entries}
        if self.last_name is not None:
            taken.add(self.last_name)
        if not self.enable_version_counter and base not in {self.last_name}:
            return base  # the new checkpoint replaces one of that name
        name = base
        n = 0
        while name in taken or any((self.dirpath / f).exists() for f in self._file_names(name)):
            n += 1
            name = f"{base}-v{n}"
        return name

    def _file_names(self, name: str) -> list[str]:
        names = [name, f"{name}.pt"]  # a sharded checkpoint is the directory ``name``
        if self.format == "safetensors":
            names.append(f"{name}.safetensors")
        if self.save_model:
            names.append(f"{name}.model.pt")
        return names

    # ------------------------------------------------------------------ saving

    def _save(self, loop: Loop, epoch_metrics: dict[str, float], reason: str | None = None) -> Path | None:
        start = time.perf_counter()
        self._finish_pending(loop, raise_errors=True)
        wait_s = time.perf_counter() - start
        state = loop.state
        metrics = {**state.metrics, **epoch_metrics}
        score: float | None = None
        stamp = state.metric_stamps.get(self.monitor) if self.monitor is not None else None
        if self.monitor is not None and self.monitor in metrics and (
            self.monitor in epoch_metrics or (stamp is not None and stamp.step == state.global_step)
        ):  # a value of this very step, never one of an earlier state
            score = float(metrics[self.monitor])
        namespace = {**metrics, "epoch": state.epoch, "step": state.global_step}
        missing = missing_fields(self.filename, namespace) if self._fields else []
        if missing and reason is None and self._all_metrics_seen:
            available = sorted(metrics)
            close = difflib.get_close_matches(missing[0], available, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MonitorNotFoundError(
                f"Checkpoint(filename={self.filename!r}): {missing} never logged{hint} Name "
                f"{{epoch}}, {{step}} or one of the available metrics: {available}"
            )
        base = render_filename(self.filename, namespace)
        name = self._unique_name(base)
        seq = self._seq + 1
        sharded = loop.sharded
        if sharded:
            self._check_sharded_options()
        entry: dict[str, Any] = {
            "name": name,
            "primary": name if sharded else f"{name}.pt",
            "seq": seq,
            "epoch": state.epoch,
            "step": state.global_step,
            "epoch_done": bool(state.epoch_done),
            "score": score,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "time": time.time(),
            "format": self.format,
        }
        if self.weights_only:
            entry["weights_only"] = True
        if sharded:
            entry["sharded"] = True
        if reason is not None:
            entry["reason"] = reason
        before = list(self._entries)
        after = self._retain([*before, entry], entry)
        self._last_key = self._state_key(loop)
        self._last_save_time = time.monotonic()
        if not any(e is entry for e in after):
            if self.monitor is not None and (score is None or not math.isfinite(score)):
                self._skipped_unscored += 1
                if self._skipped_unscored == 1 and state.is_global_zero:
                    log.warning("hookloop.checkpoint: not saved at step %d: %r has no finite value of "
                                "this step (%s) and save_last=False keeps only ranked checkpoints; "
                                "log a finite %r at the save, or pass save_last=True",
                                state.global_step, self.monitor, score, self.monitor)
            else:
                log.debug("hookloop.checkpoint: %s would not be kept (score %s); not written", name, score)
            return None
        if name != base and any(e["name"] == base for e in before) and not any(
                e["name"] == base for e in after):
            # the name's owner is rotated out by this very save: take its name over instead
            # of a -v1 (top_k=1 with a fixed name never alternates name / name-v1)
            name = entry["name"] = base
            entry["primary"] = base if sharded else f"{base}.pt"
        # a checkpoint of the same name (enable_version_counter=False) is replaced
        after = [e for e in after if e is entry or e["name"] != name]
        removed = [e for e in before if not any(e is k for k in after)]
        prev_best, prev_seq = self._best, self._seq
        is_best = score is not None and math.isfinite(score) and (
            self.best_score is None or self._better(score, self.best_score)
        )
        self._entries, self._seq = after, seq
        self._best = self._pick_best(after)
        stat = SaveStat(str(self.dirpath / entry["primary"]), 0.0)
        try:
            if self.weights_only:
                ckpt = {"model": loop.module.state_dict()}
            else:
                ckpt = loop.state_dict()  # every rank: RNG states are gathered
            ckpt["model"] = _plain_keys(ckpt["model"])
            ckpt["checkpoint"] = {
                "format": CHECKPOINT_FORMAT,
                "version": FORMAT_VERSION,
                "name": name,
                "metrics": dict(entry["metrics"]),
                "monitor": self.monitor,
                "score": score,
                "time": entry["time"],
            }
            if self.weights_only:
                ckpt["checkpoint"]["weights_only"] = True
            if reason is not None:
                ckpt["checkpoint"]["reason"] = reason
            job = None
            if not self.async_save:
                self._staging = None
            if sharded:  # every rank writes its shards
                job = self._start_sharded(loop, ckpt, entry, before, removed, is_best, stat)
            elif state.is_global_zero:
                if self.async_save:
                    # the previous write, which read these buffers, is finished (waited
                    # for at the top of this method): they can be overwritten
                    if self._staging is None:
                        self._staging = StagingBuffer()
                    ckpt = self._staging.copy(ckpt)
                model_obj = None
                if self.save_model:
                    # a frozen copy for the writer thread; the live module keeps training
                    model_obj = copy.deepcopy(loop.module) if self.async_save else loop.module
                manifest = self._manifest_base()
                write = self._make_write(ckpt, entry, manifest, removed, model_obj)
                job = _Job(write, entry, before, is_best, entry["metrics"], stat, removed)
                if self.async_save:
                    self._job = job
                    job.start()
                else:
                    job.run()
            if self.async_save and state.world_size > 1:
                self._remote = (stat.path, dict(entry["metrics"]), is_best)
        except BaseException:
            self._entries, self._seq, self._best = before, prev_seq, prev_best
            raise
        finally:
            if state.world_size > 1 and not self.async_save:
                loop.barrier()  # rank 0 wrote (or failed); nobody waits forever
        stat.stall_s = time.perf_counter() - start - wait_s
        self.stats.append(stat)
        if job is not None and not self.async_save:
            self._complete(loop, job, raise_errors=True)
        elif job is None and not self.async_save:
            h = loop.callers.on_checkpoint_saved  # rank != 0: rank 0 wrote it before the barrier
            if h is not None:
                h(loop, stat.path, dict(entry["metrics"]), is_best)
        return self.dirpath / entry["primary"]

    def _start_sharded(self, loop: Loop, ckpt: dict[str, Any], entry: dict[str, Any],
                       before: list[dict[str, Any]], removed: list[dict[str, Any]], is_best: bool,
                       stat: SaveStat) -> _Job:
        """Write a sharded checkpoint (see :mod:`hookloop_checkpoint._sharded`): every rank
        its shards through torch.distributed.checkpoint, rank 0 the small state, the
        rename and the manifest. A synchronous save is done when this returns; an async
        one (``dcp.async_save``, which copies the shards to CPU memory first) finishes,
        on every rank, at the next save or at the end of fit."""
        import torch.distributed.checkpoint as dcp

        name, owner = entry["name"], loop.state.is_global_zero
        directory = self.dirpath
        small, shards = split(ckpt)
        tmp = directory / tmp_name(name, entry["seq"])
        if owner and tmp.exists():
            # left by a run killed in this very save; removed before DCP's first
            # collective, so no rank has written into it yet
            remove_path(tmp)
        manifest = self._manifest_base() if owner else {}
        state_info: dict[str, Any] | None = None
        state_error: BaseException | None = None
        if self.async_save:
            future = dcp.async_save(shards, checkpoint_id=str(tmp), process_group=self._dcp_group())
            if owner:  # now, while ``small`` is this step's state; the shards are DCP's copies
                try:
                    state_info = write_state(tmp, small)
                except Exception as exc:  # raised with the save's result, on this rank only
                    state_error = exc
            wait: Callable[[], Any] = future.result
        else:
            def wait() -> None:
                dcp.save(shards, checkpoint_id=str(tmp))

        def write() -> dict[str, Any]:
            files: dict[str, Any] = {}
            replaced: Path | None = None
            final = directory / name

            def undo() -> None:  # listed nowhere: remove, and give a replaced one its name back
                with contextlib.suppress(OSError):
                    remove_path(final)
                if replaced is not None:
                    with contextlib.suppress(OSError):
                        os.replace(replaced, final)

            try:
                wait()  # returns once every rank's shards and DCP's index are written
                if not owner:
                    return files
                if state_error is not None:
                    raise state_error
                info = state_info if state_info is not None else write_state(tmp, small)
                files, replaced = finalize(directory, name, tmp, info)
            except BaseException:
                if owner and tmp.exists():
                    with contextlib.suppress(OSError):
                        remove_path(tmp)
                raise
            _publish(directory, entry, files, manifest, removed, None, undo, replaced)
            return files

        job = _Job(write, entry, before, is_best, entry["metrics"], stat, removed)
        job.owner = owner
        if self.async_save:
            self._job = job  # waited for (job.run) at the next save or at the end of fit
        else:
            job.run()
        return job

    def _dcp_group(self) -> Any:
        """The process group of async sharded saves, created at the first one: DCP runs
        their collectives on a background thread, which must never interleave with the
        training's collectives on the default group. ``None`` without a process group."""
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()):
            return None
        world = tdist.group.WORLD
        if self._async_group is None or self._async_group_for is not world:
            self._async_group = tdist.new_group(backend="gloo")
            self._async_group_for = world  # a process group made anew needs a new side group
        return self._async_group

    def _manifest_base(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "monitor": self.monitor,
            "mode": self.mode,
            "top_k": self.top_k,
            "checkpoints": [dict(e) for e in self._entries],
            "best": self._best,
        }

    def _make_write(self, ckpt: dict[str, Any], entry: dict[str, Any], manifest: dict[str, Any],
                    removed: list[dict[str, Any]], model_obj: Any) -> Callable[[], dict[str, Any]]:
        directory = self.dirpath
        name = entry["name"]
        fmt = self.format
        last_name = self.last_name

        def write() -> dict[str, Any]:
            files: dict[str, Any] = {}

            def undo() -> None:
                for fname in files:  # complete but never listed: remove
                    with contextlib.suppress(OSError):
                        os.unlink(directory / fname)

            try:
                state = ckpt
                if fmt == "safetensors":
                    from safetensors.torch import save as st_save

                    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in ckpt["model"].items()}
                    data = st_save(weights, metadata={"format": CHECKPOINT_FORMAT})
                    fname = f"{name}.safetensors"
                    size, digest = atomic_write(directory / fname, lambda f: f.write(data))
                    files[fname] = {"size": size, "sha256": digest}
                    del data, weights
                    state = {k: v for k, v in ckpt.items() if k != "model"}
                    state["checkpoint"] = {**ckpt["checkpoint"], "weights_file": fname}
                fname = f"{name}.pt"
                size, digest = atomic_write(directory / fname, lambda f: torch.save(state, f))
                files[fname] = {"size": size, "sha256": digest}
                if model_obj is not None:
                    fname = f"{name}.model.pt"
                    size, digest = atomic_write(directory / fname, lambda f: torch.save(model_obj, f))
                    files[fname] = {"size": size, "sha256": digest}
            except BaseException:
                undo()
                raise
            _publish(directory, entry, files, manifest, removed, last_name, undo)
            return files

        return write

    def _finish_pending(self, loop: Loop | None, raise_errors: bool, sync_ranks: bool = True) -> None:
        job, self._job = self._job, None
        remote, self._remote = self._remote, None
        if job is not None:
            if job.done is not None:
                job.done.wait()
            else:  # an async sharded save: wait for DCP's write; rank 0 then lists it
                job.run()
        if remote is not None and loop is not None and sync_ranks:
            # every rank marked the same async save: after this barrier rank 0's write is
            # finished, so the other ranks can announce it too
            loop.barrier()
        if job is not None:
            self._complete(loop, job, raise_errors)
        elif remote is not None and loop is not None and sync_ranks:
            h = loop.callers.on_checkpoint_saved
            if h is not None:
                h(loop, *remote)

    def _complete(self, loop: Loop | None, job: _Job, raise_errors: bool) -> None:
        if job.error is not None:
            # the write failed: forget the new entry, keep the previous ones (still on disk)
            failed = job.entry["primary"]
            self._entries = [e for e in job.prev]
            self._best = self._pick_best(self._entries)
            msg = f"writing checkpoint {self.dirpath / failed} failed: {job.error!r}; " \
                  f"the previous checkpoints are intact"
            if not raise_errors:
                log.error("hookloop.checkpoint: %s", msg)
                return
            errno = getattr(job.error, "errno", None)
            err = CheckpointWriteError(errno, msg) if errno is not None else CheckpointWriteError(msg)
            raise err from job.error
        if not job.owner:  # wrote its shards of a sharded checkpoint; rank 0 listed it
            h = loop.callers.on_checkpoint_saved if loop is not None else None
            if h is not None:
                h(loop, job.stat.path, dict(job.metrics), job.is_best)
            return
        assert job.files is not None
        for e in self._entries:
            if e["seq"] == job.entry["seq"]:
                e["files"] = job.files
        job.stat.nbytes = sum(f["size"] for f in job.files.values())
        path = str(self.dirpath / job.entry["primary"])
        if self.verbose:
            log.info("hookloop.checkpoint: saved %s (%s=%s, %.3f MB%s)", path, self.monitor,
                     job.entry["score"], job.stat.nbytes / 1e6, ", best" if job.is_best else "")
        if loop is not None:
            h = loop.callers.on_checkpoint_saved
            if h is not None:
                h(loop, path, dict(job.metrics), job.is_best)
            h = loop.callers.on_checkpoint_removed
            if h is not None:
                for old in job.removed:  # deleted by the write, after the new one was listed
                    if old["primary"] != job.entry["primary"]:  # not one the new file replaced
                        h(loop, str(self.dirpath / old["primary"]))

    # ------------------------------------------------------------------ preemption

    def _preempt(self, loop: Loop, epoch_metrics: dict[str, float] | None = None) -> None:
        signum = self._signal_pending
        assert signum is not None
        name = signal.Signals(signum).name
        log.warning("hookloop.checkpoint: %s received: saving at step %d and stopping", name,
                    loop.state.global_step)
        self._preempted = signum
        save_last, self.save_last = self.save_last, True  # a preemption save is always kept
        try:
            self._save(loop, epoch_metrics or {})
            self._finish_pending(loop, raise_errors=True)
        finally:
            self.save_last = save_last
        # every rank preempts at this step (the signal was agreed): stop here, together
        loop.request_stop(f"preempted by {name}", agreed=True)

    def _take(self, agreed: tuple[int, bool]) -> bool:
        """Act on what the ranks agreed: a signal any rank received becomes pending on
        every rank; returns whether any rank's save interval was due."""
        signum, due = agreed
        if signum and self._signal_pending is None:
            self._signal_pending = signum
        return due

    def _handler(self, signum: int, frame: Any) -> None:
        if self._signal_local is None:
            self._signal_local = signum
        prev = self._prev_handlers.get(signum)
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)

    def _install_signals(self) -> None:
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            if signum in self._prev_handlers:
                continue
            self._prev_handlers[signum] = signal.signal(signum, self._handler)

    def _restore_signals(self) -> None:
        for signum, prev in self._prev_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
        self._prev_handlers = {}


class ResumeDisagreementError(CheckpointError, RuntimeError):
    """Under DDP the ranks found different checkpoints to resume from (or some found
    none): raised on every rank, naming what each rank found."""


def _resume_identity(source: Path, ckpt: Mapping[str, Any] | None, error: Exception | None) -> str:
    """What a rank found to resume from, comparable across ranks."""
    if error is not None:
        return f"cannot resume from {source}: {type(error).__name__}: {error}"
    if ckpt is None:
        return f"no checkpoint in {source} (a fresh start)"
    info, counters = ckpt.get("checkpoint") or {}, ckpt.get("loop") or {}
    return (f"{info.get('name', source)} (epoch {counters.get('epoch')}, step "
            f"{counters.get('global_step')}, saved at {info.get('time')})")


def _agree_on_resume(source: Path, ckpt: Mapping[str, Any] | None, error: Exception | None) -> None:
    """Raise on every rank unless every rank found the same checkpoint (or none)."""
    import torch.distributed as tdist

    mine = _resume_identity(source, ckpt, error)
    found: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(found, mine)
    if len(set(found)) == 1:
        return
    per_rank = "\n  ".join(f"rank {r}: {what}" for r, what in enumerate(found))
    raise ResumeDisagreementError(
        f"the ranks do not agree on what to resume:\n  {per_rank}\nEvery rank must read the "
        f"same checkpoint folder: put dirpath ({source}) on storage that every node shares "
        "at the same path (see 'Checkpoint storage' in docs/distributed.md)")
