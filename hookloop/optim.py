"""Optimisation and precision: backward, gradient accumulation, clipping, optimizer and
scheduler steps, autocast and the GradScaler of one loop (``loop.optim``).

The loop's public methods ``backward``, ``optimizer_step`` and
``skip_optimizer_step`` forward here; manual-optimisation step functions call those.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hookloop._distributed import drop_unsynced_grads

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = ["PRECISIONS", "Optimization"]

log = logging.getLogger("hookloop")

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class Optimization:
    """The optimizers, schedulers, precision and accumulation state of one loop."""

    def __init__(
        self,
        loop: Loop,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list[Any],
        *,
        precision: str,
        grad_accum: int,
        grad_clip_norm: float | None,
        grad_clip_value: float | None,
        scheduler_interval: str,
        scheduler_monitor: str | None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
        if precision == "16-mixed" and loop.device.type != "cuda":
            raise ValueError("precision='16-mixed' needs a CUDA device; use 'bf16-mixed' on CPU")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}; expected 'epoch' or 'step'")
        self._loop = loop
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.precision = precision
        self.autocast_dtype = _AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
        self.grad_accum = grad_accum
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.skip = False  # skip_optimizer_step() was called for the current batch
        self.accumulated = 0  # micro-batches back-propagated since the last step
        self.stepped_manual = False
        self._warned_partial = False

    def check(self, module: torch.nn.Module) -> None:
        """Every optimizer is an Optimizer holding some of ``module``'s parameters."""
        params = {id(p) for p in module.parameters()}
        for i, opt in enumerate(self.optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer[{i}] must be a torch.optim.Optimizer; got {opt!r}")
            held = [p for g in opt.param_groups for p in g["params"]]
            if not any(id(p) in params for p in held):
                raise ValueError(
                    f"optimizer[{i}] ({type(opt).__name__}) holds none of the model's "
                    f"parameters ({len(held)} foreign tensors); build it from model.parameters()"
                    " (for a model sharded with fully_shard: after fully_shard, which replaces "
                    "the parameters)"
                )

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the loop's precision (a null context for ``"32"``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._loop.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """See :meth:`hookloop.Loop.backward`."""
        loop = self._loop
        if self.grad_accum > 1:
            loss = loss / self.grad_accum
        h = loop.callers.on_before_backward
        if h is not None:
            h(loop, loss)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        h = loop.callers.on_after_backward
        if h is not None:
            h(loop)

    def optimizer_step(self, opt: torch.optim.Optimizer, update_scaler: bool = True) -> bool:
        """See :meth:`hookloop.Loop.optimizer_step`."""
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(opt)
        if self.grad_clip_norm is not None or self.grad_clip_value is not None:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if self.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, self.grad_clip_value)
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        h = self._loop.callers.on_before_optimizer_step
        if h is not None:
            h(self._loop, opt)
        stepped = not self.skip
        if stepped:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None and update_scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        self.stepped_manual |= stepped
        return stepped

    def step_all(self) -> bool:
        """Step every optimizer at the end of an accumulation window."""
        stepped = False
        last = len(self.optimizers) - 1
        for i, opt in enumerate(self.optimizers):
            stepped |= self.optimizer_step(opt, update_scaler=i == last)
        self.skip = False
        self.accumulated = 0
        return stepped

    def step_schedulers_per_step(self) -> None:
        """Step the schedulers after an optimizer step (``scheduler_interval="step"``)."""
        for sched in self.schedulers:
            sched.step()

    def step_schedulers_per_epoch(self, metrics: Mapping[str, float], validated: bool) -> None:
        """Step the schedulers at an epoch's end; ``ReduceLROnPlateau`` gets
        ``scheduler_monitor`` from the epoch's metrics."""
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

    def drop_partial_window(self, epoch: int) -> None:
        """Drop the gradients of an accumulation window the epoch did not finish (a data
        source without ``len``, or a stop mid-window), so that they neither leak into
        the next epoch nor go missing from a checkpoint."""
        if not self._warned_partial:
            self._warned_partial = True
            log.warning("hookloop: %d micro-batch(es) of an unfinished accumulation window "
                        "dropped at the end of epoch %d", self.accumulated, epoch)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self._loop.sharded:  # FSDP2 keeps unsynchronised gradients out of the optimizer's reach
            drop_unsynced_grads(self._loop.module)
        self.accumulated = 0

    # ------------------------------------------------------------------ checkpoint

    def describe(self) -> dict[str, Any]:
        """The layout a checkpoint must match: optimizer and scheduler classes and the
        parameter count of every param group."""
        return {
            "optimizers": [{"class": type(o).__name__,
                            "groups": [len(g["params"]) for g in o.param_groups]}
                           for o in self.optimizers],
            "schedulers": [type(s).__name__ for s in self.schedulers],
        }


def as_list(value: Any) -> list[Any]:
    """``None`` to ``[]``, a list or tuple to a list, anything else to ``[value]``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return list(value)
    return [value]
