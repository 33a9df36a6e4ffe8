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
Hooks are called with keyword arguments; an implementation may accept any subset of them.
No hook is `firstresult`; return values are ignored. Implement a hook as a method named after
it (with or without `@hookloop.hookimpl`; the marker adds `tryfirst`, `trylast`, `wrapper`).

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
