"""Checkpointing for hookloop: crash-safe files, best-k selection, async saving,
preemption handling and bit-exact resume.

Quick start::

    from hookloop_checkpoint import Checkpoint, load, load_checkpoint

    ckpt = Checkpoint("runs/ckpt", monitor="val/acc", mode="max", top_k=3)
    loop = Loop(model, opt, train, val_data=val, loss_fn=F.cross_entropy, plugins=[ckpt])
    loop.fit(max_epochs=10)                                   # writes runs/ckpt/*.pt
    loop.fit(max_epochs=20, resume=load_checkpoint("runs/ckpt"))  # continue later
    load("runs/ckpt", new_model, strict=False)                 # best weights into a model

Or by name: ``Loop(..., plugins={"checkpoint": {"dirpath": "runs/ckpt"}})``.
"""

from hookloop_checkpoint._io import MANIFEST_NAME, atomic_write, render_filename, sanitize_name
from hookloop_checkpoint._load import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LoadResult,
    UnsafeCheckpointError,
    WeightsOnlyCheckpointError,
    align_compiled_keys,
    best_checkpoint,
    is_sharded_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load,
    load_checkpoint,
)
from hookloop_checkpoint._plugin import (
    Checkpoint,
    CheckpointWriteError,
    MonitorNotFoundError,
    ResumeDisagreementError,
    SaveStat,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "MANIFEST_NAME",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "LoadResult",
    "MonitorNotFoundError",
    "ResumeDisagreementError",
    "SaveStat",
    "UnsafeCheckpointError",
    "WeightsOnlyCheckpointError",
    "__version__",
    "align_compiled_keys",
    "atomic_write",
    "best_checkpoint",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_checkpoint",
    "render_filename",
    "sanitize_name",
]

__version__ = "0.1.0"
