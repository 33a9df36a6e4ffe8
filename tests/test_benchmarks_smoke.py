"""Smoke test of the benchmark scripts: each runs on a tiny size so they cannot rot.

No timing is asserted here (figures on a shared CI machine are noise); the test checks
that every script runs, writes its JSON and prints its targets. The whole suite through
``run_gpu.sh`` is rehearsed in tests/test_gpu_rehearsal.py (fresh venv, no index).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
