"""How the ranks of a DDP job agree on signals and time-based saves.

A signal reaches one rank (or every rank at slightly different steps) and the ranks'
clocks differ, but a save is a collective: every rank must decide to save at the same
step. Every ``every`` optimizer steps each rank starts an all-reduce (max) of its flags
(the signal it received, whether its save interval is due) on a gloo side group of CPU
tensors, without waiting for it, and collects the result at the next optimizer step,
when every rank acts on it. No host-device sync; the wait at the next step lasts until
the slowest rank started the vote (ranks run in step with each other anyway, through the
gradient all-reduce). A signal is acted on within ``every + 1`` steps of its arrival.
At an epoch's end the ranks agree at once (a blocking all-reduce on the same side group).
"""

from __future__ import annotations

from typing import Any

import torch

Flags = tuple[int, bool]  # (the largest signal number received, whether a save is due)


class Agreement:
    """The ranks' shared view of ``(signal, due)``, exchanged on a gloo side group."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._group: Any = None
        self._for: Any = None  # the default group the side group was made in
        self._pending: tuple[Any, torch.Tensor] | None = None

    def start(self) -> None:
        """At the start of fit, on every rank (creating the side group is collective)."""
        import torch.distributed as tdist

        self._pending = None
        world = tdist.group.WORLD
        if self._group is None or self._for is not world:
            self._group = tdist.new_group(backend="gloo")
            self._for = world

    def step(self, step: int, signal: int | None, due: bool) -> Flags | None:
        """At an optimizer step: the result of the vote started at the previous one, if
        any; every ``every`` steps a new vote is started. ``None`` when no result."""
        result = self._collect()
        if step % self.every == 0:
            import torch.distributed as tdist

            flags = torch.tensor([float(signal or 0), float(due)])
            work = tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=self._group, async_op=True)
            self._pending = (work, flags)
        return result

    def now(self, signal: int | None, due: bool) -> Flags:
        """Agree at once (blocking), taking in a vote still in flight."""
        import torch.distributed as tdist

        earlier = self._collect() or (0, False)
        flags = torch.tensor([float(signal or 0), float(due)])
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=self._group)
        return max(earlier[0], int(flags[0])), earlier[1] or bool(flags[1])

    def drop(self) -> None:
        """Forget a vote in flight (after an exception: the other ranks may be gone)."""
        self._pending = None

    def _collect(self) -> Flags | None:
        if self._pending is None:
            return None
        work, flags = self._pending
        self._pending = None
        work.wait()
        return int(flags[0]), bool(flags[1])
