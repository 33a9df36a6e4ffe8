"""Sharded checkpoints: one directory per checkpoint, written by every rank through
``torch.distributed.checkpoint`` (DCP) when the loop's model is sharded (``loop.sharded``).

One save, reached by every rank at the same step:

1. every rank writes its shards of the model and optimizer state with ``dcp.save`` (or
   ``dcp.async_save``) into ``.<name>.tmp-<seq>-<hash>/``, a name every rank derives
   alike. DCP's coordinator, rank 0, writes the index (``.metadata``) after it gathered
   every rank's write results, so once DCP's call (or future) returned on rank 0 every
   rank's shards are on disk; a failed write on any rank raises on every rank;
2. rank 0 writes the loop's small state (counters, every rank's RNG, plugin states,
   hparams) beside them as ``loop.pt``, durably;
3. rank 0 renames the directory to ``<name>/``, fsyncs the folder, and only then lists
   it in the manifest (the caller's part).

A directory under a temporary name is incomplete: the next fit start removes it, as it
removes the temporary files of interrupted writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from hookloop_checkpoint._io import TMP_MARK, atomic_write, fsync_dir
from hookloop_checkpoint._load import DCP_METADATA, SHARDED_STATE_FILE

__all__ = ["SHARDED_PARTS", "finalize", "remove_path", "split", "tmp_name", "write_state"]

SHARDED_PARTS = ("model", "optimizers")
"""The parts of ``loop.state_dict()`` that DCP writes from every rank."""


def tmp_name(name: str, seq: int) -> str:
    """The temporary directory name of save ``seq`` of checkpoint ``name``: the same on
    every rank without a collective, and of the form the fit-start clean-up removes."""
    digest = hashlib.md5(f"{name}\0{seq}".encode(), usedforsecurity=False).hexdigest()
    return f".{name}{TMP_MARK}{seq}-{digest}"


def split(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(small state, shards)`` of a sharded ``loop.state_dict()``."""
    shards = {k: ckpt[k] for k in SHARDED_PARTS}
    small = {k: v for k, v in ckpt.items() if k not in SHARDED_PARTS}
    return small, shards


def write_state(tmp: Path, small: dict[str, Any]) -> dict[str, Any]:
    """Write the small state into ``tmp`` (rank 0); returns its size and SHA-256."""
    tmp.mkdir(parents=True, exist_ok=True)
    size, digest = atomic_write(tmp / SHARDED_STATE_FILE, lambda f: torch.save(small, f))
    return {"size": size, "sha256": digest}


def remove_path(path: Path) -> None:
    """Delete a checkpoint file, or a sharded checkpoint's directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def finalize(directory: Path, name: str, tmp: Path,
             state_info: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """Rename the complete ``tmp`` to ``directory/name`` (rank 0, after every rank's
    shards are written). Returns the files to list in the manifest (``name/<file>``:
    size, and the SHA-256 of the small state), and where a checkpoint of the same name
    that this one replaces was moved (delete it once the manifest is written; a
    temporary name, so a crash before that leaves it to the fit-start clean-up)."""
    if not (tmp / DCP_METADATA).is_file():
        raise OSError(f"{tmp}: torch.distributed.checkpoint wrote no {DCP_METADATA}")
    files: dict[str, Any] = {}
    for fname in sorted(os.listdir(tmp)):
        path = tmp / fname
        if path.is_file():
            files[f"{name}/{fname}"] = (dict(state_info) if fname == SHARDED_STATE_FILE
                                        else {"size": path.stat().st_size})
    final = directory / name
    replaced = None
    if final.exists():  # enable_version_counter=False: this checkpoint takes the name over
        replaced = directory / f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}"
        os.replace(final, replaced)
    try:
        os.replace(tmp, final)
    except BaseException:
        if replaced is not None:
            with contextlib.suppress(OSError):
                os.replace(replaced, final)
        raise
    fsync_dir(directory)
    return files, replaced
