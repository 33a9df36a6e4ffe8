"""Read back what an offline W&B run wrote, without a server or an account.

An offline run directory (``<dir>/wandb/offline-run-<time>-<id>/``) holds the run's
transaction log ``run-<id>.wandb``: a LevelDB-log-framed stream (32 KiB blocks, 7-byte
record headers with a CRC-32, full/first/middle/last fragments) of
``wandb.proto.wandb_internal_pb2.Record`` protobufs, after a 7-byte file header
(``":W&B"``, magic ``0xBEE1``, version 0). :func:`read_records` decodes it;
:func:`read_offline_run` gathers the parts a test or a user usually wants.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfflineRun", "read_offline_run", "read_records"]

_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_IDENT = b":W&B"
_MAGIC = 0xBEE1
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _frames(data: bytes, check_crc: bool) -> Iterator[bytes]:
    if len(data) < _FILE_HEADER.size:
        raise ValueError("not a W&B transaction log: file shorter than its header")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC or version != 0:
        raise ValueError(f"not a W&B transaction log (header {ident!r}, {magic:#x}, {version})")
    pos = _FILE_HEADER.size
    pending: bytearray | None = None
    while pos + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER.size:  # block trailer padding
            pos += left
            continue
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left
            continue
        start = pos + _RECORD_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:  # a torn write at the end of a crashed run
            return
        if check_crc and zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise ValueError(f"W&B transaction log: bad checksum at byte {pos}")
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            pending += chunk
            yield bytes(pending)
            pending = None


def read_records(path: str | Path, *, check_crc: bool = True) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` of a ``.wandb`` transaction log, in
    write order. Raises ValueError for a file that is not one (or, with
    ``check_crc``, a corrupt record)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    for raw in _frames(data, check_crc):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _put(target: dict[str, Any], item: Any) -> None:
    """Store an item at its key; a nested key (media, histograms) builds nested dicts."""
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        inner = target.get(key)
        if not isinstance(inner, dict):
            inner = target[key] = {}
        target = inner
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """The decoded content of one offline run directory.

    - ``run_id``, ``project``: from the run record;
    - ``config``: the final config (key to decoded JSON value, ``_wandb`` left out);
    - ``history``: one dict per committed history row, with ``_step``; media and
      histograms are nested dicts (``row["samples/grid"]["_type"] == "image-file"``);
    - ``summary``: the last summary values (nested the same way);
    - ``exit_code``: from the exit record (``None`` when the run never finished);
    - ``artifacts``: ``wandb_internal_pb2.ArtifactRecord`` messages;
    - ``resumed``: whether the run record says it resumed an existing run;
    - ``files``: every file under the run directory;
    - ``records``: all records, for anything else.
    """

    path: Path
    run_id: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    artifacts: list[Any] = field(default_factory=list)
    resumed: bool = False
    files: list[Path] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)

    def steps(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` of ``key`` in every history row that has it."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def _update_config(config: dict[str, Any], update: Any) -> None:
    for item in update.update:
        config[_key(item)] = json.loads(item.value_json)
    for item in update.remove:
        config.pop(_key(item), None)


def read_offline_run(run_dir: str | Path, *, wait: float = 0.0) -> OfflineRun:
    """Decode the run directory ``run_dir`` (the folder holding ``run-<id>.wandb``).

    W&B's service writes the log in the background and may still be writing it when
    ``run.finish()`` returns: with ``wait`` > 0, read again (for up to ``wait``
    seconds) until the log holds the run's exit record.
    """
    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait
    while True:
        out = _read(run_dir)
        if out.exit_code is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.05)


def _read(run_dir: Path) -> OfflineRun:
    logs = sorted(run_dir.glob("*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no .wandb transaction log in {run_dir}")
    out = OfflineRun(path=run_dir)
    out.files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    for record in read_records(logs[0]):
        out.records.append(record)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run_id = record.run.run_id
            out.project = record.run.project
            out.resumed = out.resumed or bool(record.run.resumed)
            _update_config(out.config, record.run.config)
        elif kind == "config":
            _update_config(out.config, record.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(out.summary, item)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
        elif kind == "artifact":
            out.artifacts.append(record.artifact)
    out.config.pop("_wandb", None)
    return out
