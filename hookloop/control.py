"""The control calls of :class:`~hookloop.Loop`: stopping the fit or the epoch, skipping
an optimizer step, rewrapping the model for the process group, the DDP agreement on
stops, and the loop's teardown (``close``, ``with Loop(...)``, the exit handler). Each
control call says where it may be called; anywhere else it raises instead of acting
silently on a later step or fit."""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any, TypeVar

from hookloop import _distributed as dist
from hookloop import _inputs

__all__ = ["OPEN_LOOPS", "ControlAPI"]

log = logging.getLogger("hookloop")
_Self = TypeVar("_Self", bound="ControlAPI")


class ControlAPI:
    """Mixed into :class:`~hookloop.Loop`."""

    state: Any
    optim: Any
    module: Any
    model: Any
    device: Any
    _dist: Any
    _phase: str
    _in_epoch: bool
    _in_batches: bool
    _stop_epoch: bool
    _stop_agreed: bool
    _closed: bool
    callers: Any

    def request_stop(self, reason: str, *, agreed: bool = False) -> None:
        """Stop training after the current batch; ``reason`` is kept in
        ``state.stop_reason`` and reported. Under DDP the decision is agreed across
        ranks at the next reduction point (log interval or epoch end), unless
        ``agreed=True``: the caller guarantees that every rank makes this call at the
        same batch (a decision the ranks already share, e.g. through a collective), and
        every rank stops after this batch.

        Where it may be called, and its effect: during a batch (the batch hooks, the step
        function), the fit stops after that batch; in ``on_train_epoch_start``, the
        epoch runs no batch and ends (its validation and ``on_train_epoch_end`` still
        run); during the epoch-end validation or in ``on_train_epoch_end``, no further
        epoch starts; in ``on_resume`` or ``on_fit_start``, no epoch starts (under DDP:
        at the first reduction point). The first reason given wins. Outside ``fit``
        and in ``on_fit_end`` there is nothing left to stop: a RuntimeError. Every
        ``fit`` starts with the stop flag cleared.
        """
        if self._phase != "fit":
            where = "in on_fit_end, after the fit ended" if self._phase == "ended" else "outside fit"
            raise RuntimeError(
                f"loop.request_stop({reason!r}) called {where}: there is no training left to stop "
                f"(stop_reason: {self.state.stop_reason!r}), and a fit clears the stop flag when "
                "it starts. Call it from a hook during fit, up to on_train_epoch_end"
            )
        if not self.state.should_stop:
            self.state.should_stop = True
            self.state.stop_reason = str(reason)
            log.info("hookloop: stop requested: %s", reason)
        if agreed:
            self._stop_agreed = True

    def stop_epoch(self) -> None:
        """End the current training epoch after the current batch; its validation and
        ``on_train_epoch_end`` still run, then the next epoch starts. From
        ``on_train_batch_start`` the epoch ends before that batch; from
        ``on_train_epoch_start`` it runs no batch. Under DDP, like :meth:`request_stop`,
        every rank ends the epoch at the next reduction point (log interval or epoch
        end), at the same batch. The flag is cleared when an epoch starts.

        Only while a training epoch runs (``on_train_epoch_start`` to
        ``on_train_batch_end``): called during validation, in ``on_train_epoch_end``,
        ``on_fit_start``, ``on_fit_end`` or outside fit it raises RuntimeError, as the
        epoch it would end is over (use :meth:`request_stop` to stop training)."""
        if not (self._in_epoch and self.state.stage == "train"):
            raise RuntimeError(
                f"loop.stop_epoch() called {_inputs.where(self)}: no training epoch is running, so "
                "there is no epoch to end. Call it from on_train_epoch_start, "
                "on_train_batch_start, the step function or on_train_batch_end; to stop "
                "training, call loop.request_stop(reason)"
            )
        self._stop_epoch = True

    def skip_optimizer_step(self) -> None:
        """Skip the optimizer step of the current batch; gradients are zeroed. With
        gradient accumulation it skips the step that ends the current accumulation
        window; in manual optimisation, every ``loop.optimizer_step`` of the current
        batch. Call it during a batch, before its step: from ``on_train_batch_start``,
        the step function, ``on_before_backward``, ``on_after_backward`` or
        ``on_before_optimizer_step``. Anywhere else (``on_train_batch_end``, whose step
        already ran, epoch hooks, validation, outside fit) it raises RuntimeError; it
        never carries over to a later batch, epoch or fit. Under DDP the decision must
        be the same on every rank (base it on reduced values), since the step count
        decides when ranks meet for the metric reduction."""
        state = self.state
        if not (self._in_batches and state.stage == "train" and state.batch_idx == state.epoch_batches_done):
            raise RuntimeError(
                f"loop.skip_optimizer_step() called {_inputs.where(self)}: no optimizer step is "
                "pending. Call it during a batch, before its step: from on_train_batch_start, "
                "the step function, on_before_backward, on_after_backward or "
                "on_before_optimizer_step"
            )
        self.optim.skip = True

    def rewrap_model(self) -> None:
        """Wrap ``loop.module`` for the process group again, after the set of parameters
        that require grad changed (freezing, unfreezing): DistributedDataParallel
        registers only those when it wraps a model. Every rank must call it at the same
        point (wrapping broadcasts rank 0's weights). A no-op when not distributed."""
        if self._dist.active:
            self.model = dist.wrap_model(self.module, self.device)

    def barrier(self) -> None:
        """Wait for every rank (no-op when not distributed)."""
        if self._dist.active:
            dist.barrier()

    def _agree_stop(self, stop_votes: float, epoch_votes: float = 0.0) -> None:
        # Under DDP a rank leaves the epoch only on an agreed stop (every rank at the
        # same batch); a local request waits for the next reduction.
        if stop_votes > 0 and not self.state.should_stop:
            self.state.should_stop = True
            self.state.stop_reason = "stop requested on another rank"
        if epoch_votes > 0:
            self._stop_epoch = True
        self._stop_agreed = self._stop_agreed or stop_votes > 0 or epoch_votes > 0

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Release what the loop and its plugins hold: fires ``on_close`` (tracker
        workers, signal handlers, staging buffers; every plugin is called even if one
        fails) and destroys the process group if this loop created it. Idempotent;
        called by ``with Loop(...)``, by a fit that raises under DDP or by
        ``KeyboardInterrupt``/``SystemExit``, and at interpreter exit for loops still
        open. A closed loop cannot fit again."""
        if self._closed:
            return
        self._closed = True
        OPEN_LOOPS.discard(self)
        try:
            h = self.callers.on_close
            if h is not None:
                h(self)
        finally:
            if self._dist.owns_group:
                dist.destroy()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


OPEN_LOOPS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Loops not closed yet; the exit handler closes them."""


@atexit.register
def _close_open_loops() -> None:
    """At interpreter exit, close loops still open, so that process groups they created
    are destroyed before torch's own teardown (a joinable C++ thread otherwise aborts
    the process with ``terminate called without an active exception``)."""
    for loop in list(OPEN_LOOPS):
        try:
            loop.close()
        except Exception as exc:  # exiting anyway: report and go on
            log.error("hookloop: closing a loop at exit failed: %r", exc)
