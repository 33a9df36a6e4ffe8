"""TensorBoard tracker for hookloop, on ``torch.utils.tensorboard.SummaryWriter``.

Register it by name (``plugins=["tensorboard"]`` or ``[("tensorboard", {"log_dir":
"runs/exp1"})]``) or as an object (``plugins=[TensorBoard("runs/exp1")]``).

Everything the :class:`hookloop.tracking.Tracker` base guarantees holds: writes are
handed, through a bounded queue and a worker thread, to the trackers' backend process
(``backend="thread"``: the worker thread writes), a failing backend degrades with one
warning and never stops training, secrets are masked before they reach the writer, and
only rank zero writes. The TensorBoard SDK is imported lazily, where the writes happen,
when a fit starts; the core never imports it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hookloop.plugins import hookimpl
from hookloop.tracking import Tracker, flatten_config

__all__ = ["INSTALL_HINT", "TensorBoard", "flatten_hparams"]

__version__ = "0.1.0"

INSTALL_HINT = (
    "the TensorBoard tracker needs the 'tensorboard' package: "
    "pip install hookloop-tensorboard (or pip install tensorboard)"
)
"""The message of the ImportError raised when the TensorBoard SDK is missing."""

_STATUS_TEXT = {"success": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "killed": "STATUS_FAILURE"}


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Flatten nested mappings to ``"outer/inner"`` keys and turn every value into a
    type the TensorBoard hparams plugin accepts (bool, int, float, str; ``None`` and
    anything else become their ``str``)."""
    out: dict[str, bool | int | float | str] = {}
    for name, value in flatten_config(params, prefix).items():
        if isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = value.item()
        else:
            out[name] = str(value)
    return out


def _is_figure(obj: Any) -> bool:
    return hasattr(obj, "savefig") and hasattr(obj, "canvas")


def _render_figure(figure: Any) -> Any:
    """Render a matplotlib figure to an ``(H, W, 3)`` uint8 array with the Agg canvas."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3])


def _event_stamp(path: Path) -> str | None:
    """The 10-digit timestamp in an event file name (``events.out.tfevents.<time>...``)."""
    parts = path.name.split(".")
    return parts[3] if len(parts) > 3 and parts[3].isdigit() else None


def _drop_session_end(log_dir: Path) -> None:
    """Rewrite the event files in ``log_dir`` without their hparams session-end records
    (each file atomically, under its own name, so the reading order is kept)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG
    from tensorboard.summary.writer.record_writer import RecordWriter

    if not log_dir.is_dir():
        return
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept, changed = [], False
        for raw in records:
            event = Event.FromString(raw)
            values = [v for v in event.summary.value if v.tag != SESSION_END_INFO_TAG]
            if event.HasField("summary") and len(values) != len(event.summary.value):
                changed = True
                if not values:
                    continue
                del event.summary.value[:]
                event.summary.value.extend(values)
                raw = event.SerializeToString()
            kept.append(raw)
        if not changed:
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as fh:
            writer = RecordWriter(fh)
            for raw in kept:
                writer.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


class _GuardedRecords:
    """Stands in for the record writer of TensorBoard's writer thread: a write error
    (disk full) is stored for the next call on the tracker's worker to raise, not left
    to kill the thread with an uncaught traceback; after one, nothing more is written
    (a half-written record would make later ones unreadable)."""

    def __init__(self, records: Any, worker: Any) -> None:
        self._records = records
        self._worker = worker

    def _guard(self, method: str, *args: Any) -> None:
        if self._worker.exception is not None:
            return
        try:
            getattr(self._records, method)(*args)
        except Exception as exc:
            self._worker.exception = exc

    def write(self, data: bytes) -> None:
        self._guard("write", data)

    def flush(self) -> None:
        self._guard("flush")

    def close(self) -> None:
        self._guard("close")


def _guard_writer_thread(writer: Any) -> None:
    """Put :class:`_GuardedRecords` between a ``SummaryWriter``'s writer thread and its
    event file (skipped if TensorBoard's internals differ)."""
    worker = getattr(getattr(getattr(writer.file_writer, "event_writer", None), "_async_writer", None),
                     "_worker", None)
    records = getattr(worker, "_record_writer", None)
    if records is not None and hasattr(worker, "exception"):
        worker._record_writer = _GuardedRecords(records, worker)


