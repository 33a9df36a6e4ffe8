"""The shared base of tracker plugins (TensorBoard, W&B, MLflow, ...).

A :class:`Tracker` turns hooks into backend calls that run on a worker thread through
a bounded queue, so a slow, failing or hanging backend never blocks or kills training:

- the training thread only enqueues (and only at log intervals, epoch ends and fit
  boundaries: trackers implement no per-step hook);
- after ``max_failures`` consecutive failed calls the tracker degrades: to spooling
  the remaining records as JSON lines under ``spool_dir`` when one is set, else to
  disabled; one warning says so;
- at the end of fit (or on a crash) the run is closed with status ``"success"`` or
  ``"failed"`` and a summary says what was and was not recorded.

Subclasses implement the ``_backend_*`` methods, which run on the worker thread only.
Configuration values whose keys look like secrets, and values of secret environment
variables, are masked before anything reaches a backend (:func:`mask_secrets`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hookloop.plugins import hookimpl

__all__ = [
    "MASK",
    "SECRET_ENV_VARS",
    "Tracker",
    "flatten_config",
    "image_to_hwc_uint8",
    "mask_secrets",
    "mask_text",
    "sdk_installed",
]

log = logging.getLogger("hookloop.tracking")

MASK = "***"
SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GITHUB_TOKEN",
    "OPENAI_API_KEY",
    "AZURE_STORAGE_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
_SECRET_KEY = re.compile(
    r"passw(or)?d|secret|credential|^key$|"
    r"(^|[_\-./])(api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|token|auth|auth[_\-]?token)$",
    re.IGNORECASE,
)


def _secret_values() -> list[str]:
    values = []
    for name, value in os.environ.items():
        if (name in SECRET_ENV_VARS or _SECRET_KEY.search(name)) and len(value) >= 4:
            values.append(value)
    return sorted(set(values), key=len, reverse=True)


def mask_text(text: str, secrets: list[str] | None = None) -> str:
    """Replace every value of a secret environment variable found in ``text``."""
    for value in _secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return text


def mask_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` (nested dicts too) with secret-looking keys and the values
    of secret environment variables replaced by ``"***"``."""
    secrets = _secret_values()

    def clean(key: str, value: Any) -> Any:
        if _SECRET_KEY.search(str(key)):
            return MASK
        if isinstance(value, Mapping):
            return {str(k): clean(str(k), v) for k, v in value.items()}
        if isinstance(value, str):
            return mask_text(value, secrets)
        return value

    return {str(k): clean(str(k), v) for k, v in config.items()}


def flatten_config(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``"outer/inner"`` keys (for backends with flat
    parameter namespaces)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}/"))
        else:
            out[name] = value
    return out


def image_to_hwc_uint8(image: torch.Tensor) -> Any:
    """A CHW (or HW) tensor with values in [0, 1] as an HWC (or HW, for one channel)
    uint8 numpy array, the layout image SDKs take."""
    img = image.detach().float().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3:
        raise ValueError(f"expected an image tensor (C, H, W); got shape {tuple(img.shape)}")
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    if img.shape[2] == 1:
        img = img[:, :, 0]
    return img.numpy()


