"""Generate docs/hooks.md from hookloop/hookspecs.py.

Run ``python docs/gen_hooks.py`` after changing a hookspec; the test suite fails when
docs/hooks.md and the hookspecs disagree.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from hookloop import hookspecs
from hookloop.plugins import HOOK_NAMES

HERE = Path(__file__).parent

INTRO = """\
# Hooks

Every hook hookloop fires, generated from `hookloop/hookspecs.py` (`python docs/gen_hooks.py`).
Hooks are called with keyword arguments; an implementation may accept any subset of them
(keyword-only parameters included). Only `on_resume` is `firstresult`; other return values
are ignored. Implement a hook as a method named after it (with or without
`@hookloop.hookimpl`; the marker adds `tryfirst`, `trylast`, `wrapper`, `hookwrapper`).
Every hook, wrappers and `on_exception` included, is compiled into one call plan per hook by
the same code, under the same frequency filters (`hookloop.only`) and fault policies
(`hookloop_on_error`); the compiled callers are `loop.callers` (`loop.hooks` is the old name
and warns). Calling pluggy's own `loop.pm.hook` bypasses the filters and policies: don't.

Aliases: `on_batch_end` is `on_train_batch_end` and `on_epoch_end` is `on_train_epoch_end`
(the names Keras uses). A method with an alias name implements the canonical hook; plans,
recorders and this page show the canonical name; a plugin implementing both names of one
hook is refused at registration.

## Firing order

A fit of two epochs, two training batches per epoch, `log_every_n_steps=2` and one
validation batch fires exactly this sequence (tested in `tests/test_hooks.py`):

<!-- firing-order:start -->
```text
{order}
```
<!-- firing-order:end -->

Rules behind it:

- `on_before_optimizer_step` fires only on batches that step the optimizer (not on gradient
  accumulation micro-batches); `loop.state.stepped` tells them apart in `on_train_batch_end`.
- `on_log` fires after `on_train_batch_end` when `global_step % log_every_n_steps == 0`, then at
  epoch end with the epoch means (`<name>_epoch`), then after `on_validation_end` with the
  validation metrics.
- Validation runs inside the epoch, before `on_train_epoch_end` (as in Lightning), every
  `val_every_n_epochs` epochs and after the last one.
- `on_fit_end` fires on normal completion (max epochs, max steps, or a requested stop);
  when fit raises, `on_exception` fires instead and the exception propagates.
- `on_save_checkpoint` / `on_load_checkpoint` fire inside `loop.state_dict()` /
  `loop.load_state_dict()`; `on_checkpoint_saved` is fired by the checkpoint plugin after a file
  is durably written; `on_log_text` / `on_log_image` fire when something calls
  `loop.log_text` / `loop.log_image`.

Stopping: `loop.request_stop(reason)` ends training after the current batch; the epoch is
closed normally (epoch metrics, validation, `on_train_epoch_end`) and `state.stop_reason` keeps
the reason. `loop.stop_epoch()` ends the current epoch after the current batch (validation still runs);
`loop.skip_optimizer_step()` skips the optimizer step of the current batch.

| how training stops | rest of the epoch | validation | `on_train_epoch_end` | `on_fit_end` |
|---|---|---|---|---|
| max_epochs reached | - | yes | yes | yes |
| max_steps reached mid-epoch | skipped | yes | yes | yes |
| `request_stop` in a batch hook | skipped | yes | yes | yes |
| `request_stop` in `on_train_epoch_end` | - | - | yes (already running) | yes |
| `stop_epoch()` | skipped | yes | yes | fit goes on with the next epoch |
| exception | - | - | - | no; `on_exception` |

