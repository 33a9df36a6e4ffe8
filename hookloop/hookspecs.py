"""The hook contract of hookloop: every hook the loop fires, in firing order.

Every hook is called with keyword arguments only; an implementation may accept any
subset of them (pluggy semantics), so specs grow by adding arguments (see the
compatibility policy in ``docs/plugins.md``). Only ``on_resume`` is ``firstresult``;
return values of the other hooks are ignored.

Two hooks have a second, documented name (aliases, as Keras names its callbacks):
``on_batch_end`` is ``on_train_batch_end`` and ``on_epoch_end`` is
``on_train_epoch_end``. A method named after an alias implements the canonical hook;
recorders and the call plan show the canonical name; implementing both names of one
hook in one plugin is an error.

The exact firing order of a fit with validation is published in ``docs/hooks.md`` and
tested against a recorded run. Per fit::

    on_resume (only when fit was given no checkpoint) -> [restore] -> on_fit_start
      -> epochs -> on_fit_end (or on_exception) ... on_close (from Loop.close)

Per step (default step function)::

    on_train_batch_start -> on_before_backward -> on_after_backward
      -> on_before_optimizer_step (only when the optimizer steps)
      -> [log step: the interval is reduced] -> on_train_batch_end
      -> on_log (only at the log interval)

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

ALIASES: dict[str, str] = {
    "on_batch_end": "on_train_batch_end",
    "on_epoch_end": "on_train_epoch_end",
}
"""Second names of hooks: alias to canonical hook name (since 0.2)."""

__all__ = [
    "ALIASES",
    "on_after_backward",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_checkpoint_removed",
    "on_checkpoint_saved",
    "on_close",
    "on_exception",
    "on_fit_end",
    "on_fit_start",
    "on_load_checkpoint",
    "on_log",
    "on_log_graph",
    "on_log_histogram",
    "on_log_image",
    "on_log_mesh",
    "on_log_text",
    "on_resume",
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


@_hookspec(firstresult=True)
def on_resume(loop: Loop) -> Mapping[str, Any] | None:
    """Fires at the start of ``Loop.fit`` when ``fit`` was given no ``resume``, before
    anything else of the fit; the only ``firstresult`` hook (since 0.2).

    A plugin that can resume the run (the checkpoint plugin with ``resume=``) returns
    the checkpoint to resume from: a dict made by ``loop.state_dict()`` (loaded on the
    CPU or on ``loop.device``). The first non-``None`` result wins. The loop then
    validates the whole checkpoint and restores it (model, optimizers, schedulers,
    scaler, counters, RNG, every plugin's state) before any ``on_fit_start``, so every
    plugin starts from restored state, whatever its position or ``tryfirst``.

    :param loop: the loop about to fit.
    :return: a checkpoint dict, or ``None`` to start (or continue) without a resume.
    """


@_hookspec
def on_fit_start(loop: Loop) -> None:
    """Fires once at the start of ``Loop.fit``, after a resume checkpoint (if any, from
    ``fit(resume=...)`` or from ``on_resume``) was restored and before the first epoch
    starts.

    :param loop: the running loop; ``loop.state`` holds the counters.
    Return value ignored.
    """


@_hookspec
def on_fit_end(loop: Loop) -> None:
    """Fires once when ``fit`` finishes normally (max epochs/steps reached or a stop was
    requested; ``loop.state.stop_reason`` says which). Not fired when fit raises; then
    ``on_exception`` fires instead. Plugins flush and close what belongs to this fit
    here (a tracker run); what lives as long as the loop is released in ``on_close``.

    :param loop: the running loop.
    Return value ignored.
    """


@_hookspec
def on_close(loop: Loop) -> None:
    """Fires once from ``Loop.close()`` (the end of a ``with Loop(...)`` block, a fit
    that raised, or interpreter exit), after the last fit (since 0.2). Plugins release
    everything they hold: worker threads or processes, signal handlers, staging
    buffers, open files. Every implementation is called even when one raises; failures
    are logged. After it the loop cannot fit again.

    :param loop: the loop being closed.
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

    Alias: ``on_epoch_end``.

    :param loop: the running loop.
    :param epoch: zero-based index of the epoch ending.
    :param metrics: plain floats: the epoch means of the train metrics (names suffixed
        ``_epoch``, e.g. ``train/loss_epoch``) and the validation metrics of this epoch
        when validation ran this epoch. ``loop.state.metrics`` holds these and older
        values; ``loop.state.metric_stamps`` says which step each belongs to.
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
    skip this step (gradients are then zeroed, ``global_step`` does not advance, and the
    default step does not log this batch's ``train/loss``).

    :param loop: the running loop.
    :param optimizer: the optimizer about to step.
    Return value ignored.
    """


@_hookspec
def on_train_batch_end(loop: Loop, outputs: Any, batch: Any, batch_idx: int) -> None:
    """Fires after the step function returned and the optimizer stepped (if it did);
    ``loop.state.global_step`` already counts this step when it was an optimizer step.
    Alias: ``on_batch_end``.

    On a log step (``global_step % log_every_n_steps == 0``) the interval that ends with
    this step was already reduced: ``loop.state.metrics`` holds its means, stamped with
    this step in ``loop.state.metric_stamps``. Values logged inside this hook on a log
    step are reduced right after it and reach the same ``on_log`` call.

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
def on_log(loop: Loop, metrics: Mapping[str, float], step: int, time: float) -> None:
    """Fires with reduced metrics as plain Python floats: every ``log_every_n_steps``
    optimizer steps (interval means of the values logged since the last flush), at the
    end of each train epoch (epoch means, names suffixed ``_epoch``) and at the end of
    validation. Under DDP the values are already averaged across ranks. Means are
    computed in float64: Python floats, float64 and integer tensors keep their value.

    :param loop: the running loop.
    :param metrics: name to float; the dict is not reused, plugins may keep it.
    :param step: the global step the values belong to (monotonic across resume).
    :param time: wall-clock time (``time.time()``, seconds) on the training thread when
        the values were reduced: the interval's last step, the epoch's end, the
        validation's end (since 0.2).
    Return value ignored.
    """


@_hookspec
def on_log_text(loop: Loop, name: str, text: str, step: int, time: float) -> None:
    """Fires when something calls ``loop.log_text`` (e.g. the model summary).

    :param loop: the loop (the call may come before ``fit``).
    :param name: a tag such as ``"model/summary"``.
    :param text: the text (Markdown or preformatted).
    :param step: the global step.
    :param time: wall-clock time of the ``log_text`` call (since 0.2).
    Return value ignored.
    """


@_hookspec
def on_log_image(loop: Loop, name: str, image: Any, step: int, time: float) -> None:
    """Fires when something calls ``loop.log_image``.

    :param loop: the loop.
    :param name: a tag.
    :param image: a CPU tensor ``(C, H, W)`` with values in [0, 1], or a matplotlib
        figure.
    :param step: the global step.
    :param time: wall-clock time of the ``log_image`` call (since 0.2).
    Return value ignored.
    """


@_hookspec
def on_log_histogram(loop: Loop, name: str, values: torch.Tensor, step: int, time: float) -> None:
    """Fires when something calls ``loop.log_histogram`` (since 0.2), e.g. weights or
    gradients (TensorBoard's histograms and distributions, W&B histograms).

    :param loop: the loop.
    :param name: a tag such as ``"weights/fc1.weight"``.
    :param values: a flat float CPU tensor (a detached copy; plugins may keep it).
    :param step: the global step.
    :param time: wall-clock time of the call.
    Return value ignored.
    """


@_hookspec
def on_log_graph(loop: Loop, model: torch.nn.Module, example_input: Any) -> None:
    """Fires when something calls ``loop.log_graph`` (since 0.2), usually once at fit
    start: trackers that show a model graph trace it here, on the training thread.

    :param loop: the loop.
    :param model: the model to trace (the inner model, not a DDP wrapper).
    :param example_input: an input the model accepts, on the model's device.
    Return value ignored.
    """


@_hookspec
def on_log_mesh(
    loop: Loop, name: str, vertices: torch.Tensor, faces: torch.Tensor | None,
    colors: torch.Tensor | None, step: int, time: float,
) -> None:
    """Fires when something calls ``loop.log_mesh`` (since 0.2): a 3-D point cloud or
    mesh, as TensorBoard's ``add_mesh`` takes it.

    :param loop: the loop.
    :param name: a tag.
    :param vertices: CPU tensor ``(B, N, 3)``.
    :param faces: CPU int tensor ``(B, F, 3)`` or ``None`` (a point cloud).
    :param colors: CPU uint8 tensor ``(B, N, 3)`` or ``None``.
    :param step: the global step.
    :param time: wall-clock time of the call.
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


@_hookspec
def on_checkpoint_removed(loop: Loop, path: str) -> None:
    """Fires after a checkpoint announced by ``on_checkpoint_saved`` was deleted (best-k
    rotation), announced by the checkpoint plugin (since 0.2). Trackers that uploaded
    it delete the artifact where their backend allows, or move an alias.

    :param loop: the loop.
    :param path: the path that ``on_checkpoint_saved`` announced.
    Return value ignored.
    """


# ---------------------------------------------------------------------------
# Failure
# ---------------------------------------------------------------------------


@_hookspec
def on_exception(loop: Loop, exception: BaseException) -> None:
    """Fires when ``fit`` is about to propagate an exception (including
    KeyboardInterrupt), before it propagates. Trackers mark their run failed and flush.
    Every implementation is called even when one raises; exceptions raised by
    implementations are logged and never replace the original. ``on_close`` follows.

    :param loop: the loop.
    :param exception: the exception in flight.
    Return value ignored.
    """
