"""Fixtures: fake secrets, a shared SQLite tracking store and a real `mlflow server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hookloop.testing import find_in_files


@dataclass
class MlflowEnv:
    """The fake secrets of a test, and a helper to look for them on disk."""

    store_dir: Path
    tracking_token: str = "mlf-token-3a9c51e07b2d4f86"
    hparam_token: str = "hp-token-c4e8a1b93d6f2750"
    env_token: str = "svc-token-7f1e2d3c4b5a6978"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every fake secret value."""
        return (self.tracking_token, self.hparam_token, self.env_token)

    @property
    def uri(self) -> str:
        """The SQLite store the default configuration writes to (``save_dir``)."""
        return f"sqlite:///{self.store_dir.as_posix()}/mlflow.db"

    def grep_secrets(self, *roots: Path) -> list[str]:
        """``file: secret`` for every fake secret found in a file under the store and
        ``roots``."""
        return find_in_files([self.store_dir, *roots], self.secrets)


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the session (creating its tables takes seconds); tests
    tell their runs apart by run id and experiment name."""
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture
def mlflow_env(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowEnv:
    """Fake secrets in the environment, no tracking URI from outside, short HTTP
    retries."""
    env = MlflowEnv(store_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", env.tracking_token)
    monkeypatch.setenv("MY_SERVICE_TOKEN", env.env_token)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    return env


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `mlflow server` process (its own process group)."""

    process: subprocess.Popen[bytes]
    url: str
    backend_uri: str
    log: Path

    def stop(self) -> None:
        """Kill the server and every process it started; wait for them."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Server]:
    """`mlflow server` on 127.0.0.1 and a free port, with its backend store and
    artifacts in ``tmp_path``; stopped at the end of the test."""
    port = free_port()
    backend = f"sqlite:///{(tmp_path / 'server.db').as_posix()}"
    log = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", backend,
             "--artifacts-destination", (tmp_path / "server-artifacts").as_uri()],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", backend, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        server.stop()
