"""Declared plugin ordering (``hookloop_after`` / ``hookloop_before``): a stable
topological sort that keeps the registration order wherever no declaration says
otherwise."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hookloop.discovery import PluginError

__all__ = ["declared_order"]


def declared_order(impls: list[Any], hook: str, aka: Mapping[str, frozenset[str]]) -> list[Any]:
    """Reorder implementations so that ``hookloop_after``/``hookloop_before`` hold,
    keeping the given order wherever no declaration says otherwise (stable Kahn sort).
    Wrappers keep their place ahead of plain implementations. ``aka`` maps a registered
    name to every name a declaration may use for it."""
    wrappers = [i for i in impls if i.wrapper or i.hookwrapper]
    plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
    return [*_stable_topo_sort(wrappers, hook, aka), *_stable_topo_sort(plain, hook, aka)]


def _stable_topo_sort(impls: list[Any], hook: str, aka: Mapping[str, frozenset[str]]) -> list[Any]:
    if not any(
        getattr(i.plugin, "hookloop_after", None) or getattr(i.plugin, "hookloop_before", None)
        for i in impls
    ):
        return impls
    known = [aka.get(i.plugin_name, frozenset((i.plugin_name,))) for i in impls]

    def matching(names: Iterable[str]) -> list[int]:
        wanted = set(names)
        return [k for k, ks in enumerate(known) if ks & wanted]

    edges: list[set[int]] = [set() for _ in impls]  # a -> b: a runs before b
    for me, impl in enumerate(impls):
        for other in matching(_names(getattr(impl.plugin, "hookloop_after", ()), hook)):
            if other != me:
                edges[other].add(me)
        for other in matching(_names(getattr(impl.plugin, "hookloop_before", ()), hook)):
            if other != me:
                edges[me].add(other)
    indeg = [0] * len(impls)
    for bs in edges:
        for b in bs:
            indeg[b] += 1
    ready = [k for k in range(len(impls)) if indeg[k] == 0]
    out: list[int] = []
    while ready:
        k = ready.pop(0)
        out.append(k)
        for b in edges[k]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
        ready.sort()
    if len(out) != len(impls):
        cycle = sorted(impls[k].plugin_name for k in set(range(len(impls))) - set(out))
        raise PluginError(f"plugin ordering has a cycle between {cycle} (hookloop_after/_before)")
    return [impls[k] for k in out]


def _names(value: Any, hook: str) -> Iterable[str]:
    """Plugin names from an ordering declaration: a name, a sequence of names (every
    hook), or a mapping of hook name to names (``"*"``: every other hook)."""
    if isinstance(value, Mapping):
        value = value.get(hook, value.get("*", ()))
    if isinstance(value, str):
        return (value,)
    return tuple(value or ())
