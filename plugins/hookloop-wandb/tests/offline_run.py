"""Read an offline W&B run back with W&B's own tooling, for the tests.

``wandb leet inspect --json PATH`` decodes a run's ``run-<id>.wandb`` transaction log
and prints one JSON object per record (``{"num", "type", "<type>": {...}}``);
:func:`read_offline_run` gathers the records the tests check. Values logged as media
or histograms keep W&B's dotted keys: ``row["samples/grid._type"] == "image-file"``.
``wandb sync --dry-run PATH`` (:func:`sync_dry_run`) says whether W&B would upload the
run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfflineRun", "inspect_records", "read_offline_run", "sync_dry_run"]

WANDB = [sys.executable, "-m", "wandb"]
"""The ``wandb`` command of the SDK installed with this interpreter."""


def _wandb(*args: str, timeout: float) -> str:
    """Run ``wandb ARGS`` and return its standard output; W&B's messages (its
    standard error) are not silenced by ``WANDB_SILENT`` here and come after it."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    proc = subprocess.run([*WANDB, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`wandb {' '.join(args)}` exited with {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()} "
                           "(reading offline runs needs wandb>=0.31: `wandb leet inspect --json`)")
    return proc.stdout + proc.stderr


def inspect_records(path: str | Path, *, wait: float = 0.0) -> list[dict[str, Any]]:
    """Every record of the run at ``path`` (a run folder or its ``.wandb`` file), as
    ``wandb leet inspect --json`` prints it, in write order.

    W&B's service writes the log in the background and may still be writing it when
    ``run.finish()`` returns: with ``wait`` > 0 the command follows the log until the
    run's exit record, or until it has not grown for ``wait`` seconds.
    """
    args = ["leet", "inspect", "--json", str(path)]
    if wait > 0:
        args += ["--follow", "--idle-timeout", f"{wait:g}s"]
    out = _wandb(*args, timeout=wait + 120)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def sync_dry_run(path: str | Path) -> str:
    """What ``wandb sync --dry-run PATH`` prints: the runs W&B would upload."""
    return _wandb("sync", "--dry-run", str(path), timeout=120)


@dataclass
class OfflineRun:
    """The records of one offline run folder, gathered.

    - ``run_id``, ``project``, ``resumed``: from the run record;
    - ``config``: the final config (``_wandb`` left out);
    - ``history``: one dict per committed history row, with ``_step``;
    - ``summary``: the last summary values;
    - ``exit_code``: from the exit record (``None`` when the run never finished);
    - ``artifacts``: the artifact records (``type``, ``name``, ``aliases``,
      ``manifest.contents[].path``);
    - ``records``: all records, for anything else.
    """

    path: Path
    run_id: str = ""
    project: str = ""
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def steps(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` of ``key`` in every history row that has it."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


def _update_config(config: dict[str, Any], record: dict[str, Any]) -> None:
    config.update(record.get("update", {}))
    for key in record.get("remove", {}):
        config.pop(key, None)


def read_offline_run(run_dir: str | Path, *, wait: float = 0.0) -> OfflineRun:
    """Gather the records of the run folder ``run_dir`` (see :func:`inspect_records`
    for ``wait``)."""
    out = OfflineRun(path=Path(run_dir))
    out.records = inspect_records(run_dir, wait=wait)
    for record in out.records:
        kind = record["type"]
        body = record.get(kind, {})
        if kind == "run":
            out.run_id = body.get("run_id", "")
            out.project = body.get("project", "")
            out.resumed = out.resumed or bool(body.get("resumed"))
            _update_config(out.config, body.get("config", {}))
        elif kind == "config":
            _update_config(out.config, body)
        elif kind == "history":
            row = dict(body.get("item", {}))
            if "step" in body:
                row.setdefault("_step", int(body["step"].get("num", 0)))
            out.history.append(row)
        elif kind == "summary":
            out.summary.update(body.get("update", {}))
        elif kind == "exit":
            out.exit_code = int(body.get("exit_code", 0))
        elif kind == "artifact":
            out.artifacts.append(body)
    out.config.pop("_wandb", None)
    return out
