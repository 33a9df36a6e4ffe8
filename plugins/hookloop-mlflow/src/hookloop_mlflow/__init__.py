"""MLflow tracker plugin for hookloop.

Register it by name (``Loop(..., plugins=[("mlflow", {"experiment": "demo"})])``) or as
an object (``Loop(..., plugins=[MLflow(experiment="demo")])``). Everything the core's
:class:`hookloop.tracking.Tracker` guarantees holds: calls to MLflow run on a worker
thread through a bounded queue, an unreachable tracking server never stops training,
secrets are masked, and the run ends ``FINISHED``, ``FAILED`` or ``KILLED``.

The ``mlflow`` package is imported lazily, on the worker thread, when a run opens.
"""

from __future__ import annotations

from hookloop_mlflow.tracker import MLflow

__all__ = ["MLflow"]
__version__ = "0.1.0"
