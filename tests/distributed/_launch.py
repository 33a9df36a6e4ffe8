"""Launch worker scripts under ``torchrun`` with two CPU processes (gloo) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_TIMEOUT = 120.0


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc), children before their parents."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.insert(0, child)
            stack.append(child)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Launch:
    returncode: int
    output: str
    out: Path

    def result(self, name: str, rank: int) -> dict[str, Any]:
        path = self.out / f"{name}.rank{rank}.json"
        assert path.exists(), f"{path.name} missing; torchrun output:\n{self.output[-6000:]}"
        return json.loads(path.read_text())

    def results(self, name: str, world: int = 2) -> list[dict[str, Any]]:
        return [self.result(name, r) for r in range(world)]


def torchrun(script: str, out: Path, *args: str, nproc: int = 2, autoload: bool = False,
             timeout: float = LAUNCH_TIMEOUT, env: dict[str, str] | None = None) -> Launch:
    """Run ``tests/distributed/<script>`` under torchrun on 127.0.0.1; the worker writes
    its results as JSON files under ``out``. Fails the test (no hang) after ``timeout``."""
    out.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("HOOKLOOP_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK",
                                     "WORLD_SIZE", "GROUP_RANK"))}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": str(HERE) + os.pathsep + full_env.get("PYTHONPATH", "")})
    if not autoload:
        full_env["HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    full_env.update(env or {})
    cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--nnodes=1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "--max-restarts=0", "--monitor-interval=0.2",
           str(HERE / script), str(out), *args]
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=str(out))
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts every worker in a session of its own: end them by pid first
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {script} {args} did not finish within {timeout:.0f}s (hang):\n"
                    f"{output[-6000:]}")
    return Launch(proc.returncode, output, out)
