"""Per-run state of every installed plugin: an object that already ran in one loop and
is given to a new loop behaves exactly like a new object (plugin state, the ``on_log``
stream, the files written and the stop step).

Each plugin is found by entry point; the table below only supplies the options a plugin
needs (a folder, what to freeze). A newly installed plugin without an entry here runs
with no options, and the test says to add one if that fails.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hookloop import available_plugins
from hookloop.testing import HookRecorder, assert_same_run, snapshot_run, tiny_loop

# options per installed plugin name, given the run's folder
OPTIONS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "checkpoint": lambda d: {"dirpath": d, "monitor": "val/loss", "top_k": 2, "every_n_steps": 5,
                             "verbose": False},
    "early_stopping": lambda d: {"monitor": "val/loss", "patience": 1, "restore_best_weights": True},
    "freeze": lambda d: {"modules": ["0"], "unfreeze_at_epoch": 1},
    "gradual_unfreeze": lambda d: {"groups": ["0"], "every_n_epochs": 1},
    "summary": lambda d: {"input_size": (1, 4), "print_fn": None},
    "progress": lambda d: {"file": (d / "progress.txt").open("w")},
    "tensorboard": lambda d: {"log_dir": d / "tb"},
    "mlflow": lambda d: {"tracking_uri": f"sqlite:///{d / 'mlflow.db'}", "save_dir": d / "mlruns"},
    "wandb": lambda d: {"mode": "offline", "dir": d, "project": "per-run"},
    "gradnorm": lambda d: {"every_n_steps": 3},
}
# state that names an external run (a tracker's run id): new for every run by design
RUN_IDENTITY = ("run_id", "run_key", "id", "run_name", "name")
# wall-clock times of saves, and the files' digests that contain them
WALL_CLOCK = ("time", "files")


def _comparable(value: Any, folder: Path) -> Any:
    """Plugin state without wall-clock times, with the run's folder named alike."""
    if isinstance(value, dict):
        return {k: _comparable(v, folder) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [_comparable(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(str(folder), "<run folder>")
    return value


def _files(folder: Path, before: set[Path]) -> Counter[str]:
    """The files a run added under ``folder``, with digits and hex ids masked (event
    files and run folders carry times and random ids)."""
    added = [p for p in folder.rglob("*") if p.is_file() and p not in before]
    masked = (re.sub(r"[0-9a-f]{6,}|\d+", "#", str(p.relative_to(folder))) for p in added)
    return Counter(re.sub(r"run-[0-9a-z_#-]+", "run-ID", name) for name in masked)


def _second_run(plugin: Any, folder: Path) -> tuple[Any, Counter[str]]:
    before = {p for p in folder.rglob("*")}
    rec = HookRecorder(["on_log"])
    loop = tiny_loop([plugin, rec], seed=3)
    loop.fit(max_epochs=4)
    loop.close()
    return snapshot_run(loop, rec), _files(folder, before)


@pytest.mark.parametrize("name", sorted(available_plugins()))
def test_a_reused_plugin_object_runs_like_a_new_one(name: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    entry = available_plugins()[name]
    if entry.always_on:
        pytest.skip(f"{name} is an always-on module: one object per process by design")
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = OPTIONS.get(name, lambda d: {})

    def make(folder: Path) -> Any:
        folder.mkdir(exist_ok=True)
        try:
            return entry.obj(**options(folder))
        except TypeError as exc:
            pytest.fail(f"plugin {name!r} needs options: add them to OPTIONS in this file ({exc})")

    reused_dir, fresh_dir = tmp_path / "reused", tmp_path / "fresh"
    obj = make(reused_dir)
    _second_run(obj, reused_dir)  # its first loop
    reused, reused_files = _second_run(obj, reused_dir)
    _second_run(make(fresh_dir), fresh_dir)  # the same history in the other folder...
    fresh, fresh_files = _second_run(make(fresh_dir), fresh_dir)  # ...then a new object

    reused.plugins = _comparable(reused.plugins, reused_dir)
    fresh.plugins = _comparable(fresh.plugins, fresh_dir)
    state = reused.plugins.get(name, {})
    ignore = [f"plugins.{name}.{k}" for k in RUN_IDENTITY if isinstance(state, dict) and k in state]
    # the global RNG is also drawn by tracker SDKs (run ids); training itself is compared
    # through parameters, optimizer state and the log stream
    assert_same_run(reused, fresh, ignore=[*ignore, "rng.python", "rng.numpy"])
    assert reused.counters["global_step"] == fresh.counters["global_step"]
    assert reused_files == fresh_files
