"""The loop's state object, the one place plugins read counters and control flags."""

from __future__ import annotations

from typing import Any

from hookloop.metrics import MetricStamp

__all__ = ["LoopState"]

_COUNTERS = ("epoch", "global_step", "batch_idx", "epoch_batches_done", "epoch_done")


class LoopState:
    """Counters and flags of a running loop, documented field by field.

    - ``epoch``: zero-based index of the current (or next) training epoch.
    - ``global_step``: number of optimizer steps done in the whole run (across resume).
      Accumulation micro-batches do not count; this is the step trackers log at.
    - ``batch_idx``: zero-based index of the current batch within the epoch.
    - ``epoch_batches_done``: batches of the current epoch fully processed (used to
      skip them when resuming mid-epoch).
    - ``epoch_done``: whether the epoch at ``epoch`` finished (a checkpoint taken at
      epoch end resumes at the next epoch).
    - ``stepped``: whether the current batch ran an optimizer step (False on gradient
      accumulation micro-batches and on skipped steps).
    - ``stage``: ``"idle"``, ``"train"`` or ``"validate"``.
    - ``outputs``: what the step function returned for the current batch.
    - ``metrics``: the latest reduced metrics as plain floats (updated at every
      reduction: a log step before its ``on_train_batch_end``, epoch end, validation
      end; see :mod:`hookloop.metrics`).
    - ``metric_stamps``: name to :class:`~hookloop.metrics.MetricStamp`, the step,
      epoch and stage each value in ``metrics`` belongs to, so a plugin can tell a
      fresh value from a stale one.
    - ``stop_reason``: why training stopped or will stop (``None`` while running);
      ``"max_epochs"``/``"max_steps"`` on normal completion, else the reason given to
      ``loop.request_stop``.
    - ``should_stop``: a stop was requested; the loop stops after the current batch.
    - ``max_epochs`` / ``max_steps``: limits of the current fit (``None`` when unset).
    - ``rank`` / ``world_size`` / ``is_global_zero``: distributed position (0, 1, True
      when not distributed).
    """

    __slots__ = (
        "batch_idx",
        "epoch",
        "epoch_batches_done",
        "epoch_done",
        "global_step",
        "is_global_zero",
        "max_epochs",
        "max_steps",
        "metric_stamps",
        "metrics",
        "outputs",
        "rank",
        "should_stop",
        "stage",
        "stepped",
        "stop_reason",
        "world_size",
    )

    def __init__(self) -> None:
        self.epoch = 0
        self.global_step = 0
        self.batch_idx = 0
        self.epoch_batches_done = 0
        self.epoch_done = False
        self.stage = "idle"
        self.stepped = False
        self.outputs: Any = None
        self.metrics: dict[str, float] = {}
        self.metric_stamps: dict[str, MetricStamp] = {}
        self.stop_reason: str | None = None
        self.should_stop = False
        self.max_epochs: int | None = None
        self.max_steps: int | None = None
        self.rank = 0
        self.world_size = 1
        self.is_global_zero = True

    def counters(self) -> dict[str, Any]:
        """The counters that a checkpoint stores (plain ints/bools/floats)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _COUNTERS}
        out["metrics"] = dict(self.metrics)
        out["metric_stamps"] = {k: v.as_list() for k, v in self.metric_stamps.items()}
        return out

    def load_counters(self, counters: dict[str, Any]) -> None:
        """Restore what :meth:`counters` returned."""
        for k in _COUNTERS:
            setattr(self, k, counters[k])
        self.metrics = dict(counters.get("metrics", {}))
        self.metric_stamps = {k: MetricStamp.from_list(v)
                              for k, v in counters.get("metric_stamps", {}).items()}

    def __repr__(self) -> str:
        return (
            f"LoopState(epoch={self.epoch}, global_step={self.global_step}, "
            f"batch_idx={self.batch_idx}, stage={self.stage!r}, stop_reason={self.stop_reason!r})"
        )
