"""Core test fixtures: a clean plugin environment for every test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hookloop import discovery

FAKE_SITE = Path(__file__).parent / "fixtures" / "site"


@pytest.fixture(autouse=True)
def _clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("HOOKLOOP_PLUGINS", "HOOKLOOP_BLOCK_PLUGINS", "HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD",
                "HOOKLOOP_TRACE"):
        monkeypatch.delenv(var, raising=False)
    discovery._AVAILABLE = None
    yield
    discovery._AVAILABLE = None


@pytest.fixture
def fake_dist(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make tests/fixtures/site an installed location: its hookloop-fake distribution
    is visible to importlib.metadata and its entry points are discoverable."""
    monkeypatch.syspath_prepend(str(FAKE_SITE))
    for mod in [m for m in sys.modules if m.startswith("hookloop_fake")]:
        monkeypatch.delitem(sys.modules, mod)
    discovery._AVAILABLE = None
    return FAKE_SITE
