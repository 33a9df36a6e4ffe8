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

__all__ = ["EarlyStopping", "MonitorNotFoundError", "auto_mode"]

__version__ = "0.1.0"

log = logging.getLogger("hookloop.early_stopping")

MODES = ("min", "max", "auto")
# mode="auto": a monitor whose name contains one of these is maximised, unless the
# name also contains "loss" or "err"; every other monitor is minimised
MAX_WORDS = ("acc", "accuracy", "auc", "f1", "precision", "recall")
MIN_WORDS = ("loss", "err")
CHECK_ON = ("validation", "train_epoch")
NONFINITE = ("stop", "skip_batch", "rollback")
ROLLBACK_SOURCES = ("memory", "checkpoint")


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def auto_mode(monitor: str) -> str:
    """The mode ``mode="auto"`` picks for ``monitor``: ``"max"`` when its name (lower
    case) contains acc, accuracy, auc, f1, precision or recall and neither loss nor
    err; ``"min"`` otherwise (losses, errors, anything else)."""
    name = monitor.lower()
    if any(w in name for w in MIN_WORDS):
        return "min"
    return "max" if any(w in name for w in MAX_WORDS) else "min"


def _load_checkpoint_file(path: str, device: torch.device) -> Mapping[str, Any]:
    """Read a checkpoint announced by ``on_checkpoint_saved``: through the checkpoint
    plugin's public loader when it is installed (it reads every format it writes,
    safetensors included, and verifies the manifest), else with ``torch.load``."""
    try:
        from hookloop_checkpoint import load_checkpoint
    except ImportError:
        return torch.load(path, map_location=device, weights_only=True)
    return load_checkpoint(path, map_location=device)