A partial epoch ended by `max_steps` or `request_stop` counts as finished: a checkpoint
taken at its end resumes with the next epoch. To continue the rest of that epoch later,
checkpoint from a batch hook (the checkpoint plugin's `every_n_steps`) instead.

## What `loop.state.metrics` holds

Logged values are reduced (mean, in float64: Python floats, float64 and integer tensors keep
their value) at three points; each reduction writes `loop.state.metrics` and stamps every
value in `loop.state.metric_stamps` with a `MetricStamp(step, epoch, stage, time)`:

| at | `loop.state.metrics` holds | stamp |
|---|---|---|
| `on_train_batch_start` .. `on_before_optimizer_step` | the values of earlier reductions | older steps |
| `on_train_batch_end` of a log step (`global_step % log_every_n_steps == 0`) | the interval that ends with this step, already reduced | `step == global_step`, stage `train` |
| `on_train_batch_end` of another step | the last interval's means | an earlier step |
| `on_log` of a log step | the interval, plus values logged inside that step's `on_train_batch_end` (reduced right after it) | `step == global_step` |
| `on_log` after the epoch's batches | the epoch means (`<name>_epoch`) | stage `train_epoch` |
| `on_validation_end`, then `on_log` | the validation means | stage `validate` |
| `on_train_epoch_end` | all of the above; the `metrics` argument has this epoch's means and, when validation ran this epoch, its values | |

A value logged inside `on_train_batch_end` of a step that does not log joins the next
interval. `loop.metrics.reduce_now()` reduces the values logged so far at any point (one
sync; under DDP every rank must call it at the same point) and stamps them with the current
step. A plugin that must act only on fresh values compares `metric_stamps[name].step` with
`loop.state.global_step` (the checkpoint plugin ranks a save only by a value of its own
step). `on_log` receives `time`: the wall-clock time of the reduction on the training thread
(an interval's last step, the epoch's end, the validation's end).

## Resume, state and teardown

A resume is one core step. `fit(resume=checkpoint)`, or else the first non-`None` result of
`on_resume` (the checkpoint plugin's `resume=`), is validated as a whole and then restored
before any `on_fit_start`: model, plugin states (their tensors on `loop.device`), optimizers,
schedulers, scaler, counters, pending metrics, RNG and loader generators (on the CPU). A
mismatch (model keys or shapes, optimizer class or parameter groups, scheduler count or
class, missing or unknown plugin state) raises `hookloop.ResumeError` listing every problem
and changes nothing. Plugin state is keyed by the name the user gave the plugin, else its
`state_key` (built with `hookloop.state_key(base, **defining_options)`), else its registered
name. `hookloop_state_required = False` (trackers) makes missing state a warning; otherwise
it is an error, or a warning with `load_state_dict(..., strict=False)`. Checkpoints of format
`hookloop.loop/1` are migrated when loaded.

Per-run state: a plugin object given to a new `Loop` starts from the state it had before its
first loop (its `load_state_dict` receives that state at registration); a second `fit` on the
same loop continues.

`Loop.close()` (also the end of a `with Loop(...) as loop:` block) fires `on_close` once and
destroys a process group the loop created. `fit` closes the loop when it raises under DDP or
is ended by `KeyboardInterrupt`/`SystemExit`; a plain exception in one process leaves the loop
open for inspection. Loops still open at interpreter exit are closed then.

## Reference
"""


def firing_order() -> list[str]:
    """Record the sequence shown above with the real loop."""
    from hookloop.testing import HookRecorder, tiny_data, tiny_loop

    rec = HookRecorder()
    loop = tiny_loop([rec], train_data=tiny_data(16, 8), val_data=tiny_data(8, 8, 1),
                     log_every_n_steps=2)
    loop.fit(max_epochs=2)
    return rec.names()


def render(order: list[str] | None = None) -> str:
    """The whole of docs/hooks.md."""
    order = firing_order() if order is None else order
    out = [INTRO.replace("{order}", "\n".join(order))]
    source = inspect.getsource(hookspecs)
    for name in HOOK_NAMES:
        func = getattr(hookspecs, name)
        sig = inspect.signature(func)
        args = ", ".join(sig.parameters)
        doc = inspect.cleandoc(func.__doc__ or "")
        section = source[: source.index(f"def {name}(")].rsplit("# ---", 2)[-2]
        phase = section.strip("-# \n").splitlines()[0].strip() if section else ""
        out.append(f"### `{name}({args})`\n\n*Phase: {phase}.*\n\n{doc}\n")
    return "\n".join(out)


if __name__ == "__main__":
    text = render()
    (HERE / "hooks.md").write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {HERE / 'hooks.md'} ({len(text)} chars)\n")
