"""The metric contract: pending values, their reduction (DDP included) and epoch means.

Values logged with ``loop.log`` are kept as they come (detached tensors on their
device, or Python numbers) and reduced only at three points, each one host-device sync
(and one collective under DDP):

- a **log step** (``global_step % log_every_n_steps == 0``): the interval's values are
  reduced *before* ``on_train_batch_end``, so every hook from that step's
  ``on_train_batch_end`` on sees the interval that includes the step; values logged
  inside ``on_train_batch_end`` are reduced right after it and reach the same ``on_log``;
- the **end of a training epoch**: epoch means, named ``<name>_epoch``;
- the **end of validation**: the validation means.

Every reduced value is written to ``loop.state.metrics`` and stamped in
``loop.state.metric_stamps`` with the step, epoch and stage it belongs to, so a plugin
can tell a fresh value from one left over from an earlier interval or epoch.
Reductions run in float64: Python floats, float64 and integer tensors keep their value
(a float32 tensor keeps its float32 value, widened exactly).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hookloop import _distributed as dist

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = ["LoggingAPI", "MetricStamp", "MetricStore"]

STAGES = ("train", "train_epoch", "validate")


@dataclass(frozen=True)
class MetricStamp:
    """Where a reduced value in ``loop.state.metrics`` comes from.

    :param step: ``global_step`` when it was reduced (the interval's last step, the
        step at the epoch's end, or the step at which validation ran).
    :param epoch: the zero-based epoch it belongs to.
    :param stage: ``"train"`` (an interval mean), ``"train_epoch"`` (an epoch mean) or
        ``"validate"``.
    :param time: wall-clock time (``time.time()``) of the reduction, on the training
        thread.
    """

    step: int
    epoch: int
    stage: str
    time: float

    def as_list(self) -> list[Any]:
        """Plain form for a checkpoint."""
        return [self.step, self.epoch, self.stage, self.time]

    @classmethod
    def from_list(cls, value: Any) -> MetricStamp:
        """Inverse of :meth:`as_list`."""
        step, epoch, stage, when = value
        return cls(int(step), int(epoch), str(stage), float(when))


class MetricStore:
    """Pending values, reductions and epoch sums of one :class:`~hookloop.Loop`
    (``loop.metrics``). Plugins use :meth:`reduce_now`; the rest is the loop's."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._device = loop.device
        # float64 everywhere except where the device has none
        self._dtype = torch.float32 if loop.device.type == "mps" else torch.float64
        self.pending: dict[str, list[Any]] = {}
        self.epoch_sums: dict[str, list[Any]] = {}  # name -> [sum, count]
        self.val_pending: dict[str, list[Any]] = {}
        # reduced at this log step before on_train_batch_end, not yet sent by on_log
        self.undelivered: dict[str, float] | None = None
        self._undelivered_totals: dict[str, tuple[float, float]] = {}
        self.undelivered_time = 0.0

    # ------------------------------------------------------------------ recording

    def record(self, name: str, value: torch.Tensor | float) -> None:
        """Keep a checked value for the next reduction (no sync)."""
        bucket = self.val_pending if self._loop.state.stage == "validate" else self.pending
        values = bucket.get(name)
        if values is None:
            bucket[name] = [value]
        else:
            values.append(value)

    # ------------------------------------------------------------------ reduction

    def _sum_count(self, values: list[Any]) -> tuple[Any, int]:
        try:  # the usual case, 0-d tensors of one dtype on one device: one stack, one cast
            stacked = torch.stack(values)
        except (TypeError, RuntimeError):  # numbers among them, shapes or devices differ, none
            stacked = None
        if stacked is not None and stacked.ndim == 1:
            dtype = stacked.dtype
            if all(v.dtype is dtype for v in values):  # nothing was promoted by the stack
                return stacked.to(self._device, self._dtype).sum(), len(values)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        total: Any = 0.0
        if tensors:
            first = tensors[0]
            if all(t.ndim == 0 and t.dtype == first.dtype and t.device == first.device
                   for t in tensors):  # the usual case: one stack, one cast
                total = torch.stack(tensors).to(self._device, self._dtype).sum()
            else:  # mixed shapes, dtypes or devices: each widened and moved here first
                total = torch.stack([t.reshape(()).to(self._device, self._dtype, non_blocking=True)
                                     for t in tensors]).sum()
        if len(tensors) != len(values):
            total = total + sum(v for v in values if not isinstance(v, torch.Tensor))
        return total, len(values)

    def _reduce(self, sums: Mapping[str, tuple[Any, int]], *, vote: bool) -> dict[str, float]:
        """Means of ``sums``: one sync, and under DDP one collective that also carries
        the stop vote when ``vote`` is set."""
        return {name: t / c for name, (t, c) in self._totals(sums, vote=vote).items()}

    def _totals(self, sums: Mapping[str, tuple[Any, int]], *, vote: bool) -> dict[str, tuple[float, float]]:
        """``sums`` as plain (total, count) pairs, summed over ranks; names with no
        value on any rank are left out."""
        loop = self._loop
        active = loop._dist.active
        names = sorted(sums)
        if not names and not (active and vote):
            return {}
        parts = [s if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=self._dtype,
                                                                      device=self._device)
                 for s, _ in (sums[n] for n in names)]
        vec = torch.stack(parts) if parts else torch.zeros(0, dtype=self._dtype, device=self._device)
        counts = [float(sums[n][1]) for n in names]
        n = len(names)
        if active:
            votes = [float(loop.state.should_stop), float(loop._stop_epoch)] if vote else []
            extra = torch.tensor([*counts, *votes], dtype=self._dtype, device=self._device)
            values = dist.all_reduce_sum(torch.cat([vec, extra])).tolist()
            totals, counts = values[:n], values[n:2 * n]
            if vote:
                loop._agree_stop(values[2 * n], values[2 * n + 1])
        else:
            totals = vec.tolist()
        return {name: (t, c) for name, t, c in zip(names, totals, counts, strict=True) if c}

    def _stamp(self, metrics: Mapping[str, float], stage: str, now: float) -> None:
        state = self._loop.state
        state.metrics.update(metrics)
        stamp = MetricStamp(state.global_step, state.epoch, stage, now)
        stamps = state.metric_stamps
        for name in metrics:
            stamps[name] = stamp

    def _take_pending(self) -> dict[str, tuple[Any, int]]:
        """Sum the interval's values (no sync) and add them to the epoch's sums."""
        pending, self.pending = self.pending, {}
        sums = {name: self._sum_count(values) for name, values in pending.items()}
        for name, (total, count) in sums.items():
            acc = self.epoch_sums.get(name)
            if acc is None:
                self.epoch_sums[name] = [total, count]
            else:
                acc[0] = acc[0] + total
                acc[1] += count
        return sums

    def reduce_interval(self) -> dict[str, float]:
        """Reduce the values logged since the last reduction, before
        ``on_train_batch_end`` of a log step; the result waits for :meth:`deliver`."""
        now = time.time()
        totals = self._totals(self._take_pending(), vote=False)
        metrics = {name: t / c for name, (t, c) in totals.items()}
        self._stamp(metrics, "train", now)
        self.undelivered = metrics
        self._undelivered_totals = totals
        self.undelivered_time = now
        return metrics

    def deliver(self) -> None:
        """After ``on_train_batch_end`` of a log step: reduce what was logged inside it
        (under DDP always, with the stop vote) into the step's interval, then fire one
        ``on_log`` for the step."""
        if self.pending or self._loop._dist.active:
            late = self._join_interval(self._totals(self._take_pending(), vote=True))
            self._stamp(late, "train", self.undelivered_time)
        metrics = self.undelivered or {}
        self.undelivered, self._undelivered_totals = None, {}
        self.emit(metrics, self.undelivered_time)

    def _join_interval(self, totals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """Add a later part of a log step's interval to its first reduction; returns
        the new means of the names it touched."""
        assert self.undelivered is not None
        joined = self._undelivered_totals
        means = {}
        for name, (t, c) in totals.items():
            t0, c0 = joined.get(name, (0.0, 0.0))
            joined[name] = (t0 + t, c0 + c)
            means[name] = (t0 + t) / (c0 + c)
        self.undelivered.update(means)
        return means

    def reduce_now(self) -> dict[str, float]:
        """Reduce the values logged since the last reduction now and return their means
        (one sync; under DDP every rank must call it at the same point). The values are
        stamped with the current step and still count towards the epoch means; no
        ``on_log`` fires. For plugins that must act on fresh values off the log
        interval."""
        now = time.time()
        totals = self._totals(self._take_pending(), vote=False)
        if self.undelivered is not None:  # inside a log step's on_train_batch_end
            metrics = self._join_interval(totals)
        else:
            metrics = {name: t / c for name, (t, c) in totals.items()}
        self._stamp(metrics, "train", now)
        return metrics

    def reduce_epoch(self) -> dict[str, float]:
        """At the end of a training epoch: the epoch means (``<name>_epoch``), with the
        stop vote under DDP; fires ``on_log``."""
        self._take_pending()
        sums = {f"{name}_epoch": (acc[0], acc[1]) for name, acc in self.epoch_sums.items()}
        self.epoch_sums = {}
        now = time.time()
        metrics = self._reduce(sums, vote=True)
        self._stamp(metrics, "train_epoch", now)
        self.emit(metrics, now)
        return metrics

    def reduce_validation(self) -> tuple[dict[str, float], float]:
        """At the end of validation: the validation means and the time of the reduction
        (the loop fires ``on_log`` after ``on_validation_end``)."""
        pending, self.val_pending = self.val_pending, {}
        sums = {name: self._sum_count(values) for name, values in pending.items()}
        now = time.time()
        metrics = self._reduce(sums, vote=False)
        self._stamp(metrics, "validate", now)
        return metrics, now

    def emit(self, metrics: dict[str, float], now: float) -> None:
        """Fire ``on_log`` with ``metrics`` (a copy) at the current step, unless empty."""
        if not metrics:
            return
        loop = self._loop
        h = loop.callers.on_log
        if h is not None:
            h(loop, dict(metrics), loop.state.global_step, now)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """This rank's values not yet reduced, as exact sums and counts."""
        interval = {name: [_to_plain(total), count]
                    for name, (total, count) in ((n, self._sum_count(v)) for n, v in self.pending.items())}
        epoch = {name: [_to_plain(acc[0]), acc[1]] for name, acc in self.epoch_sums.items()}
        return {"interval": interval, "epoch": epoch,
                "flush_due": self.undelivered is not None,
                "undelivered": {n: list(tc) for n, tc in self._undelivered_totals.items()},
                "undelivered_time": self.undelivered_time}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an interval comes back as its exact sum plus
        zeros, ``count`` values in all."""
        device = self._device
        self.pending = {n: [_from_plain(v[0], device), *[0.0] * (int(v[1]) - 1)]
                        for n, v in state.get("interval", {}).items() if v[1]}
        self.epoch_sums = {n: [_from_plain(v[0], device), int(v[1])]
                           for n, v in state.get("epoch", {}).items()}
        self.val_pending = {}
        # saved in on_train_batch_end of a log step: that step's on_log is still due
        totals = {n: (float(t), float(c)) for n, (t, c) in (state.get("undelivered") or {}).items()}
        self._undelivered_totals = totals if state.get("flush_due") else {}
        self.undelivered = ({n: t / c for n, (t, c) in totals.items()}
                            if state.get("flush_due") else None)
        self.undelivered_time = float(state.get("undelivered_time") or time.time())


class LoggingAPI:
    """The logging calls of :class:`~hookloop.Loop`: scalars go to the loop's
    :class:`MetricStore`; text, images, histograms, graphs and meshes go straight to the
    plugins that implement their hooks (nothing is built when none does)."""

    metrics: MetricStore
    callers: Any
    state: Any
    module: nn.Module

    def to_device(self, batch: Any) -> Any:  # pragma: no cover - Loop defines it
        raise NotImplementedError

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar metric. Tensors are kept detached on their device and reduced
        (mean, in float64) only at the log interval, epoch end and validation end: no
        host-device sync here. During validation values go to the validation reduction.
        See :mod:`hookloop.metrics` for what ``loop.state.metrics`` holds when."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"loop.log({name!r}): expected a scalar, got a tensor of shape "
                    f"{tuple(value.shape)}; reduce it first (e.g. .mean())"
                )
            value = value.detach()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        else:
            raise TypeError(f"loop.log({name!r}): expected a tensor or a number; got {value!r}")
        self.metrics.record(name, value)

    def log_text(self, name: str, text: str) -> None:
        """Send text (e.g. a model summary) to every tracker now."""
        h = self.callers.on_log_text
        if h is not None:
            h(self, name, str(text), self.state.global_step, time.time())

    def log_image(self, name: str, image: Any) -> None:
        """Send an image (CPU tensor ``(C, H, W)`` in [0, 1], or a matplotlib figure)."""
        h = self.callers.on_log_image
        if h is not None:
            if isinstance(image, torch.Tensor):
                image = image.detach().cpu()
            h(self, name, image, self.state.global_step, time.time())

    def log_histogram(self, name: str, values: torch.Tensor) -> None:
        """Send the distribution of ``values`` (e.g. a weight or its gradient) to the
        trackers: one host-device copy, only when a plugin implements the hook."""
        h = self.callers.on_log_histogram
        if h is not None:
            flat = values.detach().reshape(-1).float().cpu().clone()
            h(self, name, flat, self.state.global_step, time.time())

    def log_graph(self, example_input: Any, model: nn.Module | None = None) -> None:
        """Let trackers trace the model's graph with ``example_input`` (moved to the
        loop's device), on this thread; ``model`` defaults to the inner model."""
        h = self.callers.on_log_graph
        if h is not None:
            h(self, model if model is not None else self.module, self.to_device(example_input))

    def log_mesh(self, name: str, vertices: torch.Tensor, faces: torch.Tensor | None = None,
                 colors: torch.Tensor | None = None) -> None:
        """Send a point cloud or mesh (TensorBoard's ``add_mesh`` layout: vertices
        ``(B, N, 3)``, faces ``(B, F, 3)``, colors ``(B, N, 3)`` uint8)."""
        h = self.callers.on_log_mesh
        if h is not None:
            cpu = [t.detach().cpu() if t is not None else None for t in (vertices, faces, colors)]
            h(self, name, *cpu, self.state.global_step, time.time())



def _to_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return float(value)


def _from_plain(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return float(value)
