"""Fixtures: an isolated, offline W&B environment holding fake secrets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from hookloop.testing import find_in_files


@dataclass
class WandbEnv:
    """Where W&B writes in a test, and the fake secrets it must never write."""

    root: Path
    api_key: str = "wbkey-5f3e9c1d7a2b4e6f8091a2b3c4d5e6f708192a3b"
    hparam_token: str = "hp-token-81c2d9e04f7a6b35"
    env_token: str = "svc-token-0d4b7c2e9a1f5e83"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every fake secret value."""
        return (self.api_key, self.hparam_token, self.env_token)

    def grep_secrets(self, *roots: Path) -> list[str]:
        """``file: secret`` for every fake secret found in a file under ``root`` and
        ``roots``."""
        return find_in_files([self.root, *roots], self.secrets)


@pytest.fixture(scope="session")
def wandb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for everything W&B writes in this session: the SDK reads some of
    its folders once per process, so they must not change between tests."""
    root = tmp_path_factory.mktemp("wandb-root")
    for sub in ("runs", "cache", "config", "data", "artifacts", "home"):
        (root / sub).mkdir()
    return root


@pytest.fixture
def wandb_env(
    wandb_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> WandbEnv:
    """Offline W&B writing under the session's ``wandb_root`` (each test's runs in a
    folder of their own) with fake secrets in the environment."""
    env = WandbEnv(wandb_root)
    runs = wandb_root / "runs" / tmp_path.name
    runs.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(runs))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(env.root / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(env.root / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(env.root / "data"))
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(env.root / "artifacts"))
    monkeypatch.setenv("NETRC", str(env.root / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_API_KEY", env.api_key)
    monkeypatch.setenv("MY_SERVICE_TOKEN", env.env_token)
    for name in ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD", "1")
    return env
