"""Shared fixtures: read TensorBoard event files back with TensorBoard's own reader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea


def load_events(log_dir: str | Path) -> ea.EventAccumulator:
    """Every event under ``log_dir`` (no sampling), as TensorBoard would load them."""
    acc = ea.EventAccumulator(str(log_dir), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


@pytest.fixture
def read_events() -> Callable[[Any], ea.EventAccumulator]:
    """A function that loads the event files of a log directory."""
    return load_events


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")


class TensorBoardServer:
    """A real ``tensorboard`` process serving one log directory on 127.0.0.1; read it
    back through its HTTP data API (what the dashboards show)."""

    def __init__(self, log_dir: Path, *extra: str) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_dir.parent / f"tensorboard-{port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host",
                 "127.0.0.1", "--port", str(port), *extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def get(self, path: str, body: Any = None, timeout: float = 120) -> Any:
        """``GET`` (or ``POST`` a JSON ``body`` to) ``path``; the decoded JSON reply, or
        the text of a non-JSON one. Retries until the server answers."""
        import json
        import time
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {self.log.read_text()[-2000:]}")
            try:
                req = urllib.request.Request(self.url + path, data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=30) as reply:
                    text = reply.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            return json.loads(text)
        except ValueError:
            return text

    def stop(self) -> None:
        """Kill the server (its process group) and wait for it."""
        import os
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def tensorboard_server() -> Any:
    """A function ``(log_dir, *args) -> TensorBoardServer``; servers stop at the end."""
    servers: list[TensorBoardServer] = []

    def start(log_dir: Path, *extra: str) -> TensorBoardServer:
        servers.append(TensorBoardServer(Path(log_dir), *extra))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