class EarlyStopping:
    """Stop training when ``monitor`` stops improving.

    :param monitor: metric name as logged, e.g. ``"val/loss"``, ``"val/acc"`` or
        ``"train/loss_epoch"``.
    :param mode: ``"min"`` (lower is better), ``"max"``, or ``"auto"``: ``"max"`` for
        names containing acc, accuracy, auc, f1, precision or recall (and not loss or
        err), else ``"min"`` (see :func:`auto_mode`; ``mode`` then holds the choice).
    :param patience: checks without improvement before stopping (a check is a
        validation run, or an epoch end with ``check_on="train_epoch"``). ``0`` stops
        at the first check that does not improve (as ``1`` does).
    :param min_delta: an improvement must beat the best score by more than this.
    :param cumulative_delta: ``True`` (default, as Lightning and Keras): the best score
        moves only on an improvement by more than ``min_delta``, so small gains add up
        until they exceed it. ``False`` (Ignite's default): a smaller gain also becomes
        the new reference, without counting as an improvement.
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
    :param min_epochs: never stop before this many epochs are complete; a rule that
        fires earlier stops training once the minimum is reached, unless a later check
        no longer fires it.
    :param min_steps: never stop before this many optimizer steps; a rule that fired
        earlier stops training right after the step that reaches it.
    :param restore_best_weights: keep a copy of the weights of the best check and load
        them into the model whenever training ends: stopped by this plugin, by another
        plugin, by ``max_epochs``/``max_steps``, or by an exception or a signal.
    :param restore_below_baseline: with ``baseline`` and ``restore_best_weights``, also
        keep the weights of the best check while no check beat the baseline, and
        restore those when none ever does (Keras); by default nothing is restored then.
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
        announced through ``on_checkpoint_saved``, read with ``hookloop_checkpoint``'s
        loader when that is installed, so every format it writes, safetensors included).
    :param max_nonfinite: stop after this many optimizer steps with non-finite
        gradients in a row (a finite step resets the count, a finite validation does
        not), or this many non-finite checks in a row (rollbacks).
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
        *,
        cumulative_delta: bool = True,
        min_epochs: int = 0,
        min_steps: int = 0,
        restore_below_baseline: bool = False,
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
        if mode == "auto":
            mode = auto_mode(monitor)
        if check_on not in CHECK_ON:
            raise ValueError(f"check_on={check_on!r}; expected one of {CHECK_ON}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; expected one of {NONFINITE}")
        if rollback_source not in ROLLBACK_SOURCES:
            raise ValueError(f"rollback_source={rollback_source!r}; expected one of {ROLLBACK_SOURCES}")
        for name, value in (("patience", patience), ("start_from_epoch", start_from_epoch),
                            ("min_epochs", min_epochs), ("min_steps", min_steps)):
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
        self.cumulative_delta = bool(cumulative_delta)
        self.min_epochs = min_epochs
        self.min_steps = min_steps
        self.restore_below_baseline = bool(restore_below_baseline)
        if min_steps:
            # a stop deferred by min_steps happens right after the step that reaches it
            self.on_train_batch_end = self._deferred_stop_at_step
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
        self.consecutive_nonfinite = 0  # non-finite optimizer steps in a row
        self.consecutive_nonfinite_checks = 0  # non-finite checks in a row
        self.rollbacks = 0
        self.pending_stop: tuple[str, str] | None = None  # (rule, text) held by min_*
        self.below_best: float | None = None  # restore_below_baseline: best check seen
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
            "consecutive_nonfinite_checks": self.consecutive_nonfinite_checks,
            "rollbacks": self.rollbacks,
            "pending_stop": list(self.pending_stop) if self.pending_stop else None,
            "below_best": self.below_best,
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
        self.consecutive_nonfinite_checks = int(state.get("consecutive_nonfinite_checks", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        pending = state.get("pending_stop")
        self.pending_stop = (str(pending[0]), str(pending[1])) if pending else None
        below = state.get("below_best")
        self.below_best = float(below) if below is not None else None
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
        elif self._fitting and self.pending_stop is not None and self._minimum_reached(loop, epoch + 1):
            self._stop(loop, *self.pending_stop)

    def _deferred_stop_at_step(self, loop: Loop, outputs: Any, batch: Any, batch_idx: int) -> None:
        """``on_train_batch_end`` with ``min_steps``: a stop that the minimum held back
        happens after the step that reaches it."""
        state = loop.state
        if (self.pending_stop is not None and self._fitting and state.stepped
                and self._minimum_reached(loop, state.epoch) and not state.should_stop):
            self._stop(loop, *self.pending_stop)

    def _minimum_reached(self, loop: Loop, epochs_done: int) -> bool:
        return epochs_done >= self.min_epochs and loop.state.global_step >= self.min_steps

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

    def _improved(self, value: float, reference: float) -> bool:
        """Whether ``value`` beats ``reference`` by more than ``min_delta``."""
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def _better(self, value: float, reference: float) -> bool:
        """Whether ``value`` beats ``reference`` at all (NaN never does)."""
        return value < reference if self.mode == "min" else value > reference

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
        finite = math.isfinite(value)
        if not finite and self.check_finite:
            self.wait += 1
            self.consecutive_nonfinite_checks += 1
            count = self.consecutive_nonfinite_checks
            if self.on_nonfinite == "rollback" and count < self.max_nonfinite:
                if self._rollback(loop, f"{m} = {value} at epoch {state.epoch}"):
                    return
            in_a_row = f", {count} non-finite checks in a row" if count > 1 else ""
            # never held back by min_epochs/min_steps: nothing useful trains on
            self._stop(loop, "non-finite", f"non-finite monitor: {m} = {value} at epoch "
                       f"{state.epoch}{in_a_row}{self._best_text()}")
            return
        if finite:
            self.consecutive_nonfinite_checks = 0
        if self._improved(value, self.best_score):
            self.best_score = value
            self.best_epoch = state.epoch
            self.best_step = state.global_step
            self.wait = 0
            if self.restore_best_weights:
                self.best_weights = _clone_state(loop.module)
        else:
            if not self.cumulative_delta and self._better(value, self.best_score):
                self.best_score = value  # Ignite: the reference moves, the wait goes on
            self.wait += 1
            self._keep_below_baseline(loop, value)
        verdict: tuple[str, str] | None = None
        if finite:
            if self._rollback_in_memory:
                self._keep_last_good(loop)
            lower = self.mode == "min"
            t = self.stopping_threshold
            d = self.divergence_threshold
            if t is not None and (value <= t if lower else value >= t):
                verdict = ("stopping_threshold",
                           f"threshold reached: {m} = {value:.6g} {'<=' if lower else '>='} {t}")
            elif d is not None and (value > d if lower else value < d):
                verdict = ("divergence_threshold",
                           f"diverged: {m} = {value:.6g} {'>' if lower else '<'} {d}{self._best_text()}")
        if verdict is None and self.wait > 0 and self.wait >= self.patience:
            delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
            verdict = ("patience", f"patience exhausted: {m} did not improve{delta} for "
                       f"{self.wait} check(s){self._best_text()}")
        self.pending_stop = None
        if verdict is None:
            return
        if self._minimum_reached(loop, state.epoch + 1):
            self._stop(loop, *verdict)
            return
        self.pending_stop = verdict
        log.info("hookloop.early_stopping: %s; held back until min_epochs=%d and min_steps=%d "
                 "are reached", verdict[1], self.min_epochs, self.min_steps)

    def _keep_below_baseline(self, loop: Loop, value: float) -> None:
        """``restore_below_baseline``: while no check beat the baseline, keep the weights
        of the best check seen (Keras restores those when the baseline is never beaten)."""
        if not (self.restore_below_baseline and self.restore_best_weights
                and self.baseline is not None and self.best_epoch is None):
            return
        if self.below_best is None or self._better(value, self.below_best):
            self.below_best = value
            self.best_weights = _clone_state(loop.module)

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
            if self.best_epoch is None:
                log.info("hookloop.early_stopping: baseline %s never beaten; restored the weights "
                         "of the best check (%s = %.6g)", self.baseline, self.monitor, self.below_best)
            else:
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
                snapshot = _load_checkpoint_file(self._checkpoint_path, loop.device)
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
