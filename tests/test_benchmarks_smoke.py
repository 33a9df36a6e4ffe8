"""Smoke test of the benchmark scripts: each runs on a tiny size so they cannot rot.

No timing is asserted here (figures on a shared CI machine are noise); the test checks
that every script runs, writes its JSON and prints its targets. The whole suite through
``run_gpu.sh`` is rehearsed in tests/test_gpu_rehearsal.py (fresh venv, no index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize(
    "script, extra, produced",
    [
        ("dispatch.py", [], "dispatch.json"),
        ("workloads.py", ["--only", "noop"], "workloads.json"),
        ("bare_loop.py", [], "bare_loop.json"),
        ("checkpoint_stall.py", [], "checkpoint.json"),
        ("trackers.py", [], "trackers.json"),
        ("wholefit.py", [], "wholefit.json"),
    ],
)
def test_each_script_runs_alone(tmp_path: Path, script: str, extra: list[str], produced: str) -> None:
    """Each script also runs on its own (bundled plugins left out here to keep it short;
    the whole-suite test above covers them)."""
    stdout = _run([sys.executable, str(BENCH / script), "--quick", "--out", str(tmp_path / "o"), *extra],
                  tmp_path, {"HOOKLOOP_BENCH_PLUGINS": ""})
    data = json.loads((tmp_path / "o" / produced).read_text())
    assert "targets" in data
    if script != "wholefit.py":  # reported, no target
        assert data["targets"] and "targets:" in stdout


def test_report_md_renders_a_results_file(tmp_path: Path) -> None:
    """report_md renders the committed CPU results (older layout) without failing."""
    results = ROOT / "benchmarks" / "results" / "cpu" / "results.json"
    if not results.exists():
        pytest.skip("no committed results")
    proc = subprocess.run([sys.executable, str(BENCH / "report_md.py"), str(results)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "### Targets" in proc.stdout


@pytest.mark.distributed
def test_the_ddp_agreement_benchmark_runs_under_torchrun(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    out = _run([str(torchrun), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
                str(BENCH / "ddp_agreement.py"), "--steps", "120", "--rounds", "1"], tmp_path)
    for line in ("no checkpoint plugin", "agree_every_n_steps=10", "one vote alone"):
        assert line in out, out


@pytest.mark.slow  # starts the three trackers' backends a few times (about 60 s)
def test_trackers_script_runs_with_the_trackers(tmp_path: Path) -> None:
    """trackers.py with the bundled trackers, at its smoke size: every contender runs
    and every figure is reported (none is judged here)."""
    pytest.importorskip("hookloop_tensorboard")
    stdout = _run([sys.executable, str(BENCH / "trackers.py"), "--quick", "--out", str(tmp_path / "o")],
                  tmp_path, {"HOOKLOOP_BENCH_PLUGINS": "tensorboard,mlflow,wandb", "WANDB_MODE": "offline",
                             "WANDB_SILENT": "true"})
    data = json.loads((tmp_path / "o" / "trackers.json").read_text())
    assert not data.get("skipped") and "tensorboard" in data["trackers"]
    for key in ("first_pct", "steady_pct", "thread_first_pct", "thread_steady_pct"):
        assert data[key]["n"] == 1, key
    assert set(data["first_step_ms"]) == {"none", "trackers", "thread"}
    assert "backend='thread'" in stdout and "targets:" in stdout
    if "mlflow" in data["trackers"]:
        assert data["mlflow_create_run"]["new_store_s"]["n"] == 1, data["mlflow_create_run"]
    if os.path.exists("/proc/thread-self/schedstat"):
        assert data["split"]["trackers"]["first"] is not None
        assert "where the training thread's time per step goes" in stdout


def _bare_loop() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        import bare_loop
    finally:
        sys.path.remove(str(BENCH))
    return bare_loop


def test_bare_loop_alternates_which_step_runs_first_by_window() -> None:
    """Whichever of two steps runs second on a batch is measured a little faster, so
    the harness alternates the order by window: the raw step runs before the batch is
    handed out in even windows and right after hookloop's step on it in odd windows;
    every batch gets exactly one raw step, and the timings stay in batch order."""
    bare_loop = _bare_loop()
    batches = bare_loop._batches(10)
    it = bare_loop._Interleaved(batches, torch.nn.Linear(32, 1), window=3)
    events: list[tuple[str, int]] = []
    real_raw_step = it._raw_step

    def raw_step(batch: Any) -> None:
        events.append(("raw", next(i for i, b in enumerate(batches) if b is batch)))
        real_raw_step(batch)

    it._raw_step = raw_step  # type: ignore[method-assign]
    for i, _ in enumerate(it):
        events.append(("hook", i))
    expected: list[tuple[str, int]] = []
    for i in range(10):
        pair = [("raw", i), ("hook", i)]
        expected += pair if (i // 3) % 2 == 0 else pair[::-1]
    assert events == expected
    assert len(it.raw) == len(it.hook) == 10


def test_bare_loop_reads_callgrind_dumps_in_dump_order(tmp_path: Path) -> None:
    """The dumps are numbered by callgrind; the final one (no number: the process's
    exit) is left out, and a file without a count is an error, not a zero."""
    read_dumps = _bare_loop().read_dumps
    for n, count in ((2, 700), (1, 500), (10, 900)):
        (tmp_path / f"cg.out.{n}").write_text(f"# callgrind format\nevents: Ir\nsummary: {count}\n")
    (tmp_path / "cg.out").write_text("events: Ir\nsummary: 123456\n")
    assert read_dumps(tmp_path, "cg.out") == [500, 700, 900]
    (tmp_path / "cg.out.11").write_text("events: Ir\n")
    with pytest.raises(ValueError, match=r"cg.out.11: no 'summary:' line"):
        read_dumps(tmp_path, "cg.out")


@pytest.mark.slow  # torch under valgrind: 6-8 minutes
@pytest.mark.timeout(1200)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_bare_loop_counts_instructions_under_callgrind() -> None:
    """The instruction count runs for real: one round of each contender, counted
    between the markers (a marker fired anywhere else would change the dump count)."""
    result = _bare_loop().instructions(rounds=1)
    assert "error" not in result, result
    raw, hook = result["per_step"]["raw"]["median"], result["per_step"]["hookloop"]["median"]
    # the tiny MLP's step is about 1.4 million instructions under valgrind; hookloop's
    # own work is a few percent of it, never a step's worth
    assert 1e5 < raw < 1e8 and 1e5 < hook < 1e8, result
    assert abs(hook - raw) < 0.5 * raw, result
