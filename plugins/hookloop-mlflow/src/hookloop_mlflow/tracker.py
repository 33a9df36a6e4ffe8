"""The :class:`MLflow` tracker: hookloop's hooks recorded in an MLflow run."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hookloop.plugins import hookimpl
from hookloop.tracking import (
    Tracker,
    flatten_config,
    image_to_hwc_uint8,
    mask_secrets,
    mask_text,
    sdk_installed,
)

__all__ = ["INSTALL_HINT", "MLflow"]

log = logging.getLogger("hookloop.mlflow")

INSTALL_HINT = (
    "the hookloop 'mlflow' plugin needs MLflow: pip install mlflow "
    "(or pip install hookloop-mlflow, which depends on it)"
)
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 5000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_STATUS = {"success": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def _import_mlflow() -> Any:
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return mlflow, MlflowClient


def _key(name: str) -> str:
    """A metric/param/tag key MLflow accepts: characters outside ``[\\w-. :/]``
    become ``_``; no leading ``/``, no ``..``."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).lstrip("/")
    while ".." in key:
        key = key.replace("..", "._")
    return key or "_"


def _safe_uri(uri: str) -> str:
    """``uri`` without credentials (``user:password@``) and secret values."""
    return mask_text(re.sub(r"//[^/@]*@", "//", uri))


