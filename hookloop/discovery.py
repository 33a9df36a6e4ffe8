"""Installed plugins: the ``hookloop`` entry-point group, loaded once, with the
environment switches that allow or block plugins by name."""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from hookloop import hookspecs
from hookloop.hookspecs import ALIASES

__all__ = ["ENTRY_POINT_GROUP", "HOOK_NAMES", "AvailablePlugin", "PluginError", "available_plugins"]

ENTRY_POINT_GROUP = "hookloop"
HOOK_NAMES: tuple[str, ...] = tuple(n for n in vars(hookspecs) if n.startswith("on_"))
"""Every hook name, canonical only (aliases are in ``hookspecs.ALIASES``), in firing order."""


class PluginError(Exception):
    """A plugin could not be registered, found or loaded; the message names it."""


def _env_flag(name: str) -> bool:
    """An on/off environment switch: unset, empty and ``0`` mean off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _plugin_filter(name: str) -> str | None:
    """Why a plugin is blocked by the environment, or None when it is allowed."""
    allow = _env_list("HOOKLOOP_PLUGINS")
    if allow is not None and name not in allow:
        return "not in HOOKLOOP_PLUGINS"
    block = _env_list("HOOKLOOP_BLOCK_PLUGINS") or []
    if name in block:
        return "in HOOKLOOP_BLOCK_PLUGINS"
    return None


@dataclass
class AvailablePlugin:
    """An entry point of the ``hookloop`` group, loaded once.

    ``obj`` is what the entry point refers to: a class or factory (enabled by name, with
    options) or a module/instance (always-on: registered by autoload).
    """

    name: str
    distribution: str
    version: str
    obj: Any = None
    error: str | None = None
    blocked: str | None = None
    hooks: list[str] = field(default_factory=list)

    @property
    def always_on(self) -> bool:
        """True for a module or instance, which autoload registers as is."""
        return (self.obj is not None and not callable(self.obj)) or inspect.ismodule(self.obj)


_AVAILABLE: dict[str, AvailablePlugin] | None = None


def _impl_names(obj: Any) -> list[str]:
    """The canonical names of the hooks ``obj`` implements (aliases resolved)."""
    return sorted({ALIASES.get(n, n) for n in (*HOOK_NAMES, *ALIASES) if callable(getattr(obj, n, None))})


def available_plugins(refresh: bool = False) -> dict[str, AvailablePlugin]:
    """Every entry point in the ``hookloop`` group by name, imported once and cached.

    A plugin whose import fails is reported with a warning naming it and kept with its
    ``error``; the others still load. Environment switches: ``HOOKLOOP_PLUGINS`` (comma
    separated allowlist; empty allows none) and ``HOOKLOOP_BLOCK_PLUGINS`` (blocklist).
    """
    global _AVAILABLE
    if _AVAILABLE is not None and not refresh:
        return _AVAILABLE
    found: dict[str, AvailablePlugin] = {}
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        entry = AvailablePlugin(
            name=ep.name,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
        )
        entry.blocked = _plugin_filter(ep.name)
        if entry.blocked is None:
            try:
                entry.obj = ep.load()
                entry.hooks = _impl_names(entry.obj)
            except Exception as exc:  # a broken plugin must not stop the others
                entry.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"hookloop plugin {ep.name!r} ({ep.value}) failed to import: "
                    f"{entry.error}; the other plugins still load",
                    RuntimeWarning,
                    stacklevel=2,
                )
        found.setdefault(ep.name, entry)
    _AVAILABLE = found
    return found


