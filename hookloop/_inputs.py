"""Checks of the loop's inputs and the texts of its input errors: data sources,
callables, ``fit``'s ``resume``, and where a control call was made."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hookloop.loop import Loop

END = object()
"""Sentinel for ``next(it, END)``."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_data(name: str, data: Any) -> None:
    """A data source is an iterable of batches (TypeError otherwise); an iterator (a
    generator) is accepted with a RuntimeWarning, as it yields batches once."""
    if data is None:
        return
    kind = type(data)
    if isinstance(data, (str, bytes)) or not (hasattr(kind, "__iter__") or hasattr(kind, "__getitem__")):
        raise TypeError(
            f"{name} must be an iterable of batches (a DataLoader, a list of batches, ...); got "
            f"{kind.__name__} {_short(data)}"
        )
    if isinstance(data, Iterator):
        then = ("; training stops at the epoch that finds it exhausted. " if name == "train_data"
                else "; later validations see no batch. ")
        warnings.warn(
            f"{name} is an iterator ({kind.__name__}): it can be iterated once, so only its first "
            f"pass has batches{then}Pass a re-iterable source instead: a list, a DataLoader, or "
            "an object whose __iter__ returns a fresh iterator",
            RuntimeWarning,
            stacklevel=4,
        )


def check_callables(**fns: Any) -> None:
    """A TypeError naming the first argument that is given but not callable."""
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable; got {type(fn).__name__} {_short(fn)}")


def check_val_metrics(val_metrics: Any) -> None:
    """``val_metrics`` is ``None`` or a mapping of name to callable."""
    if val_metrics is None:
        return
    if not isinstance(val_metrics, Mapping):
        raise TypeError(
            "val_metrics must be a mapping of name to fn(output, target); got "
            f"{type(val_metrics).__name__} {_short(val_metrics)}"
        )
    check_callables(**{f"val_metrics[{k!r}]": fn for k, fn in val_metrics.items()})


def check_resume(resume: Any) -> None:
    """``fit``'s ``resume`` is ``None`` or a checkpoint mapping."""
    if resume is None or isinstance(resume, Mapping):
        return
    hint = ""
    if isinstance(resume, (str, bytes)) or hasattr(resume, "__fspath__"):
        hint = (" (a path: load it first, resume=torch.load(path, weights_only=True), or give "
                "the checkpoint plugin resume=...)")
    raise TypeError(f"resume must be a checkpoint dict made by loop.state_dict(); got "
                    f"{type(resume).__name__} {_short(resume)}{hint}")


_EMPTY_HINT = ("Check the dataset and the DataLoader (drop_last=True with fewer samples than "
               "batch_size yields no batch)")


def check_not_empty(data: Any) -> None:
    """A ValueError when ``data`` has a length of 0 (a source without a length is
    checked when its first epoch yields nothing)."""
    try:
        n = len(data)
    except (TypeError, NotImplementedError):
        return
    if n == 0:
        raise ValueError(f"train_data ({type(data).__name__}) is empty (len 0): there is nothing "
                         f"to train on. {_EMPTY_HINT}")


def no_batches_error(data: Any, epoch: int) -> ValueError:
    """The error for a train_data that never yielded a batch."""
    once = "; it is an iterator, already exhausted or empty" if isinstance(data, Iterator) else ""
    return ValueError(f"train_data ({type(data).__name__}) yielded no batches in epoch {epoch}: "
                      f"there is nothing to train on{once}. {_EMPTY_HINT}")


def exhausted_text(data: Any, epoch: int, seen: int) -> str:
    """The warning for a train_data that yielded batches before, and none now."""
    once = ": an iterator or generator can be iterated only once" if isinstance(data, Iterator) else ""
    return (f"train_data ({type(data).__name__}) yielded no batches in epoch {epoch} after "
            f"{seen} in earlier epochs{once}; training stops (stop_reason 'train_data exhausted'). "
            "Pass a re-iterable source (a list, a DataLoader) to train several epochs")


def short_resume_error(done: int, skip: int, epoch: int) -> ValueError:
    """The error for a resumed epoch whose data is shorter than the batches it did."""
    return ValueError(
        f"train_data yielded {done} batch(es) in epoch {epoch}, but the resumed checkpoint had "
        f"already done {skip} of that epoch: resume needs the same training data (same length "
        "and order; an iterator cannot be resumed mid-epoch)"
    )


def where(loop: Loop) -> str:
    """Where the loop is, for the errors of the control calls."""
    state = loop.state
    phase = loop._phase
    if state.stage == "validate":
        return "during validation" + ("" if phase == "fit" else " (outside fit)")
    if phase == "idle":
        return "outside fit"
    if phase == "ended":
        return "in on_fit_end, after the fit ended"
    if not loop._in_epoch:
        return "between training epochs (on_resume, on_fit_start or on_train_epoch_end)"
    if not loop._in_batches:
        return f"in on_train_epoch_start of epoch {state.epoch}"
    if state.batch_idx != state.epoch_batches_done:
        return f"after the optimizer step of batch {state.batch_idx} (on_train_batch_end)"
    return f"in batch {state.batch_idx}"