def _source_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` plus the source and user tags MLflow's own ``start_run`` sets
    (``mlflow.user``, ``mlflow.source.name``, ``mlflow.source.type``, git commit ...),
    secrets masked; tags given explicitly win."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        resolved = {str(k): mask_text(str(v))[:_MAX_TAG_VALUE] for k, v in resolve_tags({}).items()}
    except Exception:  # context providers are best effort, as in MLflow
        log.debug("hookloop mlflow: could not resolve source tags", exc_info=True)
        resolved = {}
    return {**resolved, **tags}


def _artifact_name(name: str) -> str:
    return "/".join(_key(part) for part in str(name).split("/") if part not in ("", ".", ".."))


class MLflow(Tracker):
    """Record a fit in an MLflow run.

    - params: the loop configuration, ``loop.hparams`` and ``params``, flattened
      (``a/b`` for nested dicts), secrets masked, logged once at fit start with
      ``log_batch``;
    - metrics: every ``on_log`` at the loop's global step (``log_batch``);
    - tags: ``tags`` (secrets masked), plus ``hookloop.best_checkpoint`` once one is
      uploaded;
    - artifacts: text (``text/<name>/step-<n>.txt``, e.g. the model summary), images
      (``images/<name>/step-<n>.png``), histograms (``histograms/<name>/step-<n>.json``,
      counts and bin edges), the best checkpoint under ``checkpoints/`` when the
      checkpoint plugin announces one, and this tracker's end-of-fit summary
      (``hookloop/tracking-summary.txt``);
    - status: ``FINISHED`` when fit ends, ``FAILED`` when it raises, ``KILLED`` on
      ``KeyboardInterrupt`` and when the training process is killed (the backend
      process closes the run); a crash never leaves the run ``RUNNING`` (unless the
      tracking server itself is unreachable by then, which the summary reports).

    MLflow runs in the trackers' backend process (``backend="process"``, see
    :class:`hookloop.tracking.Tracker`): its imports, store and client never hold the
    training process's GIL. The run is keyed by an id of hookloop's own, ``run_key``,
    chosen on the training thread at fit start and stored as the run tag
    ``hookloop.run_key``; the run is created by the backend process, to which the
    training thread hands the open call at fit start (creating it on the training
    thread would make that thread wait for MLflow's import and store: seconds). The key
    and, once known, the run id are the plugin's checkpoint state, so every checkpoint
    identifies the run, even one written before MLflow created it: resuming (in this
    process or a new one) continues the same run, found by id or else by key. Params
    that already hold a different value (e.g. ``max_epochs``) are left as they are, as
    MLflow forbids changing them.

    A training process killed before the run existed still leaves it: its backend
    process creates the run, writes what it was sent and closes the run ``KILLED``. The
    checkpoint also names that backend process, and a resume on the same machine waits
    for it to exit (up to ``close_timeout`` + 10 s) before it looks the run up, so it
    finds the run instead of creating a second one. A kill of the backend process too
    (a whole process group or job killed) before it created the run leaves no run; the
    resume then creates it under the same key, as it does with ``backend="thread"``.

    Times: the run's start and end times are the fit's start and end on the training
    thread, and every metric's timestamp is when its value was logged there (not when
    the worker wrote it). Runs carry the source and user tags MLflow's ``start_run``
    sets (``mlflow.user``, ``mlflow.source.name``, ``mlflow.source.type``, git commit).
    Checkpoint artifacts follow the checkpoint plugin's best-k: a rotated checkpoint's
    artifact is deleted (``on_checkpoint_removed``).

    No duplicate steps after a crash and resume: MLflow cannot delete a metric point,
    so with ``hold_until_checkpoint`` (the default) and the checkpoint plugin in the
    loop, the scalars logged after the last durable checkpoint are held on the
    training thread and queued when the next checkpoint is announced
    (``on_checkpoint_saved``, after its file is durable) or when fit ends. A process
    that dies loses only what a resume from its last checkpoint logs again; a fit that
    raises drops them (counted as ``dropped metrics_after_checkpoint``). Without the
    checkpoint plugin nothing is held.

    HTTP tracking servers: MLflow retries a failed request up to
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times with back-off and waits
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds per request; while it does, only the
    worker thread waits, and ``close_timeout`` bounds how long the end of fit waits.

    :param tracking_uri: where to record (``http://...``, ``sqlite:///...``,
        ``databricks``, ...); default ``MLFLOW_TRACKING_URI``, else a SQLite store
        ``sqlite:///<save_dir>/mlflow.db`` with artifacts in ``<save_dir>/artifacts``.
    :param experiment: experiment name (created when missing).
    :param run_name: run name (MLflow picks one when ``None``).
    :param run_id: an existing run to continue (default: a new run per fit, or the
        run from the resumed checkpoint).
    :param tags: run tags.
    :param params: extra params recorded with the loop's.
    :param save_dir: folder of the default SQLite store and its artifacts.
    :param artifact_location: artifact location of a newly created experiment
        (default: ``<save_dir>/artifacts`` for the default store, ``artifacts/`` beside
        the database for any other ``sqlite:///`` URI, else the server's).
    :param log_checkpoints: upload the best checkpoint as an artifact.
    :param hold_until_checkpoint: hold the scalars logged after the last durable
        checkpoint until the next one (see above).
    :param tracker_options: options of :class:`hookloop.tracking.Tracker`
        (``log_hparams``, ``histogram_every_n_epochs``, ``queue_size``,
        ``max_failures``, ``spool_dir``, ``close_timeout``, ``metrics_interval``,
        ``held_size``, ``backend``).
    """

    tracker_name = "mlflow"
    hookloop_name = "mlflow"
    removes_artifacts = True
    default_backend = "process"
    backend_exports = ("run_id", "experiment_id")
    parent_only = Tracker.parent_only | {"_pending", "_marks"}

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment: str = "hookloop",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        save_dir: str | os.PathLike[str] = "mlruns",
        artifact_location: str | None = None,
        log_checkpoints: bool = True,
        hold_until_checkpoint: bool = True,
        **tracker_options: Any,
    ) -> None:
        if not sdk_installed("mlflow"):
            raise ImportError(INSTALL_HINT)
        if not experiment:
            raise ValueError("experiment must be a non-empty name")
        # with backend="thread", MLflow's client does its work in Python (SQLAlchemy,
        # HTTP) on the worker thread, competing with the training thread for the GIL; in
        # either backend, fewer and larger log_batch calls: hold scalars for a few
        # seconds
        tracker_options.setdefault("metrics_interval", 5.0)
        super().__init__(**tracker_options)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.params = dict(params or {})
        self.save_dir = Path(save_dir)
        self.artifact_location = artifact_location
        self.log_checkpoints = log_checkpoints
        self.hold_until_checkpoint = hold_until_checkpoint
        self._holding = False
        self._pending: list[tuple[dict[str, float], int, float]] = []
        self._held_seq = 0  # scalars held this fit (released or not)
        self._released_seq = 0
        self._marks: deque[int] = deque()  # _held_seq at each state_dict, oldest first
        self._fixed_id = run_id
        self._resume_id: str | None = None
        self._resume_key: str | None = None
        self.run_key: str | None = None
        """hookloop's own id of the run (tag ``hookloop.run_key``), chosen on the training
        thread at fit start: checkpoints carry it before MLflow has created the run."""
        self._client: Any = None
        self._entities: Any = None
        self._open_error: str | None = None
        self._status_override: str | None = None
        self._existing_params: dict[str, str] = {}
        self.experiment_id: str | None = None
        self.resolved_uri: str | None = None

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The run id and tracking URI, saved in loop checkpoints so that a resume
        continues the same run."""
        uri = _safe_uri(self.resolved_uri) if self.resolved_uri else None
        if self._holding:  # a checkpoint is being taken: what is held so far goes in it
            self._marks.append(self._held_seq)
        return {"run_id": self.run_id, "run_key": self.run_key, "tracking_uri": uri,
                "experiment": self.experiment, "backend": self.backend_identity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` at the next fit start."""
        if state.get("run_id"):
            self._resume_id = str(state["run_id"])
        if state.get("run_key"):
            self._resume_key = str(state["run_key"])
        if self.tracking_uri is None and state.get("tracking_uri"):
            self.tracking_uri = str(state["tracking_uri"])
        backend = state.get("backend")
        self._previous_backend = dict(backend) if isinstance(backend, Mapping) else None

    # ------------------------------------------------------------ hooks

    def _uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        return f"sqlite:///{self.save_dir.resolve().as_posix()}/mlflow.db"

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        """Choose the run (resumed, given or new), then open it on the worker."""
        self.run_id = self._resume_id or self._fixed_id
        self.run_key = self._resume_key or uuid.uuid4().hex
        self._resume_id = self._resume_key = None
        self._status_override = None
        self.resolved_uri = self._uri()
        self._holding = self.hold_until_checkpoint and loop.get_plugin("checkpoint") is not None
        self._pending, self._held_seq, self._released_seq = [], 0, 0
        self._marks.clear()
        super().on_fit_start(loop)

    @hookimpl
    def on_log(self, metrics: Mapping[str, float], step: int, time: float) -> None:
        """Queue the scalars, or hold them until the next durable checkpoint."""
        if not self._holding:
            super().on_log(metrics, step, time)
            return
        self._pending.append((dict(metrics), step, time))
        self._held_seq += 1

    def _release(self, upto: int) -> None:
        """Queue the held scalars up to sequence number ``upto``."""
        count = max(0, upto - self._released_seq)
        for metrics, step, at in self._pending[:count]:
            self._put("metrics", metrics, step, at=at)
        del self._pending[:count]
        self._released_seq += count

    @hookimpl
    def on_checkpoint_saved(self, path: str, metrics: Mapping[str, float], is_best: bool) -> None:
        """Queue the scalars the now durable checkpoint covers, and the best checkpoint
        as an artifact (when ``log_checkpoints``)."""
        if self._marks:
            # checkpoints are announced in the order they were taken; a weights-only
            # one took no loop state, and covers nothing a resume could repeat
            self._release(self._marks.popleft())
        if self.log_checkpoints:
            super().on_checkpoint_saved(path, metrics, is_best)

    @hookimpl
    def on_fit_end(self) -> None:
        """Queue what is still held, then close the run as finished."""
        self._release(self._held_seq)
        self._marks.clear()
        super().on_fit_end()

    @hookimpl
    def on_exception(self, exception: BaseException) -> None:
        """Drop the scalars held past the last durable checkpoint (a resume logs them
        again) and mark the run ``FAILED`` (``KILLED`` for a KeyboardInterrupt)."""
        if self._pending:
            self.dropped["metrics_after_checkpoint"] += len(self._pending)
            self._released_seq, self._pending = self._held_seq, []
        self._marks.clear()
        if isinstance(exception, KeyboardInterrupt):
            self._status_override = "killed"
        super().on_exception()

    # ------------------------------------------------------------ backend

    def _backend_refresh(self) -> dict[str, Any]:
        """The counts of the summary and the status a KeyboardInterrupt chose."""
        return {**super()._backend_refresh(), "_status_override": self._status_override}

    def _require_run(self) -> tuple[Any, str]:
        if self._client is None or self.run_id is None:
            why = f" ({self._open_error})" if self._open_error else ""
            raise RuntimeError(f"the MLflow run is not open{why}")
        return self._client, self.run_id

    def _backend_open(self, loop_info: dict[str, Any]) -> None:
        self._client = None
        self._open_error = None
        try:
            self._open(loop_info)
        except Exception as exc:
            self._open_error = f"{type(exc).__name__}: {mask_text(str(exc))[:500]}"
            raise

    def _open(self, loop_info: dict[str, Any]) -> None:
        _, client_cls = _import_mlflow()
        from mlflow import entities

        self._entities = entities
        uri = self.resolved_uri or self._uri()
        default_store = uri.startswith("sqlite:///") and not self.tracking_uri and (
            not os.environ.get("MLFLOW_TRACKING_URI")
        )
        if default_store:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        client = client_cls(tracking_uri=uri)
        tags = {_key(k): str(v)[:_MAX_TAG_VALUE] for k, v in mask_secrets(self.tags).items()}
        if self.run_id is None and self.run_key is not None:
            # a checkpoint written before the run existed carries only the key
            self.experiment_id = self._experiment_id(client, default_store, uri)
            found = client.search_runs(
                [self.experiment_id], f"tags.`hookloop.run_key` = '{self.run_key}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
        if self.run_id is not None:
            run = client.get_run(self.run_id)
            self.experiment_id = run.info.experiment_id
            if run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            if tags:
                client.log_batch(self.run_id, tags=[entities.RunTag(k, v) for k, v in tags.items()])
        else:
            self.experiment_id = self.experiment_id or self._experiment_id(client, default_store, uri)
            tags.setdefault("hookloop.world_size", str(loop_info.get("world_size", 1)))
            tags["hookloop.run_key"] = str(self.run_key)
            start = int(float(loop_info.get("time") or self.record_time) * 1000)
            run = client.create_run(self.experiment_id, start_time=start, run_name=self.run_name,
                                    tags=_source_tags(tags))
            self.run_id = run.info.run_id
        self._client = client
        self._existing_params = dict(run.data.params)

    def _experiment_id(self, client: Any, default_store: bool, uri: str) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        location = self.artifact_location
        if location is None and default_store:
            location = (self.save_dir / "artifacts").resolve().as_uri()
        elif location is None and uri.startswith("sqlite:///"):
            # beside the database, not in ./mlruns of whatever folder the run started in
            db = Path(uri[len("sqlite:///"):])
            location = (db.parent / "artifacts").resolve().as_uri()
        try:
            return str(client.create_experiment(self.experiment, artifact_location=location))
        except Exception:  # created concurrently by another process
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def _backend_hparams(self, params: dict[str, Any]) -> None:
        client, run_id = self._require_run()
        merged = flatten_config({**mask_secrets(self.params), **params})
        Param = self._entities.Param
        batch = []
        for name, value in merged.items():
            key, text = _key(name), str(value)[:_MAX_PARAM_VALUE]
            old = self._existing_params.get(key)
            if old is not None and old != text:
                log.info("hookloop mlflow: param %r stays %r in the resumed run (now %r)",
                         key, old, text)
                continue
            batch.append(Param(key, text))
        for i in range(0, len(batch), _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch[i : i + _PARAMS_PER_BATCH])
        self._existing_params.update({p.key: p.value for p in batch})

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._backend_metrics_batch([(metrics, step, self.record_time)])

    def _backend_metrics_batch(self, records: list[tuple[dict[str, float], int, float]]) -> None:
        client, run_id = self._require_run()
        Metric = self._entities.Metric
        # each value at the time it was logged on the training thread
        batch = [Metric(_key(k), float(v), int(at * 1000), int(step)) for metrics, step, at in records
                 for k, v in metrics.items()]
        for i in range(0, len(batch), _METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch[i : i + _METRICS_PER_BATCH])

    def _backend_text(self, name: str, text: str, step: int) -> None:
        client, run_id = self._require_run()
        client.log_text(run_id, text, f"text/{_artifact_name(name)}/step-{step:08d}.txt")

    def _backend_image(self, name: str, image: Any, step: int) -> None:
        client, run_id = self._require_run()
        path = f"images/{_artifact_name(name)}/step-{step:08d}.png"
        if isinstance(image, torch.Tensor):
            client.log_image(run_id, image_to_hwc_uint8(image), artifact_file=path)
        else:
            client.log_figure(run_id, image, path)

    def _backend_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        client, run_id = self._require_run()
        flat = values.detach().float().flatten()
        finite = flat[torch.isfinite(flat)]
        if finite.numel() == 0:
            finite = torch.zeros(1)
        counts, edges = torch.histogram(finite, bins=64)
        data = {"name": name, "step": step, "counts": counts.tolist(), "edges": edges.tolist(),
                "non_finite": int(flat.numel() - finite.numel())}
        client.log_dict(run_id, data, f"histograms/{_artifact_name(name)}/step-{step:08d}.json")

    def _backend_artifact(self, path: str, metrics: dict[str, float]) -> None:
        client, run_id = self._require_run()
        source = Path(path)
        if source.is_dir():
            client.log_artifacts(run_id, str(source), f"checkpoints/{_key(source.name)}")
        else:
            client.log_artifact(run_id, str(source), "checkpoints")
        client.set_tag(run_id, "hookloop.best_checkpoint", f"checkpoints/{source.name}")

    def _backend_artifact_removed(self, path: str) -> None:
        """Delete the artifact of a checkpoint the checkpoint plugin rotated away, so
        the run keeps the same best-k as the checkpoint folder."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        client, run_id = self._require_run()
        name = Path(path).name
        target = f"checkpoints/{name}"
        if not any(f.path == target for f in client.list_artifacts(run_id, "checkpoints")):
            target = f"checkpoints/{_key(name)}"  # a folder checkpoint
        get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(target)

    def _backend_close(self, status: str) -> None:
        client, run_id = self._require_run()
        final = _STATUS[self._status_override or status]
        try:
            client.log_text(run_id, self.summary(), "hookloop/tracking-summary.txt")
        finally:
            self._client = None
            client.set_terminated(run_id, status=final, end_time=int(self.record_time * 1000))

    def summary(self) -> str:
        """What was and was not recorded during the last fit, and which run."""
        text = super().summary()
        if self.run_id:
            text += f"; run {self.run_id} at {_safe_uri(self.resolved_uri or '')}"
        return text
