"""Launch worker scripts under ``torchrun`` with two CPU processes (gloo) on 127.0.0.1.

A launch can fail before the worker's own code runs: the rendezvous, a clash on the
master port picked by :func:`free_port` (another process may take it between the probe
and torchrun's bind), or the creation of the gloo process group on a busy machine. Each
worker writes ``OUT/started.rank<N>`` once its process group is up (``_worker_common.init``).
When a launch ends without every rank's handshake, or does not produce them within
``setup_timeout``, it is retried once on a fresh port and a line says so. A launch whose
workers all started is never retried: its failure is the test's to judge.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Liveness bounds only (nothing is asserted about durations): an idle two-core machine
# starts both workers in ~5 s and runs the longest launch in ~10 s; these leave room
# for a machine more than ten times slower.
SETUP_TIMEOUT = 150.0
LAUNCH_TIMEOUT = 240.0
# pytest-timeout for a test that launches: a failed set-up plus a full second attempt fit.
TEST_TIMEOUT = int(SETUP_TIMEOUT + LAUNCH_TIMEOUT + 60)
HANDSHAKE = "started.rank{rank}"  # written by _worker_common.init


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


def _kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL torchrun and its workers (each in a session of its own: by pid)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_handshakes(out: Path, nproc: int) -> list[int]:
    """The ranks that have not written their handshake file under ``out``."""
    return [r for r in range(nproc) if not (out / HANDSHAKE.format(rank=r)).exists()]


@dataclass
class Launch:
    """What one (possibly retried) torchrun launch left: exit status, merged output of
    the last attempt, the output folder, and how many attempts it took."""

    returncode: int
    output: str
    out: Path
    attempts: int = 1

    @property
    def retried(self) -> bool:
        """Whether the first attempt failed in its set-up and was launched again."""
        return self.attempts > 1

    def result(self, name: str, rank: int) -> dict[str, Any]:
        """The JSON a worker wrote as ``OUT/<name>.rank<rank>.json``."""
        path = self.out / f"{name}.rank{rank}.json"
        assert path.exists(), f"{path.name} missing; torchrun output:\n{self.output[-6000:]}"
        return json.loads(path.read_text())

    def results(self, name: str, world: int = 2) -> list[dict[str, Any]]:
        """``result(name, r)`` for every rank."""
        return [self.result(name, r) for r in range(world)]


def _attempt(cmd: list[str], env: dict[str, str], out: Path, nproc: int,
             timeout: float, setup_timeout: float) -> tuple[int | None, str, str]:
    """Run torchrun once. Returns ``(returncode, output, outcome)`` where outcome is
    ``"exited"``, ``"setup-hang"`` (no handshake from every rank within
    ``setup_timeout``: killed) or ``"hang"`` (started, not done within ``timeout``)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                cwd=str(out))
        start = time.monotonic()
        outcome = "exited"
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if elapsed > setup_timeout and missing_handshakes(out, nproc):
                    outcome = "setup-hang"
                elif elapsed > timeout:
                    outcome = "hang"
                if outcome != "exited":
                    _kill_tree(proc)
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)
        finally:
            if proc.poll() is None:  # an error or an interrupt in this process
                _kill_tree(proc)
        log.seek(0)
        return proc.returncode, log.read(), outcome


def torchrun(script: str, out: Path, *args: str, nproc: int = 2, autoload: bool = False,
             timeout: float = LAUNCH_TIMEOUT, setup_timeout: float = SETUP_TIMEOUT,
             env: dict[str, str] | None = None) -> Launch:
    """Run ``tests/distributed/<script>`` under torchrun on 127.0.0.1; the worker writes
    its results as JSON files under ``out``. A failure before every rank wrote its
    handshake is retried once on a fresh port (with a printed line); a hang fails the
    test after ``timeout``."""
    out.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("HOOKLOOP_", "TORCHELASTIC_", "MASTER_", "RANK", "LOCAL_RANK",
                                     "WORLD_SIZE", "GROUP_RANK"))}
    # PYTHONFAULTHANDLER: a worker killed by SIGABRT/SIGSEGV prints where it was (in the
    # set-up, in a test's code, or in the interpreter's exit)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                     "PYTHONPATH": str(HERE) + os.pathsep + full_env.get("PYTHONPATH", "")})
    if not autoload:
        full_env["HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    full_env.update(env or {})
    before = {p.name for p in out.iterdir()}
    failures: list[str] = []
    for attempt in (1, 2):
        port = free_port()
        cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--nnodes=1", "--master-addr=127.0.0.1",
               f"--master-port={port}", "--max-restarts=0", "--monitor-interval=0.2",
               str(HERE / script), str(out), *args]
        returncode, output, outcome = _attempt(cmd, full_env, out, nproc, timeout, setup_timeout)
        missing = missing_handshakes(out, nproc)
        if outcome == "hang":
            pytest.fail(f"torchrun {script} {args} did not finish within {timeout:.0f}s (hang):\n"
                        f"{output[-6000:]}")
        if not missing:  # the workers' own code ran: success or a real failure, as is
            assert returncode is not None
            return Launch(returncode, output, out, attempt)
        what = (f"no handshake from rank(s) {missing} within {setup_timeout:.0f}s"
                if outcome == "setup-hang" else
                f"exit status {returncode} before rank(s) {missing} wrote a handshake")
        failures.append(f"attempt {attempt} (port {port}): {what}\n{output[-4000:]}")
        if attempt == 1:
            print(f"hookloop tests: torchrun {script} failed in its set-up ({what}); "
                  f"retrying once on a fresh port", flush=True)
            for name in {p.name for p in out.iterdir()} - before:  # a clean slate
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    pytest.fail(f"torchrun {script} {args} failed in its set-up twice:\n" + "\n".join(failures))
