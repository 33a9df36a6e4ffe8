"""Early stopping for hookloop: stop training when a monitored metric stops improving,
reaches a threshold, diverges or becomes non-finite.

The decision is taken from the loop's reduced metrics (plain floats that are the same
on every rank under DDP), so every rank takes the same decision at the same point; the
stop goes through ``loop.request_stop`` with a reason that names the rule that fired.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hookloop.errors import MonitorNotFoundError  # re-exported: the shared core error
from hookloop.plugins import hookimpl
from hookloop.resume import state_key

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = ["EarlyStopping", "MonitorNotFoundError"]

__version__ = "0.1.0"

log = logging.getLogger("hookloop.early_stopping")

MODES = ("min", "max")
CHECK_ON = ("validation", "train_epoch")
NONFINITE = ("stop", "skip_batch", "rollback")
ROLLBACK_SOURCES = ("memory", "checkpoint")


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EarlyStopping:
    """Stop training when ``monitor`` stops improving.

    :param monitor: metric name as logged, e.g. ``"val/loss"``, ``"val/acc"`` or
        ``"train/loss_epoch"``.
    :param mode: ``"min"`` (lower is better) or ``"max"``.
    :param patience: checks without improvement before stopping (a check is a
        validation run, or an epoch end with ``check_on="train_epoch"``).
    :param min_delta: an improvement must beat the best score by more than this.
    :param check_finite: stop (or apply ``on_nonfinite``) when the monitor is NaN or
        infinite; with ``False`` a non-finite value counts as a check without
        improvement. NaN is never the best score either way.
    :param stopping_threshold: stop as soon as the monitor reaches this value
        (``<=`` in min mode, ``>=`` in max mode).
    :param divergence_threshold: stop as soon as the monitor is worse than this value.
    :param baseline: the value to beat: the best score starts here, so training stops
        after ``patience`` checks that do not beat it.
    :param start_from_epoch: ignore checks of epochs before this (zero-based) epoch
        (warm-up).
    :param restore_best_weights: keep a copy of the weights of the best check and load
        them into the model whenever training ends: stopped by this plugin, by another
        plugin, by ``max_epochs``/``max_steps``, or by an exception or a signal.
    :param check_on: ``"validation"`` checks after each validation run,
        ``"train_epoch"`` at each epoch end (for a training metric).
    :param on_nonfinite: what a non-finite value does: ``"stop"`` stops at the check;
        ``"skip_batch"`` also checks the gradients before every optimizer step and skips
        steps with NaN/inf gradients; ``"rollback"`` does that too and restores the last
        good weights and optimizer state (kept in memory at each finite check, or read
        from the last checkpoint, see ``rollback_source``), also when the monitor is
        non-finite at a check. The per-step checks cost one host-device sync per
        optimizer step, as a GradScaler does; they are left to the scaler under
        ``precision="16-mixed"``.
    :param rollback_source: ``"memory"`` (a copy of the weights and optimizer state at
        fit start and after every finite check) or ``"checkpoint"`` (the last file
        announced through ``on_checkpoint_saved``).
    :param max_nonfinite: stop after this many non-finite events in a row (skipped
        steps, rollbacks).
    :param strict: raise :class:`MonitorNotFoundError` when the monitor is missing at a
        check; with ``False`` such checks are skipped with one warning.
    :param verbose: print the stop reason (rank 0 only).
    """

    hookloop_name = "early_stopping"
    # after the checkpoint plugin at fit end / on exception, so that "last" checkpoints
    # hold the last weights before the best ones are restored; on the per-step hooks the
    # checkpoint plugin runs last, so mid-epoch checkpoints hold this plugin's step
    hookloop_after: Mapping[str, tuple[str, ...]] = {
        "on_fit_end": ("checkpoint",), "on_exception": ("checkpoint",)}
    hookloop_before: Mapping[str, tuple[str, ...]] = {}

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        restore_best_weights: bool = False,
        check_on: str = "validation",
        on_nonfinite: str = "stop",
        rollback_source: str = "memory",
        max_nonfinite: int = 10,
        strict: bool = True,
        verbose: bool = True,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a metric name; got {monitor!r}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if check_on not in CHECK_ON:
            raise ValueError(f"check_on={check_on!r}; expected one of {CHECK_ON}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; expected one of {NONFINITE}")
        if rollback_source not in ROLLBACK_SOURCES:
            raise ValueError(f"rollback_source={rollback_source!r}; expected one of {ROLLBACK_SOURCES}")
        for name, value in (("patience", patience), ("start_from_epoch", start_from_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        if isinstance(max_nonfinite, bool) or not isinstance(max_nonfinite, int) or max_nonfinite <= 0:
            raise ValueError(f"max_nonfinite must be a positive int; got {max_nonfinite!r}")
        for name, value in (("min_delta", min_delta), ("stopping_threshold", stopping_threshold),
                            ("divergence_threshold", divergence_threshold), ("baseline", baseline)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = abs(float(min_delta))
        self.check_finite = bool(check_finite)
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.restore_best_weights = bool(restore_best_weights)
        self.check_on = check_on
        self.on_nonfinite = on_nonfinite
        if on_nonfinite != "stop":
            # a per-step hook only when it has work to do: with "stop" the plugin adds
            # no call to the step
            self.on_before_optimizer_step = self._check_gradients
        self.rollback_source = rollback_source
        self.max_nonfinite = max_nonfinite
        self.strict = bool(strict)
        self.verbose = bool(verbose)
        if check_on == "train_epoch":
            # the epoch-end check must be in the epoch-end checkpoint
            self.hookloop_before = {"on_train_epoch_end": ("checkpoint",)}
        self._fitting = False
        self._warned_missing = False
        self._checkpoint_path: str | None = None
        self.reset()

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        """Identity of this plugin's state in a loop checkpoint: what it monitors and
        how, so two early stoppers on different monitors never swap state."""
        return state_key("early_stopping", monitor=self.monitor, mode=self.mode)

    def reset(self) -> None:
        """Forget the best score, counters and kept weights."""
        self.best_score: float = self._initial_best()
        self.wait = 0
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.checks = 0
        self.stopped_epoch: int | None = None
        self.stopped_step: int | None = None
        self.stop_rule: str | None = None
        self.stop_reason: str | None = None
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.rollbacks = 0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._last_good: dict[str, Any] | None = None

    def _initial_best(self) -> float:
        if self.baseline is not None:
            return float(self.baseline)
        return math.inf if self.mode == "min" else -math.inf

    def state_dict(self) -> dict[str, Any]:
        """Best score, wait count, best epoch/step, counters, and the best weights and
        rollback snapshot when kept; loadable with ``torch.load(weights_only=True)``."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": float(self.best_score),
            "wait": self.wait,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "checks": self.checks,
            "stopped_epoch": self.stopped_epoch,
            "stopped_step": self.stopped_step,
            "stop_rule": self.stop_rule,
            "stop_reason": self.stop_reason,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "rollbacks": self.rollbacks,
            "best_weights": self.best_weights,
            "last_good": self._last_good,
            "checkpoint_path": self._checkpoint_path,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (called by ``Loop.load_state_dict``)."""
        if state.get("monitor", self.monitor) != self.monitor or state.get("mode", self.mode) != self.mode:
            log.warning("hookloop.early_stopping: checkpoint monitored %r (%s); now %r (%s)",
                        state.get("monitor"), state.get("mode"), self.monitor, self.mode)
        self.best_score = float(state["best_score"])
        self.wait = int(state["wait"])
        self.best_epoch = state.get("best_epoch")
        self.best_step = state.get("best_step")
        self.checks = int(state.get("checks", 0))
        self.stopped_epoch = state.get("stopped_epoch")
        self.stopped_step = state.get("stopped_step")
        self.stop_rule = state.get("stop_rule")
        self.stop_reason = state.get("stop_reason")
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        weights = state.get("best_weights")
        self.best_weights = dict(weights) if weights is not None else None
        self._last_good = copy.deepcopy(state.get("last_good"))
        self._checkpoint_path = state.get("checkpoint_path")

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_start(self, loop: Loop) -> None:
        """Arm the checks; keep the first rollback snapshot."""
        self._fitting = True
        if self._rollback_in_memory and self._last_good is None:
            self._keep_last_good(loop)

    @hookimpl
    def on_validation_end(self, loop: Loop, metrics: Mapping[str, float]) -> None:
        """Check after validation (``check_on="validation"``)."""
        if self._fitting and self.check_on == "validation":
            self._check(loop, {**loop.state.metrics, **metrics})

    @hookimpl
    def on_train_epoch_end(self, loop: Loop, epoch: int, metrics: Mapping[str, float]) -> None:
        """Check at the end of the epoch (``check_on="train_epoch"``)."""
        if self._fitting and self.check_on == "train_epoch":
            self._check(loop, metrics)

    def _check_gradients(self, loop: Loop, optimizer: torch.optim.Optimizer) -> None:
        """``on_before_optimizer_step`` with ``on_nonfinite`` ``"skip_batch"`` or
        ``"rollback"``: skip steps whose gradients are not finite (and roll back)."""
        if loop.scaler is not None:  # the GradScaler already skips non-finite steps
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        total = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
        if bool(torch.isfinite(total)):  # one sync per step, like a GradScaler
            self.consecutive_nonfinite = 0
            return
        loop.skip_optimizer_step()
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        where = f"step {loop.state.global_step}, epoch {loop.state.epoch}, batch {loop.state.batch_idx}"
        if self.consecutive_nonfinite >= self.max_nonfinite:
            self._stop(loop, "non-finite", f"non-finite gradients in {self.consecutive_nonfinite} "
                       f"optimizer steps in a row (last at {where})")
            return
        if self.on_nonfinite == "rollback":
            self._rollback(loop, f"non-finite gradients at {where}")
        else:
            log.warning("hookloop.early_stopping: skipped optimizer step with non-finite gradients at %s",
                        where)

    @hookimpl
    def on_checkpoint_saved(self, loop: Loop, path: str, metrics: Mapping[str, float], is_best: bool) -> None:
        """Remember the last checkpoint for ``rollback_source="checkpoint"``."""
        self._checkpoint_path = str(path)

    @hookimpl
    def on_fit_end(self, loop: Loop) -> None:
        """Restore the best weights (``restore_best_weights``), however training ended."""
        self._fitting = False
        self._restore_best(loop)

    @hookimpl
    def on_exception(self, loop: Loop, exception: BaseException) -> None:
        """Restore the best weights also when training ends by an exception or signal."""
        self._fitting = False
        self._restore_best(loop)

    # ------------------------------------------------------------------ the rules

    @property
    def _rollback_in_memory(self) -> bool:
        return self.on_nonfinite == "rollback" and self.rollback_source == "memory"

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best_score - self.min_delta
        return value > self.best_score + self.min_delta

    def _check(self, loop: Loop, metrics: Mapping[str, float]) -> None:
        state = loop.state
        if state.epoch < self.start_from_epoch:
            return
        if self.monitor not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            message = (f"EarlyStopping: monitor {self.monitor!r} was never logged; "
                       f"logged metrics: {available}")
            if self.strict:
                raise MonitorNotFoundError(message)
            if not self._warned_missing:
                self._warned_missing = True
                log.warning("hookloop.early_stopping: %s; check skipped", message)
            return
        value = float(metrics[self.monitor])
        self.checks += 1
        m = self.monitor
        if not math.isfinite(value):
            self.wait += 1
            if self.check_finite:
                if self.on_nonfinite == "rollback" and self.consecutive_nonfinite + 1 < self.max_nonfinite:
                    self.consecutive_nonfinite += 1
                    if self._rollback(loop, f"{m} = {value} at epoch {state.epoch}"):
                        return
                self._stop(loop, "non-finite", f"{m} = {value} at epoch {state.epoch}{self._best_text()}")
                return
        elif self._improved(value):
            self.best_score = value
            self.best_epoch = state.epoch
            self.best_step = state.global_step
            self.wait = 0
            if self.restore_best_weights:
                self.best_weights = _clone_state(loop.module)
        else:
            self.wait += 1
        if math.isfinite(value):
            self.consecutive_nonfinite = 0
            if self._rollback_in_memory:
                self._keep_last_good(loop)
            lower = self.mode == "min"
            t = self.stopping_threshold
            if t is not None and (value <= t if lower else value >= t):
                self._stop(loop, "stopping_threshold",
                           f"threshold reached: {m} = {value:.6g} {'<=' if lower else '>='} {t}")
                return
            d = self.divergence_threshold
            if d is not None and (value > d if lower else value < d):
                self._stop(loop, "divergence_threshold",
                           f"diverged: {m} = {value:.6g} {'>' if lower else '<'} {d}{self._best_text()}")
                return
        if self.wait >= self.patience:
            delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
            self._stop(loop, "patience", f"patience exhausted: {m} did not improve{delta} for "
                       f"{self.wait} check(s){self._best_text()}")

    def _best_text(self) -> str:
        if self.best_epoch is None:
            if self.baseline is not None:
                return f" (baseline {self.baseline:g} never beaten)"
            return ""
        return f" (best {self.best_score:.6g} at epoch {self.best_epoch})"

    def _stop(self, loop: Loop, rule: str, text: str) -> None:
        state = loop.state
        self.stop_rule = rule
        self.stop_reason = text
        self.stopped_epoch = state.epoch
        self.stopped_step = state.global_step
        reason = f"early_stopping: {text}"
        loop.request_stop(reason)
        log.info("hookloop.%s", reason)
        if self.verbose and state.is_global_zero:
            print(f"hookloop: stopping at epoch {state.epoch}, step {state.global_step}: {reason}")
        loop.log_text("early_stopping/stop_reason", reason)

    # ------------------------------------------------------------------ weights

    def _restore_best(self, loop: Loop) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            loop.module.load_state_dict(self.best_weights)
            log.info("hookloop.early_stopping: restored the best weights (%s = %.6g at epoch %s)",
                     self.monitor, self.best_score, self.best_epoch)

    def _keep_last_good(self, loop: Loop) -> None:
        self._last_good = {
            "model": _clone_state(loop.module),
            "optimizers": [copy.deepcopy(opt.state_dict()) for opt in loop.optimizers],
        }

    def _rollback(self, loop: Loop, why: str) -> bool:
        """Restore the last good weights and optimizer state; False when there are none."""
        snapshot: Mapping[str, Any] | None = None
        source = "memory"
        if self.rollback_source == "memory":
            snapshot = self._last_good
        elif self._checkpoint_path is not None:
            source = self._checkpoint_path
            try:
                snapshot = torch.load(self._checkpoint_path, map_location=loop.device, weights_only=True)
            except Exception as exc:
                log.warning("hookloop.early_stopping: cannot read %s for rollback: %r",
                            self._checkpoint_path, exc)
        if not snapshot or "model" not in snapshot:
            log.warning("hookloop.early_stopping: %s and nothing to roll back to", why)
            return False
        loop.module.load_state_dict(snapshot["model"])
        optimizers = snapshot.get("optimizers") or []
        for opt, sd in zip(loop.optimizers, optimizers, strict=False):
            opt.load_state_dict(copy.deepcopy(sd))
            opt.zero_grad(set_to_none=True)
        self.rollbacks += 1
        log.warning("hookloop.early_stopping: %s; rolled back to the last good weights (%s)", why, source)
        return True

    def __repr__(self) -> str:
        return (f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, patience={self.patience}, "
                f"min_delta={self.min_delta}, best={self.best_score:.6g}, wait={self.wait})")
