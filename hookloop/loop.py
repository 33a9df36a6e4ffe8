"""The training loop: epochs, steps, validation and the hooks they fire.

The loop's other contracts each live in a module of their own: metrics and their
reduction in :mod:`hookloop.metrics`, optimisation and precision in
:mod:`hookloop.optim`, checkpoint state and resume in :mod:`hookloop.resume`, plugin
management and dispatch in :mod:`hookloop.plugins`. Everything else (checkpointing,
early stopping, trackers, ...) is a plugin that uses the public hooks in
:mod:`hookloop.hookspecs` and the public methods of :class:`Loop`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from hookloop import _distributed as dist
from hookloop import _inputs, position, resume
from hookloop._devices import model_device, to_device
from hookloop.control import OPEN_LOOPS, ControlAPI
from hookloop.metrics import LoggingAPI, MetricStore
from hookloop.optim import Optimization, as_list
from hookloop.plugins import Callers, PluginManager
from hookloop.resume import StateAPI
from hookloop.state import LoopState

__all__ = ["Loop", "StepFn"]

log = logging.getLogger("hookloop")

StepFn = Callable[["Loop", Any], Any]
"""``step_fn(loop, batch)``: returns a loss tensor, a dict with ``"loss"``, or ``None``."""

STATE_FORMAT = resume.STATE_FORMAT


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


class Loop(ControlAPI, LoggingAPI, StateAPI):
    """A minimal training loop that fires hooks; features are plugins.

    :param model: the ``nn.Module`` to train (moved to ``device``; wrapped in
        DistributedDataParallel when a process group with more than one rank is active).
        A model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard`` applied to
        its root) is used as it is: see :attr:`sharded`.
    :param optimizer: an optimizer, or a sequence of them (e.g. for a GAN, with
        ``manual_optimization=True``).
    :param train_data: an iterable of batches, re-iterated every epoch (a DataLoader).
    :param val_data: optional iterable of validation batches.
    :param loss_fn: ``loss_fn(output, target)`` for the default supervised step, which
        expects batches ``(input, target, ...)``.
    :param step_fn: ``step_fn(loop, batch)`` replacing the default step. In automatic
        mode it returns the loss (a scalar tensor, or a dict with ``"loss"``) and the
        loop does backward, accumulation, clipping and the optimizer step; returning
        ``None`` skips optimisation for that batch.
    :param val_step_fn: ``val_step_fn(loop, batch)`` replacing the default validation
        step; log metrics with ``loop.log("val/...", value)``.
    :param manual_optimization: the step function calls ``loop.backward(loss)`` and
        ``loop.optimizer_step(opt)`` itself (several optimizers, GANs).
    :param scheduler: LR scheduler (or sequence), stepped per ``scheduler_interval``;
        ``ReduceLROnPlateau`` receives ``scheduler_monitor`` from the epoch metrics.
    :param device: where to train; default: the device of the model's parameters.
    :param precision: ``"32"``, ``"bf16-mixed"`` (autocast, CPU or CUDA) or
        ``"16-mixed"`` (autocast + GradScaler, CUDA only).
    :param grad_accum: micro-batches per optimizer step.
    :param grad_clip_norm: clip the gradient norm to this value before each step.
    :param grad_clip_value: clip gradient values to ``[-v, v]`` before each step.
    :param log_every_n_steps: optimizer steps between two reductions of the logged
        metrics (one host-device sync per interval).
    :param val_every_n_epochs: validate every N epochs (and after the last epoch).
    :param val_every_n_steps: also validate inside the epoch after every N-th optimizer
        step (Lightning's ``val_check_interval``), after that step's
        ``on_train_batch_end`` and ``on_log``; the epoch-end validation is skipped when
        it would repeat one at the same step.
    :param val_metrics: name to ``fn(output, target) -> scalar tensor`` computed by the
        default validation step and logged as ``val/<name>``.
    :param plugins: plugin objects, installed plugin names, ``(name, options)`` pairs
        (tuple or list), or a mapping of name to options (or to a plugin object, which
        is then registered under that name); called in list order. The reserved option
        ``hookloop_name`` names an instance, so two plugins of one kind can be
        configured without code.
    :param hparams: user hyperparameters, merged into :attr:`hparams` for trackers.
    :param autoload: register always-on installed plugins (see
        ``HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD``).
    :param distributed: ``"auto"`` uses an initialised process group or initialises
        one from torchrun's environment; ``False`` never does.
    :param dist_timeout: timeout of the process group the loop initialises (seconds or a
        ``datetime.timedelta``, positive), passed to ``init_process_group(timeout=...)``:
        how long a collective waits for a stuck or dead rank before it fails. ``None``:
        torch's default (10 minutes for NCCL, 30 for gloo). With a process group
        initialised before the loop it is an error: pass it to that
        ``init_process_group`` call.

    Use it as a context manager (``with Loop(...) as loop:``) or call :meth:`close` to
    release what the loop and its plugins hold.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
        train_data: Iterable[Any] | None = None,
        *,
        val_data: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        step_fn: StepFn | None = None,
        val_step_fn: StepFn | None = None,
        manual_optimization: bool = False,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "32",
        grad_accum: int = 1,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        log_every_n_steps: int = 50,
        val_every_n_epochs: int = 1,
        val_every_n_steps: int | None = None,
        val_metrics: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
        plugins: Iterable[Any] | Mapping[str, Any] | None = None,
        hparams: Mapping[str, Any] | None = None,
        autoload: bool = True,
        distributed: str | bool = "auto",
        dist_timeout: float | timedelta | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        _positive_int("log_every_n_steps", log_every_n_steps)
        _positive_int("grad_accum", grad_accum)
        _positive_int("val_every_n_epochs", val_every_n_epochs)
        _positive_int("val_every_n_steps", val_every_n_steps, allow_none=True)
        if step_fn is None and loss_fn is None and train_data is not None:
            raise ValueError("give loss_fn for the default supervised step, or a step_fn")
        if manual_optimization and step_fn is None:
            raise ValueError("manual_optimization=True needs a step_fn that calls loop.backward")
        for name, value in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        _inputs.check_callables(loss_fn=loss_fn, step_fn=step_fn, val_step_fn=val_step_fn)
        _inputs.check_val_metrics(val_metrics)
        _inputs.check_data("train_data", train_data)
        _inputs.check_data("val_data", val_data)

        self.state = LoopState()
        self.pm = PluginManager()
        self.callers: Callers = self.pm.callers
        self.device = torch.device(device) if device is not None else model_device(model)
        self.model: nn.Module = model.to(self.device)
        self.module = dist.unwrap(self.model)  # the inner model of a DDP model passed in
        if precision == "16-mixed" and self.sharded:
            raise ValueError(
                "precision='16-mixed' with a model sharded by fully_shard is not supported: the "
                "GradScaler would find infinite gradients per shard, and ranks could skip "
                "different steps. Use 'bf16-mixed', or FSDP2's MixedPrecisionPolicy")
        self.optim = Optimization(
            self, as_list(optimizer), as_list(scheduler), precision=precision,
            grad_accum=grad_accum, grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value,
            scheduler_interval=scheduler_interval, scheduler_monitor=scheduler_monitor,
        )
        self.optim.check(self.module)
        dist.check_optimizers(self.optim.optimizers)
        self.optimizers = self.optim.optimizers
        self.schedulers = self.optim.schedulers
        self.scaler = self.optim.scaler
        self.metrics = MetricStore(self)
        self.train_data = train_data
        self.val_data = val_data
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self.val_step_fn = val_step_fn
        self.manual_optimization = manual_optimization
        self.log_every_n_steps = log_every_n_steps
        self.val_every_n_epochs = val_every_n_epochs
        self.val_every_n_steps = val_every_n_steps
        self.val_metrics = dict(val_metrics or {})
        self.user_hparams = dict(hparams or {})

        self._dist = dist.setup(distributed, self.device, dist.check_timeout(dist_timeout))
        if self._dist.active:
            self.state.rank = self._dist.rank
            self.state.world_size = self._dist.world_size
            self.state.is_global_zero = self._dist.rank == 0
            self.model = dist.wrap_model(self.model, self.device)
            self.pm.set_rank(self._dist.rank)

        self.plugin_failures: list[str] = []
        self._phase = "idle"  # "fit" from fit's start to on_fit_end, "ended" in on_fit_end
        self._in_epoch = False  # from on_train_epoch_start to the epoch's last batch
        self._in_batches = False  # while the epoch's batches run
        # the last step's loss, graph and all, until the next step's forward has run (as
        # in a hand-written loop): its nodes hold the parameters' gradient accumulators,
        # which autograd then reuses instead of building anew at every step
        self._last_loss: torch.Tensor | None = None
        self._batches_seen = 0  # batches train_data yielded, counted at each epoch's end
        self._warned_exhausted = False
        self._stop_epoch = False
        self._stop_agreed = False  # DDP: a stop every rank agreed on (see _agree_stop)
        self._rng_epoch_start: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._loader_state: dict[str, Any] = {}
        self._position: dict[str, Any] | None = None  # a resumed epoch's saved position
        self._epoch_base = (0, 0)  # (batches, samples) where this run of the epoch began
        self._fast_forward: position.FastForward | None = None
        self._epoch_len = -1
        self._step_validation: tuple[int, dict[str, float]] = (-1, {})  # (step, metrics)
        self._closed = False
        OPEN_LOOPS.add(self)

        if autoload:
            self.pm.load_autoload_plugins()
        self.add_plugins(plugins)

    # ------------------------------------------------------------------ options

    precision = property(lambda self: self.optim.precision, doc="The precision setting.")
    grad_accum = property(lambda self: self.optim.grad_accum, doc="Micro-batches per step.")
    grad_clip_norm = property(lambda self: self.optim.grad_clip_norm, doc="Gradient norm clip.")
    grad_clip_value = property(lambda self: self.optim.grad_clip_value, doc="Gradient value clip.")

    @property
    def hooks(self) -> Callers:
        """Renamed to :attr:`callers` (the compiled callers; pluggy's ``pm.hook`` is
        another thing). Warns; kept for one release."""
        warnings.warn("Loop.hooks is renamed to Loop.callers (pluggy's pm.hook bypasses "
                      "hookloop's filters and fault policies)", FutureWarning, stacklevel=2)
        return self.callers

    # ------------------------------------------------------------------ plugins

    def add_plugins(self, plugins: Iterable[Any] | Mapping[str, Any] | None) -> list[str]:
        """Register plugins, first in the list called first: objects, installed names,
        ``(name, options)`` pairs (tuple or list), or a mapping of name to options or
        to an object. Returns the registered names.

        A plugin object that was used by another loop starts fresh here: its
        ``load_state_dict`` receives the state it had before its first loop (a
        checkpoint restores it later). A second ``fit`` on this loop continues."""
        names = self.pm.add(plugins)
        for name in names:
            resume.claim(self, self.pm.get_plugin(name))
        return names

    def get_plugin(self, name: str) -> Any:
        """The plugin registered under ``name`` (``None`` if there is none)."""
        return self.pm.get_plugin(name)

    # ------------------------------------------------------------------ devices

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensors in tuples, lists, dicts) to the loop's device; tensors
        already there are left alone, pinned tensors are copied non-blocking."""
        return to_device(batch, self.device)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the loop's precision (null for ``"32"``)."""
        return self.optim.autocast()

    # ------------------------------------------------------------------ optimisation

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (divided by ``grad_accum``), firing the backward
        hooks; with a GradScaler the loss is scaled. Use it in manual optimisation."""
        self.optim.backward(loss)

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer | None = None, *, update_scaler: bool = True
    ) -> bool:
        """Unscale, clip, fire ``on_before_optimizer_step``, step and zero the grads of
        ``optimizer`` (default: the first). Returns whether the step ran (a plugin may
        skip it). Use it in manual optimisation; with several optimizers and a
        GradScaler, pass ``update_scaler=False`` to all but the last one of an iteration
        (the scale is updated once per iteration)."""
        opt = optimizer if optimizer is not None else self.optimizers[0]
        return self.optim.optimizer_step(opt, update_scaler)

    # ------------------------------------------------------------------ steps

    def _default_step(self, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                "the default step expects batches (input, target, ...); got "
                f"{type(batch).__name__}; pass step_fn for other batch layouts"
            )
        return self.loss_fn(self.model(batch[0]), batch[1])  # type: ignore[misc]

    def _plain(self) -> bool:
        """Whether the batches can take :meth:`_plain_step` (checked at each epoch's
        start; the backward and optimizer hooks are checked at every step)."""
        optim = self.optim
        return (self.step_fn is None and not self.manual_optimization and optim.grad_accum == 1
                and optim.autocast_dtype is None and optim.scaler is None and optim.grad_clip_norm is None
                and optim.grad_clip_value is None and len(optim.optimizers) == 1)

    def _plain_step(self, batch: Any, batch_idx: int) -> Any:
        """:meth:`_train_step` for the default step with nothing between its parts: one
        optimizer, no accumulation, clipping, autocast or scaler (checked at each epoch's
        start), and no plugin on the backward or optimizer hooks (checked here, at every
        step). The same operations as the general path, with fewer Python calls (the hot
        path of the simplest loop)."""
        callers = self.callers
        if (callers.on_before_backward is not None or callers.on_after_backward is not None
                or callers.on_before_optimizer_step is not None
                or (batch.__class__ is not tuple and batch.__class__ is not list) or len(batch) < 2):
            return self._train_step(batch, batch_idx)  # with the general path's hooks and errors
        loss = self.loss_fn(self.model(batch[0]), batch[1])  # type: ignore[misc]
        if loss.__class__ is not torch.Tensor or loss.ndim:
            _checked_loss(loss)
        loss.backward()
        self._last_loss = loss
        optim = self.optim
        opt = optim.optimizers[0]
        state = self.state
        if optim.skip:
            opt.zero_grad(set_to_none=True)
            optim.skip = state.stepped = False
            return {"loss": loss.detach()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        state.stepped = True
        pending = self.metrics.pending  # MetricStore.record, inlined: stage is "train"
        values = pending.get("train/loss")
        if values is None:
            pending["train/loss"] = [loss]
        else:
            values.append(loss)
        state.global_step += 1
        if optim.scheduler_interval == "step":
            optim.step_schedulers_per_step()
        return {"loss": loss}

    def _train_step(self, batch: Any, batch_idx: int) -> Any:
        """Run one batch; returns the outputs that ``on_train_batch_end`` receives."""
        state = self.state
        optim = self.optim
        if self.manual_optimization:
            optim.stepped_manual = False
            with optim.autocast():
                outputs = self.step_fn(self, batch)  # type: ignore[misc]
            stepped = optim.stepped_manual
            optim.skip = False
        else:
            accum = optim.grad_accum
            boundary = accum == 1 or (batch_idx + 1) % accum == 0 or batch_idx + 1 == self._epoch_len
            if optim.autocast_dtype is None and (boundary or not self._dist.active):
                result = self._forward_backward(batch)  # fast path: no context managers
            else:
                sync_ctx = (
                    dist.no_sync(self.model)  # DDP's no_sync, or FSDP2's gradient sync off
                    if not boundary and self._dist.active
                    else contextlib.nullcontext()
                )
                with sync_ctx:
                    result = self._forward_backward(batch)
            if result is None:
                state.stepped = False
                optim.skip = False
                return None
            optim.accumulated += 1
            stepped = optim.step_all() if boundary else False
            if isinstance(result, torch.Tensor):
                loss = result.detach()
                outputs = {"loss": loss}
                if self.step_fn is None and (stepped or not boundary):  # not a skipped step's
                    self.metrics.record("train/loss", loss)
            else:
                outputs = result
        state.stepped = stepped
        if stepped:
            state.global_step += 1
            if optim.scheduler_interval == "step":
                optim.step_schedulers_per_step()
        return outputs

    def _forward_backward(self, batch: Any) -> Any:
        """The step function under autocast, then backward; ``None`` skips the batch."""
        if self.optim.autocast_dtype is None:
            result = self._default_step(batch) if self.step_fn is None else self.step_fn(self, batch)
        else:
            with self.optim.autocast():
                result = self._default_step(batch) if self.step_fn is None else self.step_fn(self, batch)
        if result is None:
            return None
        loss = result["loss"] if isinstance(result, Mapping) else result
        self.optim.backward(_checked_loss(loss))
        self._last_loss = loss
        return result

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        *,
        resume: Mapping[str, Any] | None = None,
    ) -> LoopState:
        """Train until ``max_epochs`` epochs or ``max_steps`` optimizer steps (exactly
        one of them), or until a plugin requests a stop. ``resume`` is a dict from
        :meth:`state_dict` to continue from; without it a plugin may supply one through
        ``on_resume`` (the checkpoint plugin's ``resume=``). The restore happens before
        any ``on_fit_start``; counters continue, so ``max_epochs`` counts from the start
        of the run. A second ``fit`` on the same loop continues from where the first
        ended.

        Returns the final :class:`LoopState`. Exceptions propagate after
        ``on_exception`` fired; a fit that raises under DDP, or is ended by
        ``KeyboardInterrupt``/``SystemExit``, also closes the loop (:meth:`close`).
        """
        if self._closed:
            raise RuntimeError("this Loop was closed; build a new Loop to train again")
        if (max_epochs is None) == (max_steps is None):
            raise ValueError(
                f"give exactly one of max_epochs or max_steps; got max_epochs={max_epochs!r}, "
                f"max_steps={max_steps!r}"
            )
        _positive_int("max_epochs", max_epochs, allow_none=True)
        _positive_int("max_steps", max_steps, allow_none=True)
        if self._phase != "idle":
            raise RuntimeError("Loop.fit called while this loop is fitting (from a hook); "
                               "a loop runs one fit at a time")
        _inputs.check_resume(resume)
        if self.train_data is None:
            raise ValueError("Loop.fit needs train_data")
        _inputs.check_not_empty(self.train_data)
        if not self.optimizers and not self.manual_optimization:
            raise ValueError("Loop.fit needs an optimizer (or manual_optimization=True)")
        state = self.state
        state.max_epochs, state.max_steps = max_epochs, max_steps
        state.should_stop, state.stop_reason = False, None
        self._stop_epoch = self._stop_agreed = False
        self.optim.skip = False
        self._phase = "fit"
        self.pm.reset_run_state()
        try:
            if resume is None:
                h = self.callers.on_resume
                resume = h(self) if h is not None else None
            if resume is not None:
                self.load_state_dict(resume)
            h = self.callers.on_fit_start
            if h is not None:
                h(self)
            self._run_epochs()
            state.stage = "idle"
            self._phase = "ended"
            h = self.callers.on_fit_end
            if h is not None:
                h(self)
        except BaseException as exc:
            h = self.callers.on_exception
            if h is not None:
                h(self, exc)
            if self._dist.active or not isinstance(exc, Exception):
                self.close()
            raise
        finally:
            state.stage = "idle"
            self._phase = "idle"
            self._in_epoch = self._in_batches = False
            self._last_loss = None
            self._end_fast_forward()
            self._report_failures()
        return state

    def _run_epochs(self) -> None:
        state = self.state
        while True:
            if state.epoch_done:  # resumed from an end-of-epoch checkpoint
                state.epoch += 1
                state.epoch_done = False
                state.epoch_batches_done = 0
            if state.max_epochs is not None and state.epoch >= state.max_epochs:
                state.stop_reason = state.stop_reason or "max_epochs"
                return
            if state.max_steps is not None and state.global_step >= state.max_steps:
                state.stop_reason = state.stop_reason or "max_steps"
                return
            if not self._train_epoch():  # a stop before the epoch, or no data left
                return
            metrics = self.metrics.reduce_epoch()  # under DDP this also agrees on should_stop
            last = (state.max_epochs is not None and state.epoch + 1 >= state.max_epochs) or (
                state.max_steps is not None and state.global_step >= state.max_steps
            ) or state.should_stop
            validated = self.val_data is not None and (
                (state.epoch + 1) % self.val_every_n_epochs == 0 or last
            )
            done_at, done = self._step_validation
            if validated and done_at == state.global_step:  # validated at this very step
                metrics.update(done)
            elif validated:
                metrics.update(self._run_validation())
            if self.optim.scheduler_interval == "epoch":
                self.optim.step_schedulers_per_epoch(metrics, validated)
            state.epoch_done = True
            state.stage = "train"
            h = self.callers.on_train_epoch_end
            if h is not None:
                h(self, state.epoch, dict(metrics))
            if self._dist.active:
                self._agree_stop(dist.all_reduce_sum(
                    torch.tensor([float(state.should_stop)], device=self.device)).item())
            if state.should_stop:
                return

    def _start_epoch(self) -> Any:
        """Fire ``on_train_epoch_start`` and return the epoch's batch iterator,
        positioned after the batches a mid-epoch checkpoint already did."""
        state = self.state
        state.stage = "train"
        self.model.train()
        self._stop_epoch = False
        self._stop_agreed = False
        self._in_epoch = True
        data = self.train_data
        dist.set_epoch(data, state.epoch)
        try:
            self._epoch_len = len(data)  # type: ignore[arg-type]
        except TypeError:
            self._epoch_len = -1
        skip = state.epoch_batches_done
        h = self.callers.on_train_epoch_start
        if h is not None:
            h(self, state.epoch)
        if (self._stop_epoch or state.should_stop) and not self._dist.active:
            # stopped in on_train_epoch_start: the epoch runs no batch
            if self._resume_rng is not None:
                resume.set_rng(self._resume_rng)
                self._resume_rng = None
            if self.metrics.undelivered is not None:
                self.metrics.deliver()
            return iter(())
        if skip and self._rng_epoch_start is not None:
            # resume mid-epoch: replay the epoch's shuffle, then continue with the
            # RNG state of the moment the checkpoint was taken
            resume.set_rng(self._rng_epoch_start)
            resume.set_loader_state(data, self._loader_state)
        self._rng_epoch_start = resume.get_rng()
        self._loader_state = resume.get_loader_state(data)
        saved, self._position = self._position, None
        self._epoch_base = (0, 0)
        if skip and saved is not None:
            problems = position.check(data, saved, saved.get("world_size", state.world_size),
                                      state.world_size)
            if problems:
                raise resume.ResumeError("cannot continue the resumed epoch: " + "; ".join(problems))
            self._fast_forward = position.fast_forward(data, saved)
        it = iter(data)  # type: ignore[arg-type]
        ff = self._fast_forward
        if ff is not None:  # the sampler starts after the samples done: nothing to fetch
            ff.prepare()  # where the loader would first draw from its sampler
            state.epoch_batches_done = position.resumed_batches(data, ff.skip)
            self._epoch_base = (state.epoch_batches_done, ff.skip)
        else:
            for done in range(skip):
                if next(it, _inputs.END) is _inputs.END:
                    raise _inputs.short_resume_error(done, skip, state.epoch)
        if skip and self._resume_rng is not None:
            resume.set_rng(self._resume_rng)
        self._resume_rng = None
        if self.metrics.undelivered is not None:  # saved inside a log step's batch end
            self.metrics.deliver()
        return it

    def _train_epoch(self) -> bool:
        """Run one training epoch; False when no epoch ran (a stop requested before it,
        or train_data exhausted), so the epoch's end must not run either."""
        state = self.state
        if state.should_stop and not self._dist.active:  # requested in on_resume/on_fit_start
            return False
        it = self._start_epoch()
        distributed = self._dist.active
        callers = self.callers
        metrics = self.metrics
        device = self.device
        move = device.type != "cpu"
        log_every = self.log_every_n_steps
        val_every = self.val_every_n_steps if self.val_data is not None else None
        batch_idx = first = state.epoch_batches_done
        train_step = self._plain_step if self._plain() else self._train_step
        self._in_batches = True
        for batch in it:
            if move:
                batch = to_device(batch, device)
            state.batch_idx = batch_idx
            h = callers.on_train_batch_start
            if h is not None:
                h(self, batch, batch_idx)
                if self._stop_agreed if distributed else (self._stop_epoch or state.should_stop):
                    break
            outputs = train_step(batch, batch_idx)
            state.outputs = outputs
            batch_idx += 1
            state.epoch_batches_done = batch_idx
            log_step = state.stepped and state.global_step % log_every == 0
            if log_step:  # the interval that ends here, before anyone looks
                metrics.reduce_interval()
            h = callers.on_train_batch_end
            if h is not None:
                h(self, outputs, batch, batch_idx - 1)
            if log_step:
                metrics.deliver()
            if val_every is not None and state.stepped and state.global_step % val_every == 0:
                self._step_validation = (state.global_step, self._run_validation())
            if self._stop_agreed if distributed else (state.should_stop or self._stop_epoch):
                break
            if state.max_steps is not None and state.global_step >= state.max_steps:
                break
        state.outputs = self._last_loss = None
        self._in_epoch = self._in_batches = False
        self._end_fast_forward()
        if self.optim.accumulated and not self.manual_optimization:
            self.optim.drop_partial_window(state.epoch)
        self.optim.skip = False  # a skip never carries over to the next epoch
        if batch_idx == first == 0 and not (state.should_stop or self._stop_epoch or self._stop_agreed):
            return self._no_batches()
        self._batches_seen += batch_idx - first
        return True

    def _end_fast_forward(self) -> None:
        """Give the loader back its own sampler after a resumed epoch."""
        if self._fast_forward is not None:
            position.restore(self.train_data, self._fast_forward)
            self._fast_forward = None

    def _no_batches(self) -> bool:
        """An epoch whose data yielded nothing: an error when train_data never yielded a
        batch; else (an exhausted iterator) a warning, once, and a stop."""
        state = self.state
        if self._batches_seen == 0:
            raise _inputs.no_batches_error(self.train_data, state.epoch)
        state.should_stop = True
        state.stop_reason = "train_data exhausted"
        if not self._warned_exhausted:
            self._warned_exhausted = True
            warnings.warn(_inputs.exhausted_text(self.train_data, state.epoch, self._batches_seen),
                          RuntimeWarning, stacklevel=4)
        log.warning("hookloop: train_data exhausted in epoch %d; stopping", state.epoch)
        return False

    # ------------------------------------------------------------------ validation

    def validate(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        """Run the validation loop over ``data`` (default ``val_data``) and return the
        reduced metrics; fires the validation hooks and ``on_log``."""
        return self._run_validation(data)

    def _run_validation(self, data: Iterable[Any] | None = None) -> dict[str, float]:
        data = self.val_data if data is None else data
        if data is None:
            raise ValueError("validate() needs val_data (given to Loop or to validate)")
        state = self.state
        previous_stage = state.stage
        was_training = self.model.training
        callers = self.callers
        state.stage = "validate"
        self.model.eval()
        self.metrics.val_pending = {}
        try:
            with torch.no_grad():
                h = callers.on_validation_start
                if h is not None:
                    h(self)
                for batch_idx, batch in enumerate(data):
                    batch = to_device(batch, self.device)
                    with self.optim.autocast():
                        if self.val_step_fn is not None:
                            outputs = self.val_step_fn(self, batch)
                        else:
                            outputs = self._default_val_step(batch)
                    h = callers.on_validation_batch_end
                    if h is not None:
                        h(self, outputs, batch, batch_idx)
            metrics, now = self.metrics.reduce_validation()
            h = callers.on_validation_end
            if h is not None:
                h(self, dict(metrics))
            self.metrics.emit(metrics, now)
        finally:  # also when a step or hook raises and the caller goes on
            self.metrics.val_pending = {}
            self.model.train(was_training)
            state.stage = previous_stage
        return metrics

    def _default_val_step(self, batch: Any) -> dict[str, Any]:
        if self.loss_fn is None:
            raise ValueError("the default validation step needs loss_fn; or pass val_step_fn")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"the default validation step expects (input, target) batches; got "
                f"{type(batch).__name__}; pass val_step_fn"
            )
        output = self.model(batch[0])
        loss = self.loss_fn(output, batch[1])
        self.log("val/loss", loss)
        for name, fn in self.val_metrics.items():
            self.log(f"val/{name}", fn(output, batch[1]))
        return {"loss": loss.detach(), "output": output.detach()}

    def _report_failures(self) -> None:
        lines = self.pm.failure_summary()
        if lines:
            log.warning("hookloop: plugin failures during fit:\n  %s", "\n  ".join(lines))
        self.plugin_failures = lines

# ---------------------------------------------------------------------- helpers

def _checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"the training step must produce a scalar loss tensor; got {shape!r}. "
            "Reduce the loss (e.g. reduction='mean') or return a dict with 'loss'"
        )
    return loss
