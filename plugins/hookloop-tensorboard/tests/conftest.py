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