class TensorBoard(Tracker):
    """Write scalars, hyperparameters, text, images, histograms and (optionally) the
    model graph to TensorBoard event files in ``log_dir``.

    - Scalars from ``on_log`` at the loop's global step; the writer is flushed at every
      epoch end, at the end of fit and when fit crashes.
    - Hyperparameters (``loop.hparams`` with secrets masked, nested keys flattened to
      ``a/b``) once per fit through the hparams plugin; the end of the session is
      recorded with status success or failure (and as text under
      ``hookloop/status``).
    - When a fit resumes (global step > 0), the new event file starts with a purge
      marker at ``global_step + 1``: events the crashed run wrote after the checkpoint
      are discarded by TensorBoard, so steps continue with no duplicates.
    - TensorBoard has no artifacts: the best checkpoint is recorded as text under
      ``checkpoint/best`` (its path and metrics).
    - Every record is flushed to the event file as the worker writes it, so a write
      that fails (disk full) is counted as failed, never as recorded; TensorBoard's
      own writer thread stores the error instead of dying with a traceback.

    :param log_dir: directory of the event files (created when needed).
    :param log_graph: record the model graph, traced (on the training thread, in eval
        mode) with the first training input, at the first log interval; or call
        ``loop.log_graph(example_input)`` (:meth:`on_log_graph`).
    :param flush_secs: seconds between automatic flushes of the writer.
    :param max_queue: events the writer buffers before it flushes.
    :param log_hparams: record the masked hyperparameters at fit start.
    :param histogram_every_n_epochs: histograms of weights and gradients every N
        epochs (``None``: off).
    :param queue_size: see :class:`hookloop.tracking.Tracker`.
    :param max_failures: see :class:`hookloop.tracking.Tracker`.
    :param spool_dir: see :class:`hookloop.tracking.Tracker`.
    :param close_timeout: see :class:`hookloop.tracking.Tracker`.
    :param held_size: see :class:`hookloop.tracking.Tracker`.
    :param backend: see :class:`hookloop.tracking.Tracker`; default ``"process"``: the
        event files are written by the trackers' backend process.
    :raises ImportError: with :data:`INSTALL_HINT` when ``tensorboard`` is not installed.
    """

    hookloop_name = "tensorboard"
    tracker_name = "tensorboard"
    uploads_artifacts = False  # records the best checkpoint's path as text
    default_backend = "process"
    parent_only = Tracker.parent_only | {"_graph_hook", "_graph_model", "_graph_input"}

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "runs",
        *,
        log_graph: bool = False,
        flush_secs: int = 30,
        max_queue: int = 100,
        log_hparams: bool = True,
        histogram_every_n_epochs: int | None = None,
        queue_size: int = 10_000,
        max_failures: int = 3,
        spool_dir: str | os.PathLike[str] | None = None,
        close_timeout: float = 30.0,
        held_size: int = 1000,
        backend: str | None = None,
    ) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(INSTALL_HINT)
        super().__init__(
            log_hparams=log_hparams,
            histogram_every_n_epochs=histogram_every_n_epochs,
            queue_size=queue_size,
            max_failures=max_failures,
            spool_dir=spool_dir,
            close_timeout=close_timeout,
            held_size=held_size,
            backend=backend,
        )
        self.log_dir = Path(log_dir)
        self.log_graph = log_graph
        self.flush_secs = flush_secs
        self.max_queue = max_queue
        self._writer: Any = None
        self._open_error: str | None = None
        self._last_step = 0
        self._graph_input: tuple[Any, ...] | None = None
        self._graph_hook: Any = None
        self._graph_model: torch.nn.Module | None = None

    # ------------------------------------------------------------ backend (worker thread or process)

    @property
    def writer(self) -> Any:
        """The open ``SummaryWriter`` (``None`` outside a fit, when opening failed, and in
        the training process when the backend runs in its own process)."""
        return self._writer

    def _require_writer(self) -> Any:
        if self._writer is None:
            why = f" (opening failed: {self._open_error})" if self._open_error else ""
            raise RuntimeError(f"the TensorBoard writer for {str(self.log_dir)!r} is not open{why}")
        return self._writer

    def _backend_open(self, loop_info: dict[str, Any]) -> None:
        """Create the ``SummaryWriter``; on resume, with a purge marker after the
        checkpoint's step."""
        self._writer = None
        self._open_error = None
        try:
            self._open(loop_info)
        except Exception as exc:
            self._open_error = f"{type(exc).__name__}: {exc}"
            raise

    def _open(self, loop_info: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        step = int(loop_info.get("global_step", 0))
        self._last_step = step
        purge_step = step + 1 if loop_info.get("resumed") else None
        if purge_step is not None:
            # TensorBoard keeps the first session end of a run: the crash's would
            # outlive the resumed session's final outcome
            _drop_session_end(self.log_dir)
            self._wait_for_sortable_name()
        self._writer = SummaryWriter(
            log_dir=str(self.log_dir),
            purge_step=purge_step,
            max_queue=self.max_queue,
            flush_secs=self.flush_secs,
        )
        _guard_writer_thread(self._writer)
        if purge_step is not None:
            self._second_session_start(purge_step)

    def _second_session_start(self, purge_step: int) -> None:
        """Write a second session start at ``purge_step``. ``SummaryWriter`` writes
        one; the Rust loader and ``EventAccumulator`` purge on it, but the loader of
        ``tensorboard --load_fast=false`` takes a run's first session start as its
        beginning and purges only on later ones, and a crashed session without
        ``purge_step`` wrote none. Purging twice at the same step changes nothing."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = Event(step=purge_step, session_log=SessionLog(status=SessionLog.START))
        self._writer.file_writer.add_event(start)

    def _wait_for_sortable_name(self) -> None:
        """TensorBoard reads event files in name order, and names start with the time
        in whole seconds followed by a process-wide counter; a file created in the same
        second as an earlier one could sort before it. Wait for the next second then."""
        if not self.log_dir.is_dir():
            return
        stamps = {_event_stamp(p) for p in self.log_dir.glob("events.out.tfevents.*")}
        while f"{int(time.time()):010d}" in stamps:
            time.sleep(0.05)

    def _backend_hparams(self, params: dict[str, Any]) -> None:
        """Write the session start of the hparams plugin (TensorBoard derives the
        metric columns from the run's scalars)."""
        from torch.utils.tensorboard.summary import hparams

        writer = self._require_writer()
        _exp, ssi, _sei = hparams(flatten_hparams(params), {})
        writer.file_writer.add_summary(ssi, self._last_step, self.record_time)
        self._written()

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per metric at ``step``, with the time it was logged."""
        writer = self._require_writer()
        for name, value in metrics.items():
            writer.add_scalar(name, value, step, walltime=self.record_time)
        self._last_step = max(self._last_step, step)
        self._written()

    def _backend_text(self, name: str, text: str, step: int) -> None:
        """Text (Markdown) at ``step``."""
        self._require_writer().add_text(name, text, step, walltime=self.record_time)
        self._last_step = max(self._last_step, step)
        self._written()

    def _backend_image(self, name: str, image: Any, step: int) -> None:
        """An image: a tensor ``(C, H, W)`` or ``(H, W)`` in [0, 1], or an ``(H, W, 3)``
        uint8 array (a figure rendered by :meth:`on_log_image`)."""
        writer = self._require_writer()
        if _is_figure(image):
            image = _render_figure(image)
        if isinstance(image, torch.Tensor):
            formats = {2: "HW", 3: "CHW"}.get(image.dim())
            if formats is None:
                raise ValueError(f"image {name!r}: expected (C, H, W) or (H, W); got {tuple(image.shape)}")
            writer.add_image(name, image.float(), step, walltime=self.record_time, dataformats=formats)
        else:
            writer.add_image(name, image, step, walltime=self.record_time, dataformats="HWC")
        self._last_step = max(self._last_step, step)
        self._written()

    def _backend_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        """A histogram of ``values`` at ``step`` (TensorBoard shows it under
        histograms and distributions)."""
        self._require_writer().add_histogram(name, values, step, walltime=self.record_time)
        self._last_step = max(self._last_step, step)
        self._written()

    def _backend_graph(self, graph: Any) -> None:
        """Write a graph traced on the training thread (:meth:`on_log_graph`)."""
        self._require_writer().file_writer.add_graph(graph, self.record_time)
        self._written()

    def _backend_mesh(self, name: str, vertices: torch.Tensor, faces: torch.Tensor | None,
                      colors: torch.Tensor | None, step: int) -> None:
        """A point cloud or mesh (TensorBoard's mesh plugin)."""
        self._require_writer().add_mesh(name, vertices, colors=colors, faces=faces,
                                        global_step=step, walltime=self.record_time)
        self._last_step = max(self._last_step, step)
        self._written()

    def _backend_artifact(self, path: str, metrics: dict[str, float]) -> None:
        """Record the best checkpoint's path and metrics as text (no artifact store)."""
        shown = ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))
        self._require_writer().add_text("checkpoint/best", f"`{path}` ({shown})", self._last_step,
                                        walltime=self.record_time)
        self._written()

    def _written(self) -> None:
        """Flush what the last call wrote: its write error (disk full) raises here, on
        the tracker's worker, and the record counts as failed."""
        self._require_writer().flush()

    def _backend_flush(self) -> None:
        """Flush the event file."""
        self._require_writer().flush()

    def _backend_close(self, status: str) -> None:
        """Record the session's end status and close the event file."""
        writer, self._writer = self._require_writer(), None
        try:
            from tensorboard.plugins.hparams import plugin_data_pb2
            from tensorboard.plugins.hparams.api_pb2 import Status
            from tensorboard.plugins.hparams.metadata import (
                PLUGIN_DATA_VERSION,
                PLUGIN_NAME,
                SESSION_END_INFO_TAG,
            )
            from torch.utils.tensorboard.summary import Summary, SummaryMetadata

            if self.log_hparams:
                code = Status.Value(_STATUS_TEXT.get(status, "STATUS_UNKNOWN"))
                sei = plugin_data_pb2.SessionEndInfo(status=code)
                content = plugin_data_pb2.HParamsPluginData(session_end_info=sei, version=PLUGIN_DATA_VERSION)
                meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
                    plugin_name=PLUGIN_NAME, content=content.SerializeToString()))
                writer.file_writer.add_summary(
                    Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=meta)]),
                    self._last_step, self.record_time,
                )
            writer.add_text("hookloop/status", status, self._last_step, walltime=self.record_time)
        finally:
            writer.close()

    # ------------------------------------------------------------ hooks (training thread)

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        """Open the run; with ``log_graph``, catch the first training input."""
        super().on_fit_start(loop)
        self._graph_input = None
        if self.log_graph and self._graph_hook is None:
            self._graph_model = loop.module
            self._graph_hook = loop.module.register_forward_pre_hook(self._catch_input)

    def _catch_input(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._graph_input = tuple(args)
        if self._graph_hook is not None:
            self._graph_hook.remove()
            self._graph_hook = None

    @hookimpl
    def on_log(self, metrics: Mapping[str, float], step: int, time: float) -> None:
        """Queue the scalars; with ``log_graph``, trace the graph the first time."""
        super().on_log(metrics, step, time)
        if self._graph_input is not None:
            args, self._graph_input = self._graph_input, None
            model, self._graph_model = self._graph_model, None
            if model is not None:
                self._trace_graph(model, args)

    @hookimpl
    def on_log_graph(self, model: torch.nn.Module, example_input: Any) -> None:
        """Trace ``model`` with ``example_input`` here, on the training thread (in eval
        mode, without gradients); the worker writes the graph (TensorBoard's graphs
        plugin). A model that does not trace is counted as a failed graph."""
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        self._trace_graph(model, args)

    def _trace_graph(self, model: torch.nn.Module, args: tuple[Any, ...]) -> None:
        try:
            from torch.utils.tensorboard._pytorch_graph import graph

            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    traced = graph(model, args)
            finally:
                model.train(was_training)
        except Exception as exc:  # a model that does not trace must not stop training
            self.failed["graph"] += 1
            self.last_error = f"graph: {type(exc).__name__}: {exc}"
            return
        self._put("graph", traced)

    @hookimpl
    def on_log_mesh(self, name: str, vertices: torch.Tensor, faces: torch.Tensor | None,
                    colors: torch.Tensor | None, step: int, time: float) -> None:
        """Queue a point cloud or mesh (CPU tensors, ``add_mesh`` layout)."""
        self._put("mesh", name, vertices, faces, colors, step, at=time)

    @hookimpl
    def on_log_image(self, name: str, image: Any, step: int, time: float) -> None:
        """Queue an image; a matplotlib figure is rendered now, on the calling thread,
        so that later changes to the figure do not race with the writer."""
        if _is_figure(image):
            try:
                image = _render_figure(image)
            except Exception as exc:
                self.failed["image"] += 1
                self.last_error = f"image {name!r}: {type(exc).__name__}: {exc}"
                return
        self._put("image", name, image, step, at=time)

    def _finish(self, status: str) -> None:
        if self._graph_hook is not None:
            self._graph_hook.remove()
            self._graph_hook = None
        self._graph_model = self._graph_input = None
        super()._finish(status)
