"""Weights & Biases tracker plugin for hookloop.

Register it by name (``Loop(..., plugins=[("wandb", {"project": "demo"})])``) or as an
object (``Loop(..., plugins=[WandB(project="demo")])``). Everything the core's
:class:`hookloop.tracking.Tracker` guarantees holds: calls to the SDK are handed, through
a bounded queue and a worker thread, to the trackers' backend process, a failing backend
never stops training, secrets are masked, and the run is finished with exit code 0 or 1.

The ``wandb`` SDK is imported lazily, in the backend process (or on the worker thread
with ``backend="thread"``), the first time a run opens.
W&B's own tooling reads an offline run back: ``wandb leet inspect --json RUN_DIR``
prints its records, ``wandb sync --dry-run RUN_DIR`` what an upload would send.
"""

from __future__ import annotations

from hookloop_wandb.tracker import WandB

__all__ = ["WandB"]
__version__ = "0.2.0"
