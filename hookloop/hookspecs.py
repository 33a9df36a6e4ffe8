"""The hook contract of hookloop: every hook the loop fires, in firing order.

Every hook is called with keyword arguments only; an implementation may accept any
subset of them (pluggy semantics), so specs grow by adding arguments. None of the hooks
is ``firstresult``; return values are ignored unless a hook says otherwise.

The exact firing order of a fit with validation is published in ``docs/hooks.md`` and
tested against a recorded run. Per step (default step function)::

    on_train_batch_start -> on_before_backward -> on_after_backward
      -> on_before_optimizer_step (only when the optimizer steps)
      -> on_train_batch_end -> on_log (only at the log interval)

Per epoch::

    on_train_epoch_start -> (steps) -> on_log (train epoch means)
      -> on_validation_start -> on_validation_batch_end* -> on_validation_end -> on_log
      -> on_train_epoch_end
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluggy import HookspecMarker

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from hookloop.loop import Loop

_hookspec = HookspecMarker("hookloop")

__all__ = [
    "on_after_backward",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_checkpoint_saved",
    "on_exception",
    "on_fit_end",
    "on_fit_start",
    "on_load_checkpoint",
    "on_log",
    "on_log_image",
    "on_log_text",
    "on_save_checkpoint",
    "on_train_batch_end",
    "on_train_batch_start",
    "on_train_epoch_end",
    "on_train_epoch_start",
    "on_validation_batch_end",
    "on_validation_end",
    "on_validation_start",
]

# ---------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------


@_hookspec
def on_fit_start(loop: Loop) -> None:
    """Fires once at the start of ``Loop.fit``, after a resume checkpoint (if any) was
    loaded and before the first epoch starts.

    :param loop: the running loop; ``loop.state`` holds the counters.
    Return value ignored.
    """


@_hookspec
def on_fit_end(loop: Loop) -> None:
    """Fires once when ``fit`` finishes normally (max epochs/steps reached or a stop was
    requested; ``loop.state.stop_reason`` says which). Not fired when fit raises; then
    ``on_exception`` fires instead. Plugins flush and close their resources here.

    :param loop: the running loop.
    Return value ignored.
    """


# ---------------------------------------------------------------------------
# Training epoch
# ---------------------------------------------------------------------------


@_hookspec
def on_train_epoch_start(loop: Loop, epoch: int) -> None:
    """Fires at the start of each training epoch, before its first batch is fetched.
    The model is in train mode. Distributed samplers already had ``set_epoch`` called.

    :param loop: the running loop.
    :param epoch: zero-based index of the epoch starting.
    Return value ignored.
    """


@_hookspec
def on_train_epoch_end(loop: Loop, epoch: int, metrics: Mapping[str, float]) -> None:
    """Fires at the end of each training epoch, **after** that epoch's validation (if
    validation runs this epoch), as in Lightning. Checkpointing and early stopping act
    here.

    :param loop: the running loop.
    :param epoch: zero-based index of the epoch ending.
    :param metrics: plain floats: the epoch means of the train metrics (names suffixed
        ``_epoch``, e.g. ``train/loss_epoch``) and the validation metrics of this epoch.
        Same values as ``loop.state.metrics``.
    Return value ignored.
    """


# ---------------------------------------------------------------------------
# Training batch
# ---------------------------------------------------------------------------


@_hookspec
def on_train_batch_start(loop: Loop, batch: Any, batch_idx: int) -> None:
    """Fires before the step function runs on a batch, after the batch was moved to the
    loop's device.

    :param loop: the running loop.
    :param batch: the batch on the device.
    :param batch_idx: zero-based index of the batch within the epoch.
    Return value ignored. Call ``loop.stop_epoch()`` to end the epoch before this batch.
    """


@_hookspec
def on_before_backward(loop: Loop, loss: torch.Tensor) -> None:
    """Fires just before ``loss.backward()`` (inside ``loop.backward``), with the loss
    already divided by the gradient accumulation factor.

    :param loop: the running loop.
    :param loss: the loss tensor about to be back-propagated. Do not call ``.item()``
        here on steps that do not log: it synchronises the device.
    Return value ignored.
    """


@_hookspec
def on_after_backward(loop: Loop) -> None:
    """Fires right after ``backward``; gradients are populated (scaled, when a
    GradScaler is active). Return value ignored.

    :param loop: the running loop.
    """


@_hookspec
def on_before_optimizer_step(loop: Loop, optimizer: torch.optim.Optimizer) -> None:
    """Fires before each optimizer step, after gradients were unscaled and clipped.
    Does not fire on accumulation micro-batches. Call ``loop.skip_optimizer_step()`` to
    skip this step (gradients are then zeroed).

    :param loop: the running loop.
    :param optimizer: the optimizer about to step.
    Return value ignored.
    """


@_hookspec
def on_train_batch_end(loop: Loop, outputs: Any, batch: Any, batch_idx: int) -> None:
    """Fires after the step function returned and the optimizer stepped (if it did);
    ``loop.state.global_step`` already counts this step when it was an optimizer step.

    :param loop: the running loop.
    :param outputs: what the step function returned (default step: a dict with
        ``loss``, a detached device tensor, possibly NaN or infinite; never synced).
    :param batch: the batch on the device.
    :param batch_idx: zero-based index of the batch within the epoch.
    Return value ignored. Call ``loop.request_stop(reason)`` to stop training.
    """


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@_hookspec
def on_validation_start(loop: Loop) -> None:
    """Fires before the validation loop; the model is in eval mode and grads are off.

    :param loop: the running loop.
    Return value ignored.
    """


@_hookspec
def on_validation_batch_end(loop: Loop, outputs: Any, batch: Any, batch_idx: int) -> None:
    """Fires after each validation batch.

    :param loop: the running loop.
    :param outputs: what the validation step returned (default: dict with ``loss``).
    :param batch: the batch on the device.
    :param batch_idx: zero-based index of the batch within this validation run.
    Return value ignored.
    """


@_hookspec
def on_validation_end(loop: Loop, metrics: Mapping[str, float]) -> None:
    """Fires after the validation loop, once the validation metrics were reduced (one
    host-device sync). The model is switched back to train mode after this hook.

    :param loop: the running loop.
    :param metrics: plain floats, e.g. ``{"val/loss": 0.31, "val/acc": 0.9}``.
    Return value ignored.
    """


# ---------------------------------------------------------------------------
# Logging (what trackers implement)
# ---------------------------------------------------------------------------


@_hookspec
def on_log(loop: Loop, metrics: Mapping[str, float], step: int) -> None:
    """Fires with reduced metrics as plain Python floats: every ``log_every_n_steps``
    optimizer steps (interval means of the values logged since the last flush), at the
    end of each train epoch (epoch means, names suffixed ``_epoch``) and at the end of
    validation. Under DDP the values are already averaged across ranks.

    :param loop: the running loop.
    :param metrics: name to float; the dict is not reused, plugins may keep it.
    :param step: the global step the values belong to (monotonic across resume).
    Return value ignored.
    """


@_hookspec
def on_log_text(loop: Loop, name: str, text: str, step: int) -> None:
    """Fires when something calls ``loop.log_text`` (e.g. the model summary).

    :param loop: the running loop.
    :param name: a tag such as ``"model/summary"``.
    :param text: the text (Markdown or preformatted).
    :param step: the global step.
    Return value ignored.
    """


@_hookspec
def on_log_image(loop: Loop, name: str, image: Any, step: int) -> None:
    """Fires when something calls ``loop.log_image``.

    :param loop: the running loop.
    :param name: a tag.
    :param image: a CPU tensor ``(C, H, W)`` with values in [0, 1], or a matplotlib
        figure.
    :param step: the global step.
    Return value ignored.
    """


# ---------------------------------------------------------------------------
# Checkpoint state protocol
# ---------------------------------------------------------------------------


@_hookspec
def on_save_checkpoint(loop: Loop, checkpoint: dict[str, Any]) -> None:
    """Fires inside ``loop.state_dict()`` after the core state and every plugin's own
    ``state_dict()`` were collected. A plugin may add extra top-level entries; values
    must be loadable with ``torch.load(weights_only=True)`` (tensors, numbers, strings,
    lists, dicts).

    :param loop: the loop.
    :param checkpoint: the dict being built; mutate in place.
    Return value ignored.
    """


@_hookspec
def on_load_checkpoint(loop: Loop, checkpoint: Mapping[str, Any]) -> None:
    """Fires at the end of ``loop.load_state_dict()`` after model, plugin states,
    optimizers, scheduler, scaler, counters and RNG states were restored.

    :param loop: the loop.
    :param checkpoint: the dict that was loaded.
    Return value ignored.
    """


@_hookspec
def on_checkpoint_saved(
    loop: Loop, path: str, metrics: Mapping[str, float], is_best: bool
) -> None:
    """Fires after a checkpoint file is durably on disk (announced by the checkpoint
    plugin; trackers upload it as an artifact when ``is_best``).

    :param loop: the loop.
    :param path: path of the checkpoint file or folder written.
    :param metrics: the metrics at save time.
    :param is_best: whether it is the best so far by the monitored metric.
    Return value ignored.
    """


# ---------------------------------------------------------------------------
# Failure
# ---------------------------------------------------------------------------


@_hookspec
def on_exception(loop: Loop, exception: BaseException) -> None:
    """Fires when ``fit`` is about to propagate an exception (including
    KeyboardInterrupt), before it propagates. Trackers mark their run failed and flush.
    Exceptions raised by implementations are reported and do not replace the original.

    :param loop: the loop.
    :param exception: the exception in flight.
    Return value ignored.
    """
