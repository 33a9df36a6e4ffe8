"""MLflow tracker plugin for hookloop.

Register it by name (``Loop(..., plugins=[("mlflow", {"experiment": "demo"})])``) or as
an object (``Loop(..., plugins=[MLflow(experiment="demo")])``). Everything the core's
:class:`hookloop.tracking.Tracker` guarantees holds: calls to MLflow are handed, through
a bounded queue and a worker thread, to the trackers' backend process, an unreachable
tracking server never stops training, secrets are masked, and the run ends
``FINISHED``, ``FAILED`` or ``KILLED``.

The ``mlflow`` package is imported lazily, in the backend process (or on the worker
thread with ``backend="thread"``), when a run opens.
"""

from __future__ import annotations

from hookloop_mlflow.tracker import MLflow

__all__ = ["MLflow"]
__version__ = "0.1.0"
