"""The training loop: counters, device placement, optimisation, metrics and hooks.

Everything else (checkpointing, early stopping, trackers, ...) is a plugin that uses the
public hooks in :mod:`hookloop.hookspecs` and the public methods of :class:`Loop`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hookloop import _distributed as dist
from hookloop.plugins import PluginManager
from hookloop.state import LoopState
from hookloop.tracking import mask_secrets

__all__ = ["Loop", "StepFn"]

log = logging.getLogger("hookloop")

StepFn = Callable[["Loop", Any], Any]
"""``step_fn(loop, batch)``: returns a loss tensor, a dict with ``"loss"``, or ``None``."""

STATE_FORMAT = "hookloop.loop/1"
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


class Loop:
    """A minimal training loop that fires hooks; features are plugins.

    :param model: the ``nn.Module`` to train (moved to ``device``; wrapped in
        DistributedDataParallel when a process group with more than one rank is active).
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
    :param val_metrics: name to ``fn(output, target) -> scalar tensor`` computed by the
        default validation step and logged as ``val/<name>``.
    :param plugins: plugin objects, installed plugin names, ``(name, options)`` pairs,
        or a mapping of name to options; called in list order.
    :param hparams: user hyperparameters, merged into :attr:`hparams` for trackers.
    :param autoload: register always-on installed plugins (see
        ``HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD``).
    :param distributed: ``"auto"`` uses an initialised process group or initialises
        one from torchrun's environment; ``False`` never does.
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
        val_metrics: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
        plugins: Iterable[Any] | Mapping[str, Any] | None = None,
        hparams: Mapping[str, Any] | None = None,
        autoload: bool = True,
        distributed: str | bool = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        _positive_int("log_every_n_steps", log_every_n_steps)
        _positive_int("grad_accum", grad_accum)
        _positive_int("val_every_n_epochs", val_every_n_epochs)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}; expected 'epoch' or 'step'")
        if step_fn is None and loss_fn is None and train_data is not None:
            raise ValueError("give loss_fn for the default supervised step, or a step_fn")
        if manual_optimization and step_fn is None:
            raise ValueError("manual_optimization=True needs a step_fn that calls loop.backward")
        for name, value in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value!r}")

        self.state = LoopState()
        self.pm = PluginManager()
        self.hooks = self.pm.hooks

        self.device = torch.device(device) if device is not None else _model_device(model)
        self.model: nn.Module = model.to(self.device)
        self.module = dist.unwrap(self.model)  # the inner model of a DDP model passed in
        self.optimizers: list[torch.optim.Optimizer] = _as_list(optimizer)
        self.schedulers: list[Any] = _as_list(scheduler)
        self._check_optimizers()
        self.train_data = train_data
        self.val_data = val_data
        self.loss_fn = loss_fn
        self.step_fn = step_fn
        self.val_step_fn = val_step_fn
        self.manual_optimization = manual_optimization
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.precision = precision
        self.grad_accum = grad_accum
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.log_every_n_steps = log_every_n_steps
        self.val_every_n_epochs = val_every_n_epochs
        self.val_metrics = dict(val_metrics or {})
        self.user_hparams = dict(hparams or {})

        if precision == "16-mixed" and self.device.type != "cuda":
            raise ValueError("precision='16-mixed' needs a CUDA device; use 'bf16-mixed' on CPU")
        self._autocast_dtype = {"32": None, "bf16-mixed": torch.bfloat16,
                                "16-mixed": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None

        self._dist = dist.setup(distributed, self.device)
        if self._dist.active:
            self.state.rank = self._dist.rank
            self.state.world_size = self._dist.world_size
            self.state.is_global_zero = self._dist.rank == 0
            self.model = dist.wrap_model(self.model, self.device)
            self.pm.set_rank(self._dist.rank)

        # metrics not yet reduced: name -> list of detached tensors / floats
        self._pending: dict[str, list[Any]] = {}
        self._epoch_acc: dict[str, list[Any]] = {}  # name -> [sum tensor/float, count]
        self._val_pending: dict[str, list[Any]] = {}
        self._skip_step = False
        self._accumulated = 0  # micro-batches back-propagated since the last optimizer step
        self._warned_partial = False
        self.plugin_failures: list[str] = []
        self._stop_epoch = False
        self._stop_agreed = False  # DDP: a stop every rank agreed on (see _agree_stop)
        self._stepped_manual = False
        self._rng_epoch_start: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._loader_state: dict[str, Any] = {}
        self._flush_due = False
        self._resume_flush = False

        if autoload:
            self.pm.load_autoload_plugins()
        self.add_plugins(plugins)

    # ------------------------------------------------------------------ plugins

    def add_plugins(self, plugins: Iterable[Any] | Mapping[str, Any] | None) -> list[str]:
        """Register plugins: objects, installed names, ``(name, options)`` pairs or a
        mapping of name to options. The first in the list is called first."""
        if plugins is None:
            return []
        items = list(plugins.items()) if isinstance(plugins, Mapping) else list(plugins)
        names = []
        # pluggy calls the latest registration first: register in reverse order
        for item in reversed(items):
            if isinstance(item, str):
                names.append(self.pm.load(item))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names.append(self.pm.load(item[0], item[1]))
            else:
                names.append(self.pm.register(item))
        return list(reversed(names))

    def get_plugin(self, name: str) -> Any:
        """The plugin registered under ``name`` (``None`` if there is none)."""
        return self.pm.get_plugin(name)

    # ------------------------------------------------------------------ checks

    def _check_optimizers(self) -> None:
        params = {id(p) for p in self.module.parameters()}
        for i, opt in enumerate(self.optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer[{i}] must be a torch.optim.Optimizer; got {opt!r}")
            held = [p for g in opt.param_groups for p in g["params"]]
            if not any(id(p) in params for p in held):
                raise ValueError(
                    f"optimizer[{i}] ({type(opt).__name__}) holds none of the model's "
                    f"parameters ({len(held)} foreign tensors); build it from model.parameters()"
                )

    @property
    def hparams(self) -> dict[str, Any]:
        """The loop's configuration plus the user's ``hparams``, for trackers to record."""
        opt = self.optimizers[0] if self.optimizers else None
        cfg: dict[str, Any] = {
            "model": type(self.module).__name__,
            "optimizer": type(opt).__name__ if opt else None,
            "lr": opt.param_groups[0].get("lr") if opt else None,
            "precision": self.precision,
            "grad_accum": self.grad_accum,
            "grad_clip_norm": self.grad_clip_norm,
            "log_every_n_steps": self.log_every_n_steps,
            "max_epochs": self.state.max_epochs,
            "max_steps": self.state.max_steps,
            "device": str(self.device),
            "world_size": self.state.world_size,
        }
        cfg.update(self.user_hparams)
        return cfg

    # ------------------------------------------------------------------ control

    def request_stop(self, reason: str) -> None:
        """Stop training after the current batch; ``reason`` is kept in
        ``state.stop_reason`` and reported. Under DDP the decision is agreed across
        ranks at the next reduction point (log interval or epoch end)."""
        if not self.state.should_stop:
            self.state.should_stop = True
            self.state.stop_reason = str(reason)
            log.info("hookloop: stop requested: %s", reason)

    def stop_epoch(self) -> None:
        """End the current epoch after the current batch (validation still runs). Under
        DDP, like :meth:`request_stop`, every rank ends the epoch at the next reduction
        point (log interval or epoch end), at the same batch."""
        self._stop_epoch = True

    def skip_optimizer_step(self) -> None:
        """Skip the optimizer step of the current batch (call from
        ``on_before_optimizer_step`` or earlier); gradients are zeroed. Under DDP the
        decision must be the same on every rank (base it on reduced values), since the
        step count decides when ranks meet for the metric reduction."""
        self._skip_step = True

    def barrier(self) -> None:
        """Wait for every rank (no-op when not distributed)."""
        if self._dist.active:
            dist.barrier()

    # ------------------------------------------------------------------ logging

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar metric. Tensors are kept detached on their device and reduced
        (mean) only at the log interval, epoch end and validation end: no host-device
        sync here. During validation values go to the validation reduction."""
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
        self._record(name, value)

    def _record(self, name: str, value: torch.Tensor | float) -> None:
        bucket = self._val_pending if self.state.stage == "validate" else self._pending
        values = bucket.get(name)
        if values is None:
            bucket[name] = [value]
        else:
            values.append(value)

    def log_text(self, name: str, text: str) -> None:
        """Send text (e.g. a model summary) to every tracker now."""
        h = self.hooks.on_log_text
        if h is not None:
            h(self, name, str(text), self.state.global_step)

    def log_image(self, name: str, image: Any) -> None:
        """Send an image (CPU tensor ``(C, H, W)`` in [0, 1], or a matplotlib figure)."""
        h = self.hooks.on_log_image
        if h is not None:
            if isinstance(image, torch.Tensor):
                image = image.detach().cpu()
            h(self, name, image, self.state.global_step)

    def _sum_count(self, values: list[Any]) -> tuple[Any, int]:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        floats = [v for v in values if not isinstance(v, torch.Tensor)]
        total: Any = 0.0
        if tensors:  # a value logged from another device is moved here, at the flush
            total = torch.stack([t.reshape(()).float().to(self.device, non_blocking=True)
                                 for t in tensors]).sum()
        if floats:
            total = total + sum(floats)
        return total, len(values)

    def _reduce(self, sums: dict[str, tuple[Any, int]]) -> dict[str, float]:
        """One host-device sync (and one collective under DDP) for every name."""
        names = sorted(sums)
        if not names and not self._dist.active:
            return {}
        vec = torch.stack([
            s if isinstance(s, torch.Tensor)
            else torch.tensor(float(s), device=self.device)
            for s, _ in (sums[n] for n in names)
        ]) if names else torch.zeros(0, device=self.device)
        counts = [float(sums[n][1]) for n in names]
        if self._dist.active:
            votes = [float(self.state.should_stop), float(self._stop_epoch)]
            extra = torch.tensor([*counts, *votes], device=vec.device)
            both = dist.all_reduce_sum(torch.cat([vec.float(), extra]))
            values = both.tolist()
            n = len(names)
            totals, counts = values[:n], values[n:2 * n]
            self._agree_stop(values[2 * n], values[2 * n + 1])
        else:
            totals = vec.tolist()
        return {name: t / c for name, t, c in zip(names, totals, counts, strict=True) if c}

    def _agree_stop(self, stop_votes: float, epoch_votes: float = 0.0) -> None:
        # Under DDP a rank leaves the epoch only on an agreed stop (every rank at the
        # same batch); a local request waits here for the next reduction.
        if stop_votes > 0 and not self.state.should_stop:
            self.state.should_stop = True
            self.state.stop_reason = "stop requested on another rank"
        if epoch_votes > 0:
            self._stop_epoch = True
        self._stop_agreed = self._stop_agreed or stop_votes > 0 or epoch_votes > 0

    def _take_pending(self) -> dict[str, tuple[Any, int]]:
        """Sum the values logged since the last flush (no sync) and add them to the
        epoch's running sums."""
        pending, self._pending = self._pending, {}
        sums = {name: self._sum_count(values) for name, values in pending.items()}
        for name, (total, count) in sums.items():
            acc = self._epoch_acc.get(name)
            if acc is None:
                self._epoch_acc[name] = [total, count]
            else:
                acc[0] = acc[0] + total
                acc[1] += count
        return sums

    def _flush_interval(self) -> None:
        sums = self._take_pending()
        if sums or self._dist.active:  # under DDP every rank joins the reduction
            self._emit(self._reduce(sums))

    def _flush_epoch(self) -> dict[str, float]:
        self._take_pending()
        sums = {f"{name}_epoch": (acc[0], acc[1]) for name, acc in self._epoch_acc.items()}
        self._epoch_acc = {}
        metrics = self._reduce(sums) if (sums or self._dist.active) else {}
        self._emit(metrics)
        return metrics

    def _emit(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        self.state.metrics.update(metrics)
        h = self.hooks.on_log
        if h is not None:
            h(self, dict(metrics), self.state.global_step)

    # ------------------------------------------------------------------ devices

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensors in tuples, lists, dicts) to the loop's device; tensors
        already there are left alone, pinned tensors are copied non-blocking."""
        return _to_device(batch, self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    # ------------------------------------------------------------------ optimisation

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (divided by ``grad_accum``), firing the backward
        hooks; with a GradScaler the loss is scaled. Use it in manual optimisation."""
        if self.grad_accum > 1:
            loss = loss / self.grad_accum
        h = self.hooks.on_before_backward
        if h is not None:
            h(self, loss)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        h = self.hooks.on_after_backward
        if h is not None:
            h(self)

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer | None = None, *, update_scaler: bool = True
    ) -> bool:
        """Unscale, clip, fire ``on_before_optimizer_step``, step and zero the grads of
        ``optimizer`` (default: the first). Returns whether the step ran (a plugin may
        skip it). Use it in manual optimisation; with several optimizers and a
        GradScaler, pass ``update_scaler=False`` to all but the last one of an iteration
        (the scale is updated once per iteration)."""
        opt = optimizer if optimizer is not None else self.optimizers[0]
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(opt)
        if self.grad_clip_norm is not None or self.grad_clip_value is not None:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if self.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, self.grad_clip_value)
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        h = self.hooks.on_before_optimizer_step
        if h is not None:
            h(self, opt)
        stepped = not self._skip_step
        if stepped:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None and update_scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        self._stepped_manual |= stepped
        return stepped

    # ------------------------------------------------------------------ steps

    def _default_step(self, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                "the default step expects batches (input, target, ...); got "
                f"{type(batch).__name__}; pass step_fn for other batch layouts"
            )
        return self.loss_fn(self.model(batch[0]), batch[1])  # type: ignore[misc]

    def _train_step(self, batch: Any, batch_idx: int) -> Any:
        """Run one batch; returns the outputs that ``on_train_batch_end`` receives."""
        state = self.state
        if self.manual_optimization:
            self._stepped_manual = False
            with self._autocast():
                outputs = self.step_fn(self, batch)  # type: ignore[misc]
            stepped = self._stepped_manual
            self._skip_step = False
        else:
            accum = self.grad_accum
            boundary = accum == 1 or (batch_idx + 1) % accum == 0 or batch_idx + 1 == self._epoch_len
            if self._autocast_dtype is None and (boundary or not self._dist.active):
                result = self._forward_backward(batch)  # fast path: no context managers
            else:
                sync_ctx = (
                    self.model.no_sync()  # type: ignore[operator]
                    if not boundary and self._dist.active
                    else contextlib.nullcontext()
                )
                with sync_ctx:
                    result = self._forward_backward(batch)
            if result is None:
                state.stepped = False
                self._skip_step = False
                return None
            self._accumulated += 1
            stepped = False
            if boundary:
                stepped = self._step_optimizers()
            if isinstance(result, torch.Tensor):
                loss = result.detach()
                outputs = {"loss": loss}
                if self.step_fn is None:
                    self._record("train/loss", loss)
            else:
                outputs = result
        state.stepped = stepped
        if stepped:
            state.global_step += 1
            if self.scheduler_interval == "step":
                for sched in self.schedulers:
                    sched.step()
            if state.global_step % self.log_every_n_steps == 0:
                self._flush_due = True
        return outputs

    def _forward_backward(self, batch: Any) -> Any:
        """The step function under autocast, then backward; ``None`` skips the batch."""
        if self._autocast_dtype is None:
            result = self._default_step(batch) if self.step_fn is None else self.step_fn(self, batch)
        else:
            with self._autocast():
                result = self._default_step(batch) if self.step_fn is None else self.step_fn(self, batch)
        if result is None:
            return None
        loss = result["loss"] if isinstance(result, Mapping) else result
        self.backward(_checked_loss(loss))
        return result

    def _step_optimizers(self) -> bool:
        stepped = False
        last = len(self.optimizers) - 1
        for i, opt in enumerate(self.optimizers):
            stepped |= self.optimizer_step(opt, update_scaler=i == last)
        self._skip_step = False
        self._accumulated = 0
        return stepped

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
        :meth:`state_dict` (usually loaded by the checkpoint plugin) to continue from;
        counters continue, so ``max_epochs`` counts from the start of the run.

        Returns the final :class:`LoopState`. Exceptions propagate after
        ``on_exception`` fired.
        """
        if (max_epochs is None) == (max_steps is None):
            raise ValueError(
                f"give exactly one of max_epochs or max_steps; got max_epochs={max_epochs!r}, "
                f"max_steps={max_steps!r}"
            )
        _positive_int("max_epochs", max_epochs, allow_none=True)
        _positive_int("max_steps", max_steps, allow_none=True)
        if self.train_data is None:
            raise ValueError("Loop.fit needs train_data")
        if not self.optimizers and not self.manual_optimization:
            raise ValueError("Loop.fit needs an optimizer (or manual_optimization=True)")
        state = self.state
        state.max_epochs, state.max_steps = max_epochs, max_steps
        state.should_stop, state.stop_reason = False, None
        self.pm.reset_run_state()
        try:
            if resume is not None:
                self.load_state_dict(resume)
            h = self.hooks.on_fit_start
            if h is not None:
                h(self)
            self._run_epochs()
            state.stage = "idle"
            h = self.hooks.on_fit_end
            if h is not None:
                h(self)
        except BaseException as exc:
            self._fire_exception(exc)
            raise
        finally:
            state.stage = "idle"
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
            self._train_epoch()
            metrics = self._flush_epoch()  # under DDP this also agrees on should_stop
            last = (state.max_epochs is not None and state.epoch + 1 >= state.max_epochs) or (
                state.max_steps is not None and state.global_step >= state.max_steps
            ) or state.should_stop
            validated = self.val_data is not None and (
                (state.epoch + 1) % self.val_every_n_epochs == 0 or last
            )
            if validated:
                metrics.update(self._run_validation())
            if self.scheduler_interval == "epoch":
                self._step_epoch_schedulers(metrics, validated)
            state.epoch_done = True
            state.stage = "train"
            h = self.hooks.on_train_epoch_end
            if h is not None:
                h(self, state.epoch, dict(metrics))
            if self._dist.active:
                self._agree_stop(dist.all_reduce_sum(
                    torch.tensor([float(state.should_stop)], device=self.device)).item())
            if state.should_stop:
                return

    def _step_epoch_schedulers(self, metrics: Mapping[str, float], validated: bool) -> None:
        for sched in self.schedulers:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                key = self.scheduler_monitor
                if key is not None and key not in metrics and key.startswith("val/") and not validated:
                    continue  # no validation this epoch: nothing to compare
                if key is None or key not in metrics:
                    raise ValueError(
                        f"ReduceLROnPlateau needs scheduler_monitor naming an epoch metric; "
                        f"got {key!r}; available: {sorted(metrics)}"
                    )
                sched.step(metrics[key])
            else:
                sched.step()

    def _train_epoch(self) -> None:
        state = self.state
        state.stage = "train"
        self.model.train()
        self._stop_epoch = False
        self._stop_agreed = False
        self._flush_due = False
        distributed = self._dist.active
        data = self.train_data
        dist.set_epoch(data, state.epoch)
        try:
            self._epoch_len = len(data)  # type: ignore[arg-type]
        except TypeError:
            self._epoch_len = -1
        skip = state.epoch_batches_done
        h = self.hooks.on_train_epoch_start
        if h is not None:
            h(self, state.epoch)
        if skip and self._rng_epoch_start is not None:
            # resume mid-epoch: replay the epoch's shuffle, then continue with the
            # RNG state of the moment the checkpoint was taken
            _set_rng(self._rng_epoch_start)
            _set_loader_state(data, self._loader_state)
        self._rng_epoch_start = _get_rng()
        self._loader_state = _get_loader_state(data)
        it = iter(data)
        if skip:
            for _ in range(skip):
                next(it)
            if self._resume_rng is not None:
                _set_rng(self._resume_rng)
        self._resume_rng = None
        if self._resume_flush:
            self._resume_flush = False
            self._flush_interval()
        hooks = self.hooks
        device = self.device
        move = device.type != "cpu"
        batch_idx = skip
        train_step = self._train_step
        for batch in it:
            if move:
                batch = _to_device(batch, device)
            state.batch_idx = batch_idx
            h = hooks.on_train_batch_start
            if h is not None:
                h(self, batch, batch_idx)
                if self._stop_agreed if distributed else (self._stop_epoch or state.should_stop):
                    break
            outputs = train_step(batch, batch_idx)
            state.outputs = outputs
            batch_idx += 1
            state.epoch_batches_done = batch_idx
            h = hooks.on_train_batch_end
            if h is not None:
                h(self, outputs, batch, batch_idx - 1)
            if self._flush_due:
                self._flush_due = False
                self._flush_interval()
            if self._stop_agreed if distributed else (state.should_stop or self._stop_epoch):
                break
            if state.max_steps is not None and state.global_step >= state.max_steps:
                break
        state.outputs = None
        if self._accumulated and not self.manual_optimization:
            # an accumulation window the epoch did not finish (a data source without
            # len, or a stop mid-window): its gradients must not leak into the next
            # epoch or be missing from a checkpoint, so they are dropped
            if not self._warned_partial:
                self._warned_partial = True
                log.warning("hookloop: %d micro-batch(es) of an unfinished accumulation window "
                            "dropped at the end of epoch %d", self._accumulated, state.epoch)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self._accumulated = 0

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
        hooks = self.hooks
        state.stage = "validate"
        self.model.eval()
        self._val_pending = {}
        try:
            with torch.no_grad():
                h = hooks.on_validation_start
                if h is not None:
                    h(self)
                for batch_idx, batch in enumerate(data):
                    batch = _to_device(batch, self.device)
                    with self._autocast():
                        if self.val_step_fn is not None:
                            outputs = self.val_step_fn(self, batch)
                        else:
                            outputs = self._default_val_step(batch)
                    h = hooks.on_validation_batch_end
                    if h is not None:
                        h(self, outputs, batch, batch_idx)
            pending = self._val_pending
            sums = {name: self._sum_count(values) for name, values in pending.items()}
            metrics = self._reduce(sums) if (sums or self._dist.active) else {}
            state.metrics.update(metrics)
            h = hooks.on_validation_end
            if h is not None:
                h(self, dict(metrics))
            h = hooks.on_log
            if h is not None and metrics:
                h(self, dict(metrics), state.global_step)
        finally:  # also when a step or hook raises and the caller goes on
            self._val_pending = {}
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

    # ------------------------------------------------------------------ exceptions

    def _fire_exception(self, exc: BaseException) -> None:
        for entry in self.pm.plan_entries("on_exception"):
            impl = entry.impl
            kwargs = {"loop": self, "exception": exc}
            try:
                result = impl.function(*(kwargs[a] for a in impl.argnames))
                if impl.wrapper or impl.hookwrapper:  # drive a wrapper through its teardown
                    next(result)
                    try:
                        result.send(None)
                    except StopIteration:
                        pass
            except KeyboardInterrupt:
                raise
            except BaseException as inner:  # never replace the original exception
                log.error("hookloop: plugin %r failed in on_exception: %r", impl.plugin_name, inner)

    def _report_failures(self) -> None:
        lines = self.pm.failure_summary()
        if lines:
            log.warning("hookloop: plugin failures during fit:\n  %s", "\n  ".join(lines))
        self.plugin_failures = lines

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly; loadable with
        ``torch.load(weights_only=True)``. Under DDP every rank must call it (RNG
        states of all ranks are gathered, so rank 0 can write them all).

        Keys: ``format``, ``model``, ``optimizers``, ``schedulers``, ``scaler``,
        ``loop`` (counters), ``metrics_pending``, ``rng`` (one entry per rank, each
        with ``now``, ``epoch_start`` and ``loader``; under DDP also that rank's own
        ``metrics_pending``), ``plugins`` (each plugin's own
        ``state_dict()`` under its registered name), ``hparams``; plugins may add keys
        in ``on_save_checkpoint``.
        """
        pending: dict[str, Any] = {}
        for name, values in self._pending.items():
            total, count = self._sum_count(values)
            pending[name] = [_to_plain(total), count]
        epoch_acc = {name: [_to_plain(acc[0]), acc[1]] for name, acc in self._epoch_acc.items()}
        rng = {
            "now": _get_rng(),
            "epoch_start": self._rng_epoch_start,
            "loader": self._loader_state,
            "loader_now": _get_loader_state(self.train_data),
        }
        if self._dist.active:  # each rank's metrics not yet reduced are its own
            rng["metrics_pending"] = {"interval": pending, "epoch": epoch_acc}
        ranks = dist.all_gather_object(rng) if self._dist.active else [rng]
        checkpoint: dict[str, Any] = {
            "format": STATE_FORMAT,
            "model": self.module.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loop": self.state.counters(),
            "metrics_pending": {"interval": pending, "epoch": epoch_acc,
                                "flush_due": self._flush_due},
            "rng": ranks,
            "plugins": {},
            "hparams": _plain_hparams(mask_secrets(self.hparams)),  # checkpoints get uploaded
        }
        for name, plugin in self.pm.plugin_items():
            getter = getattr(plugin, "state_dict", None)
            if callable(getter) and not isinstance(plugin, type):
                checkpoint["plugins"][name] = getter()
        h = self.hooks.on_save_checkpoint
        if h is not None:
            h(self, checkpoint)
        return checkpoint

    def load_state_dict(self, checkpoint: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict` output. Order: model, plugins (so that e.g. a
        freezing plugin rebuilds param groups; a plugin's ``load_state_dict`` that takes a
        ``loop`` keyword receives this loop), optimizers, schedulers, scaler,
        counters, pending metrics, RNG; then ``on_load_checkpoint`` fires."""
        fmt = checkpoint.get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(f"not a hookloop loop state (format={fmt!r}; expected {STATE_FORMAT!r})")
        self.module.load_state_dict(checkpoint["model"], strict=strict)
        plugin_states = checkpoint.get("plugins", {})
        for name, plugin in self.pm.plugin_items():
            loader = getattr(plugin, "load_state_dict", None)
            if name in plugin_states and callable(loader):
                if "loop" in inspect.signature(loader).parameters:
                    loader(plugin_states[name], loop=self)  # e.g. to rebuild param groups
                else:
                    loader(plugin_states[name])
        missing = [n for n in plugin_states if self.pm.get_plugin(n) is None]
        if missing:
            log.warning("hookloop: checkpoint holds state of plugins not registered now: %s", missing)
        opts = checkpoint["optimizers"]
        if len(opts) != len(self.optimizers):
            raise ValueError(f"checkpoint has {len(opts)} optimizer states; loop has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, opts, strict=True):
            opt.load_state_dict(sd)
        scheds = checkpoint.get("schedulers", [])
        if len(scheds) != len(self.schedulers):
            raise ValueError(
                f"checkpoint has {len(scheds)} scheduler states; loop has {len(self.schedulers)}"
            )
        for sched, sd in zip(self.schedulers, scheds, strict=True):
            sched.load_state_dict(sd)
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state.load_counters(checkpoint["loop"])
        ranks = checkpoint.get("rng") or []
        mine = ranks[self.state.rank] if self.state.rank < len(ranks) else (ranks[0] if ranks else None)
        pending = (mine or {}).get("metrics_pending") or checkpoint.get("metrics_pending", {})
        # an interval's values come back as its exact sum plus zeros, `count` in all
        self._pending = {n: [_from_plain(v[0], self.device), *[0.0] * (int(v[1]) - 1)]
                         for n, v in pending.get("interval", {}).items() if v[1]}
        self._epoch_acc = {n: [_from_plain(v[0], self.device), int(v[1])]
                           for n, v in pending.get("epoch", {}).items()}
        # saved in on_train_batch_end of a logging step: that step's flush is still due
        self._resume_flush = bool(pending.get("flush_due", False))
        if mine is not None:
            _set_rng(mine["now"])
            # the loader's own generators: the next epoch's shuffle continues from here
            _set_loader_state(self.train_data, mine.get("loader_now") or {})
            self._rng_epoch_start = mine.get("epoch_start")
            self._loader_state = mine.get("loader") or {}
            mid_epoch = self.state.epoch_batches_done and not self.state.epoch_done
            self._resume_rng = mine["now"] if mid_epoch else None
        h = self.hooks.on_load_checkpoint
        if h is not None:
            h(self, checkpoint)


# ---------------------------------------------------------------------- helpers


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"the training step must produce a scalar loss tensor; got {shape!r}. "
            "Reduce the loss (e.g. reduction='mean') or return a dict with 'loss'"
        )
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _to_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return float(value)


def _from_plain(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return float(value)


def _plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
        else:
            out[str(k)] = repr(v)
    return out


def _get_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos),
                          int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _generators(data: Any) -> dict[str, torch.Generator]:
    gens = {}
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["loader"] = gen
    sampler = getattr(data, "sampler", None)
    gen = getattr(sampler, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["sampler"] = gen
    batch_sampler = getattr(data, "batch_sampler", None)
    gen = getattr(getattr(batch_sampler, "sampler", None), "generator", None)
    if isinstance(gen, torch.Generator):
        gens.setdefault("sampler", gen)
    return gens


def _get_loader_state(data: Any) -> dict[str, Any]:
    return {name: gen.get_state() for name, gen in _generators(data).items()}


def _set_loader_state(data: Any, states: Mapping[str, Any]) -> None:
    for name, gen in _generators(data).items():
        if name in states:
            gen.set_state(states[name])

