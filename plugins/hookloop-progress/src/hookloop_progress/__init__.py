"""Progress display for hookloop: a tqdm bar per epoch on a terminal, one line per
epoch otherwise.

Register it by name (``plugins=["progress"]``) or as an object
(``plugins=[Progress()]``). The plugin implements no per-step hook: a small thread
reads ``loop.state.epoch_batches_done`` (a plain int) a few times a second and moves
the bar, and the metrics it shows are the plain floats of the last ``on_log``. So it
adds no per-step dispatch cost and never synchronises the device.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from hookloop.plugins import hookimpl

__all__ = ["INSTALL_HINT", "MODES", "Progress", "format_metrics"]

__version__ = "0.1.0"

INSTALL_HINT = "the progress bar needs 'tqdm': pip install hookloop-progress (or pip install tqdm)"
"""The message of the ImportError raised when tqdm is missing in bar mode."""

MODES = ("auto", "bar", "lines")
"""``"bar"``: a live bar plus a line per epoch; ``"lines"``: only the line per epoch;
``"auto"``: ``"bar"`` when the output is a terminal, else ``"lines"``."""


def format_metrics(metrics: Mapping[str, float], digits: int = 4, names: Sequence[str] | None = None) -> str:
    """``name=value`` pairs sorted by name, values with ``digits`` significant digits;
    only ``names`` when given."""
    keys = sorted(metrics) if names is None else [n for n in names if n in metrics]
    return " ".join(f"{k}={metrics[k]:.{digits}g}" for k in keys)


def _columns(stream: Any) -> int | None:
    """The terminal's width, or ``None`` when unknown (a pseudo-terminal without a
    size reports 0 columns, where tqdm would draw nothing)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return columns if columns > 0 else None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class Progress:
    """A progress bar per epoch (steps, rate, ETA, latest logged metrics) and a
    one-line summary at the end of each epoch; rank zero only.

    :param file: where to write (default: ``sys.stderr`` at fit start).
    :param mode: one of :data:`MODES`. Without a terminal (a log file, CI) ``"auto"``
        writes exactly one line per epoch.
    :param refresh_interval: seconds between two bar updates.
    :param metrics: names of the metrics to show (default: every logged metric).
    :param digits: significant digits of the metric values.
    """

    hookloop_name = "progress"
    hookloop_rank_zero_only = True
    hookloop_on_error = "warn"

    def __init__(
        self,
        *,
        file: TextIO | None = None,
        mode: str = "auto",
        refresh_interval: float = 0.1,
        metrics: Sequence[str] | None = None,
        digits: int = 4,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if refresh_interval <= 0:
            raise ValueError(f"refresh_interval={refresh_interval!r}; expected > 0")
        self.file = file
        self.mode = mode
        self.refresh_interval = refresh_interval
        self.metrics = list(metrics) if metrics is not None else None
        self.digits = digits
        self.lines: list[str] = []
        """The summary lines written during the last fit."""
        self._out: TextIO = sys.stderr
        self._bar_mode = False
        self._loop: Any = None
        self._bar: Any = None
        self._latest: dict[str, float] = {}
        self._postfix = ""
        self._shown_postfix = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._epoch_t0 = 0.0
        self._epoch_start_batches = 0

    # ------------------------------------------------------------ helpers

    @property
    def bar_mode(self) -> bool:
        """Whether the current (or last) fit shows a live bar."""
        return self._bar_mode

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        out = self._out
        if self._bar_mode:
            from tqdm import tqdm

            tqdm.write(line, file=out)
        else:
            out.write(line + "\n")
        try:
            out.flush()
        except Exception:
            pass

    def _epoch_label(self, loop: Any, epoch: int) -> str:
        max_epochs = loop.state.max_epochs
        return f"epoch {epoch + 1}/{max_epochs}" if max_epochs else f"epoch {epoch + 1}"

    def _epoch_total(self, loop: Any) -> int | None:
        try:
            total: int | None = len(loop.train_data)
        except TypeError:
            total = None
        state = loop.state
        if state.max_steps is not None:
            left = state.epoch_batches_done + max(0, state.max_steps - state.global_step) * loop.grad_accum
            total = left if total is None else min(total, left)
        return total

    def _tick(self) -> None:
        """Move the bar to the loop's batch count and show the latest metrics."""
        with self._lock:
            bar, loop = self._bar, self._loop
            if bar is None or loop is None:
                return
            postfix = self._postfix
            if postfix != self._shown_postfix:
                self._shown_postfix = postfix
                bar.set_postfix_str(postfix, refresh=False)
                changed = True
            else:
                changed = False
            delta = loop.state.epoch_batches_done - bar.n
            if delta > 0:
                bar.update(delta)
            elif changed:
                bar.refresh()

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            try:
                self._tick()
            except Exception:  # a broken stream must not end the thread noisily
                pass

    def _close_bar(self) -> None:
        self._tick()
        with self._lock:
            bar, self._bar = self._bar, None
            if bar is not None:
                bar.close()

    def _stop_ticker(self) -> None:
        self._stop.set()
        thread, self._ticker = self._ticker, None
        if thread is not None:
            thread.join(5.0)

    # ------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_start(self, loop: Any) -> None:
        """Choose bar or line mode and start the bar thread."""
        self._out = self.file if self.file is not None else sys.stderr
        self._bar_mode = self.mode == "bar" or (self.mode == "auto" and _isatty(self._out))
        if self._bar_mode:
            try:
                import tqdm  # noqa: F401
            except ImportError as exc:
                raise ImportError(INSTALL_HINT) from exc
        self._loop = loop
        self.lines = []
        self._latest = {}
        self._postfix = self._shown_postfix = ""
        if self._bar_mode:
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._run_ticker, name="hookloop-progress", daemon=True)
            self._ticker.start()

    @hookimpl
    def on_train_epoch_start(self, loop: Any, epoch: int) -> None:
        """Open the epoch's bar (starting at the batches already done on resume)."""
        state = loop.state
        self._epoch_t0 = time.perf_counter()
        self._epoch_start_batches = state.epoch_batches_done
        if not self._bar_mode:
            return
        from tqdm import tqdm

        columns = _columns(self._out)
        bar = tqdm(
            total=self._epoch_total(loop),
            initial=state.epoch_batches_done,
            desc=self._epoch_label(loop, epoch),
            unit="step",
            file=self._out,
            leave=False,
            dynamic_ncols=columns is not None,
            ncols=None if columns is not None else 160,
            mininterval=0,
            miniters=1,
        )
        if self._postfix:
            bar.set_postfix_str(self._postfix, refresh=False)
            self._shown_postfix = self._postfix
        with self._lock:
            self._bar = bar

    @hookimpl
    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        """Keep the latest logged metrics (plain floats) for the bar."""
        if self._bar_mode:
            self._latest.update(metrics)
            self._postfix = format_metrics(self._latest, self.digits, self.metrics)

    @hookimpl
    def on_train_epoch_end(self, loop: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        """Close the bar and write the epoch's summary line."""
        self._close_bar()
        state = loop.state
        done = state.epoch_batches_done - self._epoch_start_batches
        seconds = time.perf_counter() - self._epoch_t0
        rate = done / seconds if seconds > 0 else 0.0
        parts = [
            self._epoch_label(loop, epoch),
            f"{done} steps in {seconds:.1f}s ({rate:.1f} steps/s)",
            f"global step {state.global_step}",
        ]
        shown = format_metrics(metrics, self.digits, self.metrics)
        if shown:
            parts.append(shown)
        self._emit(" | ".join(parts))

    @hookimpl
    def on_fit_end(self) -> None:
        """Stop the bar thread."""
        self._close_bar()
        self._stop_ticker()
        self._loop = None

    @hookimpl
    def on_exception(self, loop: Any, exception: BaseException) -> None:
        """Close the bar and say where training stopped."""
        try:
            self._close_bar()
            self._stop_ticker()
            state = loop.state
            self._emit(
                f"{self._epoch_label(loop, state.epoch)} | stopped at global step "
                f"{state.global_step}: {type(exception).__name__}: {exception}"
            )
        finally:
            self._loop = None

