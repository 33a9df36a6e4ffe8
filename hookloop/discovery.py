"""Installed plugins: the ``hookloop`` entry-point group, loaded once, with the
environment switches that allow or block plugins by name.

One name registered by two distributions is reported (a ``RuntimeWarning`` naming
both); the distribution whose normalised name sorts first wins, whatever the order of
the file system, and :attr:`AvailablePlugin.shadowed` names the others. A name that is
not installed gets "did you mean" suggestions and, for the plugins that hookloop's own
distributions provide (:data:`KNOWN_DISTRIBUTIONS`), the distribution to install."""

from __future__ import annotations

import difflib
import importlib.metadata as importlib_metadata
import inspect
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hookloop import hookspecs
from hookloop.hookspecs import ALIASES

__all__ = [
    "ENTRY_POINT_GROUP",
    "HOOK_NAMES",
    "KNOWN_DISTRIBUTIONS",
    "AvailablePlugin",
    "PluginError",
    "available_plugins",
    "did_you_mean",
    "missing_plugin_message",
    "unique_entry_points",
]

ENTRY_POINT_GROUP = "hookloop"
KNOWN_DISTRIBUTIONS: dict[str, str] = {
    "checkpoint": "hookloop-checkpoint",
    "early_stopping": "hookloop-earlystopping",
    "freeze": "hookloop-freeze",
    "gradual_unfreeze": "hookloop-freeze",
    "summary": "hookloop-summary",
    "tensorboard": "hookloop-tensorboard",
    "wandb": "hookloop-wandb",
    "mlflow": "hookloop-mlflow",
    "progress": "hookloop-progress",
}
"""Plugin name to the distribution of hookloop's that provides it; an install hint
names a distribution only for these names."""
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
    value: str = ""
    """The entry point's target, ``module:attribute``."""
    shadowed: list[str] = field(default_factory=list)
    """Other distributions that register the same name (``"dist version (target)"``);
    they are not loaded."""

    @property
    def always_on(self) -> bool:
        """True for a module or instance, which autoload registers as is."""
        return (self.obj is not None and not callable(self.obj)) or inspect.ismodule(self.obj)


_AVAILABLE: dict[str, AvailablePlugin] | None = None


def _impl_names(obj: Any) -> list[str]:
    """The canonical names of the hooks ``obj`` implements (aliases resolved)."""
    return sorted({ALIASES.get(n, n) for n in (*HOOK_NAMES, *ALIASES) if callable(getattr(obj, n, None))})


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_of(ep: Any) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return str(dist.metadata["Name"]), str(dist.version)


def unique_entry_points(group: str) -> dict[str, tuple[Any, list[Any]]]:
    """The entry points of ``group`` by name: the chosen one and the others that share
    its name, in a fixed order (normalised distribution name, then version and target),
    so the choice never depends on the order in which the file system lists them. A
    RuntimeWarning names every distribution of a name registered more than once."""
    by_name: dict[str, list[Any]] = {}
    for ep in importlib_metadata.entry_points(group=group):
        by_name.setdefault(ep.name, []).append(ep)
    out: dict[str, tuple[Any, list[Any]]] = {}
    for name, eps in by_name.items():
        eps.sort(key=lambda e: (_normalise(_dist_of(e)[0]), _dist_of(e)[1], e.value))
        chosen, *others = eps
        if others:
            dist = _dist_of(chosen)[0]
            names = ", ".join(f"{d} {v} ({e.value})" for e in eps for d, v in [_dist_of(e)])
            warnings.warn(
                f"hookloop: the name {name!r} in entry-point group {group!r} is registered by "
                f"{len(eps)} distributions: {names}; using {dist}'s (the first by distribution "
                "name). Uninstall the one you do not want, or register the other's object "
                "directly (plugins=[its_class(...)])",
                RuntimeWarning,
                stacklevel=3,
            )
        out[name] = (chosen, others)
    return out


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Candidates close to ``name``: the same name up to case, ``-`` and ``_`` first
    (``earlystopping`` -> ``early_stopping``), then :func:`difflib.get_close_matches`."""
    pool = list(dict.fromkeys(candidates))
    key = re.sub(r"[-_\s]", "", name).lower()
    exact = [c for c in pool if re.sub(r"[-_\s]", "", c).lower() == key and c != name]
    close = [c for c in difflib.get_close_matches(name, pool, n=n + 1, cutoff=0.75) if c != name]
    return list(dict.fromkeys([*exact, *close]))[:n]


def missing_plugin_message(name: str, found: Mapping[str, AvailablePlugin]) -> str:
    """Why ``name`` cannot be loaded when it is not installed: the installed names, the
    near misses, and what to install when a hookloop distribution provides it."""
    installed = ", ".join(sorted(found)) or "none installed"
    text = f"no hookloop plugin named {name!r} is installed (available: {installed})"
    close = did_you_mean(name, [*found, *KNOWN_DISTRIBUTIONS])
    if close:
        hints = [repr(c) if c in found else f"{c!r} (not installed: pip install {KNOWN_DISTRIBUTIONS[c]})"
                 for c in close]
        text += f"; did you mean {' or '.join(hints)}?"
    elif name in KNOWN_DISTRIBUTIONS:
        dist = KNOWN_DISTRIBUTIONS[name]
        text += (f"; it is provided by the distribution {dist}: pip install {dist} "
                 f"(from a checkout: pip install -e plugins/{dist})")
    else:
        text += ("; install the distribution that provides it, or pass the plugin object "
                 "itself (plugins=[MyPlugin()])")
    return text


def available_plugins(refresh: bool = False) -> dict[str, AvailablePlugin]:
    """Every entry point in the ``hookloop`` group by name, imported once and cached.

    A plugin whose import fails is reported with a warning naming it and kept with its
    ``error``; the others still load. A name registered by two distributions is
    reported with a warning naming both, and the same one is always chosen (see
    :func:`unique_entry_points`). Environment switches: ``HOOKLOOP_PLUGINS`` (comma
    separated allowlist; empty allows none) and ``HOOKLOOP_BLOCK_PLUGINS`` (blocklist).
    """
    global _AVAILABLE
    if _AVAILABLE is not None and not refresh:
        return _AVAILABLE
    found: dict[str, AvailablePlugin] = {}
    for ep, others in unique_entry_points(ENTRY_POINT_GROUP).values():
        distribution, version = _dist_of(ep)
        entry = AvailablePlugin(
            name=ep.name, distribution=distribution, version=version, value=ep.value,
            shadowed=[f"{d} {v} ({o.value})" for o in others for d, v in [_dist_of(o)]],
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
        found[ep.name] = entry
    _AVAILABLE = found
    return found


