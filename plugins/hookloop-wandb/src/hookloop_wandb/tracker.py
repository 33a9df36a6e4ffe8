"""The :class:`WandB` tracker: hookloop's hooks recorded in a Weights & Biases run."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import string
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hookloop.plugins import hookimpl
from hookloop.tracking import (
    RecordDropped,
    Tracker,
    image_to_hwc_uint8,
    mask_argv,
    mask_secrets,
    mask_text,
    sdk_installed,
)

__all__ = ["INSTALL_HINT", "WATCH_MODES", "WandB"]

log = logging.getLogger("hookloop.wandb")

INSTALL_HINT = (
    "the hookloop 'wandb' plugin needs the Weights & Biases SDK: pip install wandb "
    "(or pip install hookloop-wandb, which depends on it)"
)
WATCH_MODES = ("gradients", "parameters", "all")
_ID_ALPHABET = string.ascii_lowercase + string.digits


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return wandb


_ARGV_LOCK = threading.Lock()


def _new_run_id() -> str:
    # `secrets` draws from the OS: the training RNG streams are left untouched
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


@contextlib.contextmanager
def _run_start_time(start: float) -> Iterator[bool]:
    """While ``wandb.init`` runs, give the run it creates the start time ``start``.

    W&B stamps a run with the time its ``Run`` object is built (``Run._start_time``)
    and sends it in the run record, which ``wandb.init`` delivers right after
    ``Run._set_backend``; no setting takes it. This sets ``_start_time`` there. Yields
    whether it could (``False`` when W&B's internals differ: the run then starts at
    W&B's own time). Callers hold ``_ARGV_LOCK``: another ``wandb.init`` of this
    process running at the same moment would get the same start time."""
    try:
        from wandb.sdk.wandb_run import Run
    except ImportError:
        yield False
        return
    original = Run.__dict__.get("_set_backend")
    if original is None:
        yield False
        return

    def _set_backend(run: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(run, "_start_time"):
            run._start_time = start
        return original(run, *args, **kwargs)

    Run._set_backend = _set_backend
    try:
        yield True
    finally:
        Run._set_backend = original


class WandB(Tracker):
    """Record a fit in a Weights & Biases run.

    Scalars go to ``run.log`` at the loop's global step (one step counter shared by
    every tracker and kept across resume); the loop configuration plus ``config`` go to
    the run config once at fit start, with secrets masked; text (a Table with the step
    and the text), images, histograms (``histogram_every_n_epochs``) and the best
    checkpoint (a ``model`` artifact named ``model-<run id>``, aliases ``best`` and
    ``latest``) are recorded too. The run finishes with exit code 0 when fit ends and 1
    when it crashes.

    Every row's ``_timestamp`` is the time its values were logged on the training
    thread (for a step with several ``on_log`` calls, the last one's), and the run's
    start time is the fit's start there (``fit_start_time``), not when ``wandb.init``
    ran (no W&B setting takes a start time: the tracker sets it on W&B's ``Run``
    object while ``wandb.init`` runs; with W&B internals that differ, the run keeps
    W&B's own time). A resumed online run keeps the start its server holds. ``sys.argv``,
    which W&B records in the run's environment (``args``), has secret values and the
    values of secret-looking options masked while the run starts. Best-k: artifact
    versions are kept (W&B cannot delete them offline); the ``best`` alias always names
    the newest best checkpoint, so a version the checkpoint plugin rotated away locally
    loses it.

    The run id is chosen on the training thread at fit start and is part of the
    plugin's checkpoint state: resuming a fit from a checkpoint continues the same run
    (``resume="allow"``), and records at steps the resumed run already holds are dropped
    and counted instead of making W&B warn about steps that go back.

    W&B runs in the trackers' backend process (``backend="process"``, see
    :class:`hookloop.tracking.Tracker`), which gets the training process's environment,
    working directory, ``sys.argv`` and main file, so the run records the training
    script, not the backend. A training process killed after the fit started leaves a
    run: the backend process starts it if it had not yet, writes what it was sent and
    finishes the run with exit code 1.

    :param project: W&B project (default: ``WANDB_PROJECT``, else ``"hookloop"``).
    :param entity: team or user (default: the account's default).
    :param name: display name of the run.
    :param id: run id to create or continue (default: a new random id per fit, or the
        id from the resumed checkpoint).
    :param config: extra config recorded with the loop's (secrets masked).
    :param mode: ``"online"``, ``"offline"`` or ``"disabled"``; ``None`` lets W&B read
        ``WANDB_MODE`` from the environment.
    :param dir: where W&B writes its run folder (default: ``WANDB_DIR``, else the
        working directory).
    :param tags: run tags.
    :param group: run group.
    :param job_type: run job type.
    :param notes: run notes.
    :param watch: ``"gradients"``, ``"parameters"`` or ``"all"``: histograms of the
        gradients (as the optimizer sees them: unscaled and clipped) and/or weights
        every ``watch_log_freq`` optimizer steps, named ``gradients/<param>`` and
        ``parameters/<param>`` as ``wandb.watch`` names them. Off by default: it copies
        every parameter to the host on those steps. Unlike ``wandb.watch`` it installs
        no module hooks: no W&B code runs on the training thread, so a failing run
        cannot break a step.
    :param watch_log_freq: optimizer steps between two ``watch`` records.
    :param log_checkpoints: upload the best checkpoint as an artifact when the
        checkpoint plugin announces one.
    :param settings: a ``wandb.Settings`` or a dict of settings for ``wandb.init``.
    :param init_kwargs: any other ``wandb.init`` arguments.
    :param tracker_options: options of :class:`hookloop.tracking.Tracker`
        (``log_hparams``, ``histogram_every_n_epochs``, ``queue_size``,
        ``max_failures``, ``spool_dir``, ``close_timeout``, ``metrics_interval``,
        ``held_size``, ``backend``).
    """

    tracker_name = "wandb"
    hookloop_name = "wandb"
    default_backend = "process"
    backend_exports = ("run_id", "run_dir")

    def __init__(
        self,
        project: str | None = None,
        *,
        entity: str | None = None,
        name: str | None = None,
        id: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        tags: Sequence[str] | None = None,
        group: str | None = None,
        job_type: str | None = None,
        notes: str | None = None,
        watch: str | None = None,
        watch_log_freq: int = 100,
        log_checkpoints: bool = True,
        settings: Any = None,
        init_kwargs: Mapping[str, Any] | None = None,
        **tracker_options: Any,
    ) -> None:
        if not sdk_installed("wandb"):
            raise ImportError(INSTALL_HINT)
        if mode is not None and mode not in ("online", "offline", "disabled"):
            raise ValueError(f"mode={mode!r}; expected 'online', 'offline', 'disabled' or None")
        if watch is not None and watch not in WATCH_MODES:
            raise ValueError(f"watch={watch!r}; expected one of {WATCH_MODES} or None")
        if watch_log_freq <= 0:
            raise ValueError(f"watch_log_freq={watch_log_freq!r}; expected > 0")
        super().__init__(**tracker_options)
        self.project = project
        self.entity = entity
        self.name = name
        self.run_id = id
        self.config = dict(config or {})
        self.mode = mode
        self.dir = Path(dir) if dir is not None else None
        self.tags = list(tags) if tags is not None else None
        self.group = group
        self.job_type = job_type
        self.notes = notes
        self.watch = watch
        self.watch_log_freq = watch_log_freq
        self.log_checkpoints = log_checkpoints
        self.settings = settings
        self.init_kwargs = dict(init_kwargs or {})
        self._fixed_id = id
        self._resume_id: str | None = None
        self._resuming = False
        self._run: Any = None
        self._wandb: Any = None
        self._watched_step = -1
        if watch is not None:
            # a per-step hook only when watching: otherwise the tracker adds no cost
            # to steps at all
            # (it also takes the gradient histograms of histogram_every_n_epochs)
            self.on_before_optimizer_step = self._watch_step
        self._open_error: str | None = None
        self._first_step = 0
        self.run_dir: Path | None = None

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The run id (and where it lives), saved in loop checkpoints so that a resume
        continues the same run."""
        return {"run_id": self.run_id, "project": self.project, "entity": self.entity,
                "backend": self.backend_identity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run saved by :meth:`state_dict` at the next fit start."""
        run_id = state.get("run_id")
        if run_id:
            self._resume_id = str(run_id)
        for key in ("project", "entity"):
            if getattr(self, key) is None and state.get(key):
                setattr(self, key, state[key])
        backend = state.get("backend")
        self._previous_backend = dict(backend) if isinstance(backend, Mapping) else None

    # ------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        """Choose the run id (resumed, given or new), then open the run in the backend."""
        self._resuming = self._resume_id is not None
        self.run_id = self._resume_id or self._fixed_id or _new_run_id()
        self._resume_id = None
        super().on_fit_start(loop)

    @hookimpl
    def on_checkpoint_saved(self, path: str, metrics: Mapping[str, float], is_best: bool) -> None:
        """Queue the best checkpoint as an artifact (when ``log_checkpoints``)."""
        if self.log_checkpoints:
            super().on_checkpoint_saved(path, metrics, is_best)

    def _watch_step(self, loop: Any) -> None:
        """``on_before_optimizer_step`` when ``watch`` is set: every
        ``watch_log_freq``-th optimizer step, queue CPU copies of the gradients
        (clipped and unscaled) and/or the weights as histograms at the step this
        optimizer step completes. The copies read the device on those steps only."""
        if self.histogram_every_n_epochs:
            self._capture_grads(loop)
        step = loop.state.global_step + 1
        if step % self.watch_log_freq or step == self._watched_step:
            return
        self._watched_step = step
        for name, p in loop.module.named_parameters():
            if self.watch in ("parameters", "all"):
                self._put("histogram", f"parameters/{name}", p.detach().float().cpu().clone(), step)
            if self.watch in ("gradients", "all") and p.grad is not None:
                self._put("histogram", f"gradients/{name}", p.grad.detach().float().cpu().clone(), step)

    # ------------------------------------------------------------ backend

    def _require_run(self) -> Any:
        if self._run is None:
            why = f" ({self._open_error})" if self._open_error else ""
            raise RuntimeError(f"the wandb run is not open{why}")
        return self._run

    def _backend_open(self, loop_info: dict[str, Any]) -> None:
        wandb = self._wandb = _import_wandb()
        self._run = None
        self._open_error = None
        kwargs: dict[str, Any] = {
            "project": self.project or os.environ.get("WANDB_PROJECT") or "hookloop",
            "entity": self.entity,
            "name": self.name,
            "id": self.run_id,
            "config": mask_secrets(self.config),
            # read at every fit start: the SDK caches its environment per process
            "mode": self.mode or os.environ.get("WANDB_MODE") or None,
            "tags": self.tags,
            "group": self.group,
            "job_type": self.job_type,
            "notes": self.notes,
            "resume": "allow" if self._resuming or self._fixed_id else None,
            "reinit": "create_new",
        }
        folder = self.dir if self.dir is not None else os.environ.get("WANDB_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(folder)
        if self.settings is not None:
            kwargs["settings"] = (
                wandb.Settings(**self.settings) if isinstance(self.settings, Mapping) else self.settings
            )
        kwargs.update(self.init_kwargs)
        try:
            # W&B records sys.argv in the run's metadata: mask secrets in it meanwhile
            # and the run starts when the fit started on the training thread
            start = float(loop_info.get("time") or self.record_time)
            with _ARGV_LOCK:
                argv, sys.argv = sys.argv, mask_argv(sys.argv)
                try:
                    with _run_start_time(start):
                        run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})
                finally:
                    sys.argv = argv
        except Exception as exc:
            self._open_error = f"{type(exc).__name__}: {mask_text(str(exc))}"
            raise
        self._run = run
        self.run_id = run.id
        self.run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        # a resumed online run already holds rows up to run.step - 1: skip those
        # steps rather than having W&B warn about (and drop) steps that go back
        self._first_step = int(getattr(run, "step", 0) or 0)

    def _backend_hparams(self, params: dict[str, Any]) -> None:
        self._require_run().config.update(params, allow_val_change=True)

    def _log(self, kind: str, data: dict[str, Any], step: int) -> None:
        run = self._require_run()
        if step < self._first_step:
            raise RecordDropped(f"{kind}_before_resumed_step")
        # _timestamp: when the value was logged on the training thread, not now
        run.log({**data, "_timestamp": self.record_time}, step=step)

    def _backend_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log("metrics", metrics, step)

    def _backend_text(self, name: str, text: str, step: int) -> None:
        table = self._wandb.Table(columns=["step", "text"], data=[[step, text]])
        self._log("text", {name: table}, step)

    def _backend_image(self, name: str, image: Any, step: int) -> None:
        wandb = self._wandb
        data = image_to_hwc_uint8(image) if isinstance(image, torch.Tensor) else image
        self._log("image", {name: wandb.Image(data)}, step)

    def _backend_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        flat = values.detach().float().flatten()
        flat = flat[torch.isfinite(flat)]
        if flat.numel() == 0:
            flat = torch.zeros(1)
        counts, edges = torch.histogram(flat, bins=64)
        hist = self._wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
        self._log("histogram", {name: hist}, step)

    def _backend_artifact(self, path: str, metrics: dict[str, float]) -> None:
        run = self._require_run()
        wandb = self._wandb
        source = Path(path)
        artifact = wandb.Artifact(
            f"model-{run.id}", type="model",
            metadata={"checkpoint": source.name, **mask_secrets(metrics)},
        )
        if source.is_dir():
            artifact.add_dir(str(source))
        else:
            artifact.add_file(str(source))
        run.log_artifact(artifact, aliases=["best", "latest"])

    def _backend_close(self, status: str) -> None:
        run = self._require_run()
        self._run = None
        run.finish(exit_code=0 if status == "success" else 1)

    def summary(self) -> str:
        """What was and was not recorded during the last fit, and where the run is."""
        text = super().summary()
        if self.run_id:
            text += f"; run id {self.run_id}"
        if self.run_dir is not None:
            text += f" ({self.run_dir})"
        return text
