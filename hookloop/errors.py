"""Errors shared by plugins.

A plugin that reports one of these conditions raises the class defined here, so a
caller can catch it once, whichever plugin raised it::

    from hookloop import MonitorNotFoundError

    try:
        loop.fit(max_epochs=10)
    except MonitorNotFoundError as exc:
        print(exc)  # names the missing metric and lists the logged ones
"""

from __future__ import annotations

__all__ = ["MonitorNotFoundError"]


class MonitorNotFoundError(KeyError):
    """A plugin monitors a metric that was never logged.

    The message names the monitor and lists the metrics that were logged. It is a
    :class:`KeyError` (a metric name missing from the logged metrics), whose ``str``
    is the plain message rather than its ``repr``.

    Since 0.2.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