def sdk_installed(module: str) -> bool:
    """Whether a tracker SDK can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # a None or broken sys.modules entry
        return False


_STOP = object()


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
    ) -> None:
        if histogram_every_n_epochs is not None and histogram_every_n_epochs <= 0:
            raise ValueError(f"histogram_every_n_epochs={histogram_every_n_epochs!r}; expected > 0")
        if queue_size <= 0 or max_failures <= 0:
            raise ValueError(f"queue_size={queue_size!r} and max_failures={max_failures!r} must be > 0")
        self.log_hparams = log_hparams
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.queue_size = queue_size
        self.max_failures = max_failures
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.close_timeout = close_timeout
        if metrics_interval < 0:
            raise ValueError(f"metrics_interval={metrics_interval!r}; expected >= 0")
        self.metrics_interval = float(metrics_interval)
        if histogram_every_n_epochs:
            # gradients are cleared after every step: take them once per due epoch, just
            # before the first optimizer step. Defined per instance, so trackers without
            # histograms implement no per-step hook at all.
            self.on_before_optimizer_step = self._capture_grads
        self._grads_epoch = -1
        self._staging: Path | None = None
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.recorded: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.spooled: Counter[str] = Counter()
        self.state = "idle"  # idle | running | spooling | disabled | closed
        self.last_error: str | None = None
        self._consecutive = 0
        self.report: str = ""

    # ------------------------------------------------------------ backend API

    def _backend_open(self, loop_info: dict[str, Any]) -> None:
        """Start the backend run (worker thread). ``loop_info`` has ``rank``,
        ``world_size``, ``global_step`` and ``resumed``."""

    def _backend_hparams(self, params: dict[str, Any]) -> None:
        """Record masked hyperparameters."""

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalars at ``step``."""
        raise NotImplementedError

    def _backend_text(self, name: str, text: str, step: int) -> None:
        """Record text."""

    def _backend_image(self, name: str, image: Any, step: int) -> None:
        """Record an image (CPU tensor CHW in [0,1] or a matplotlib figure)."""

    def _backend_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        """Record a histogram of a CPU tensor."""

    def _backend_artifact(self, path: str, metrics: dict[str, float]) -> None:
        """Upload a checkpoint file or folder as an artifact."""

    def _backend_flush(self) -> None:
        """Flush buffered writes."""

    def _backend_close(self, status: str) -> None:
        """Finish the run with ``status`` ``"success"`` or ``"failed"``."""

    # ------------------------------------------------------------ worker

    def _start(self, loop_info: dict[str, Any]) -> None:
        self._reset_counts()
        self._grads_epoch = -1
        self.state = "running"
        self._queue = queue.Queue(self.queue_size)
        self._thread = threading.Thread(
            target=self._work, name=f"hookloop-{self.tracker_name}", daemon=True
        )
        self._thread.start()
        self._put("open", loop_info)

    def _put(self, kind: str, *args: Any) -> None:
        """Queue a record for ``_backend_<kind>(*args)`` on the worker; never blocks."""
        q = self._queue
        if q is None or self.state in ("disabled", "closed"):
            self.dropped[kind] += 1
            return
        try:
            q.put_nowait((kind, args))
        except queue.Full:
            self.dropped[kind] += 1

    def _work(self) -> None:
        q = self._queue
        assert q is not None
        batch: list[tuple[dict[str, float], int]] = []  # metrics held for one backend call
        last = time.monotonic()
        while True:
            timeout = max(0.0, last + self.metrics_interval - time.monotonic()) if batch else None
            try:
                item = q.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is None or item is _STOP or item[0] == "close" or self.state != "running":
                if batch:  # held scalars go out before the run closes
                    self._call_metrics(batch)
                    for _ in batch:
                        q.task_done()
                    batch = []
                    last = time.monotonic()
                if item is None:
                    continue
            if item is _STOP:
                q.task_done()
                return
            kind, args = item
            if kind == "metrics" and self.state == "running":
                batch.append(args)  # task_done once written
                if time.monotonic() - last >= self.metrics_interval:
                    self._call_metrics(batch)
                    for _ in batch:
                        q.task_done()
                    batch = []
                    last = time.monotonic()
                continue
            try:
                if self.state == "running":
                    self._call(kind, args)
                elif self.state == "spooling":
                    self._spool(kind, args)
                else:
                    self.dropped[kind] += 1
            finally:
                q.task_done()

    def _call_metrics(self, batch: list[tuple[dict[str, float], int]]) -> None:
        if len(batch) == 1:
            self._call("metrics", batch[0])
        else:
            self._call("metrics_batch", (batch,), count_as="metrics", n=len(batch))

    def _backend_metrics_batch(self, records: list[tuple[dict[str, float], int]]) -> None:
        """Record several ``(metrics, step)`` at once (held for ``metrics_interval``);
        backends with a batch API override this to make one call."""
        for metrics, step in records:
            self._backend_metrics(metrics, step)

    def _call(self, kind: str, args: tuple[Any, ...], count_as: str | None = None, n: int = 1) -> None:
        name = count_as or kind
        try:
            # a record of kind K is handled by _backend_K; subclasses may queue their own
            getattr(self, f"_backend_{kind}")(*args)
        except Exception as exc:
            self.failed[name] += n
            self._consecutive += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self._consecutive >= self.max_failures:
                self._degrade()
        else:
            if kind != "flush":  # a flush proves nothing about the backend
                self.recorded[name] += n
                self._consecutive = 0
        finally:
            if kind == "artifact" and self._staging is not None and Path(args[0]).is_relative_to(
                self._staging
            ):  # uploaded or failed: unstage
                shutil.rmtree(Path(args[0]).parent, ignore_errors=True)

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

    def _spool(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind in ("open", "flush", "image", "histogram"):
            self.dropped[kind] += 1
            return
        try:
            assert self.spool_dir is not None
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            record = {"kind": kind, "time": time.time(),
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
        if self._queue is None or self.state == "closed":
            return
        q, thread = self._queue, self._thread
        deadline = time.monotonic() + self.close_timeout
        # wait (bounded) for room: the close record must not be dropped from a full queue
        for record in (("flush", ()), ("close", (status,)), _STOP):
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

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        """Start the worker, open the run and record the masked hyperparameters."""
        state = loop.state
        self._start({"rank": state.rank, "world_size": state.world_size,
                     "global_step": state.global_step, "resumed": state.global_step > 0})
        if self.log_hparams:
            self._put("hparams", mask_secrets(loop.hparams))

    @hookimpl
    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue the scalars at ``step``."""
        self._put("metrics", dict(metrics), step)

    @hookimpl
    def on_log_text(self, name: str, text: str, step: int) -> None:
        """Queue text (secrets masked)."""
        self._put("text", name, mask_text(text), step)

    @hookimpl
    def on_log_image(self, name: str, image: Any, step: int) -> None:
        """Queue an image."""
        self._put("image", name, image, step)

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
        nothing ended it) and the staging folder."""
        self._finish("failed")
        if self._staging is not None and (self._thread is None or not self._thread.is_alive()):
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
