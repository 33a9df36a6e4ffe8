"""Plugin management on pluggy: registration, entry-point discovery, ordering, fault
policies and the compiled call plan the loop dispatches through."""

from __future__ import annotations

import difflib
import importlib.metadata as importlib_metadata
import inspect
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from hookloop import hookspecs
from hookloop._dispatch import PlanEntry, compile_hook, get_only

__all__ = [
    "ENTRY_POINT_GROUP",
    "AvailablePlugin",
    "Hooks",
    "PluginError",
    "PluginManager",
    "available_plugins",
    "hookimpl",
]

hookimpl = pluggy.HookimplMarker("hookloop")
"""Marker for hook implementations: ``@hookimpl`` or ``@hookimpl(tryfirst=True)``."""

ENTRY_POINT_GROUP = "hookloop"
# in definition order, which is firing order within a phase
HOOK_NAMES: tuple[str, ...] = tuple(n for n in vars(hookspecs) if n.startswith("on_"))
POLICIES = ("raise", "warn", "disable")


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
    return sorted(n for n in HOOK_NAMES if callable(getattr(obj, n, None)))


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


class Hooks:
    """The compiled callers of every hook; an attribute is ``None`` when no plugin
    implements that hook, so the loop can skip it without a call::

        h = loop.hooks.on_train_batch_end
        if h is not None:
            h(loop, outputs, batch, batch_idx)
    """

    __slots__ = HOOK_NAMES

    def __init__(self) -> None:
        for name in HOOK_NAMES:
            setattr(self, name, None)


@dataclass
class _Policy:
    plugin_name: str
    mode: str
    max_failures: int
    failures: int = 0
    consecutive: int = 0
    disabled: bool = False
    warned: bool = False
    last_error: str = ""
    hooks_failed: set[str] = field(default_factory=set)


class PluginManager(pluggy.PluginManager):
    """pluggy's PluginManager with hookloop's hookspecs, compiled dispatch, declared
    ordering, fault policies and entry-point loading.

    Plugins may declare, as attributes:

    - ``hookloop_on_error``: ``"raise"`` (default), ``"warn"`` or ``"disable"``;
    - ``hookloop_max_failures``: consecutive failures before ``disable`` stops calling
      the plugin (default 3);
    - ``hookloop_after`` / ``hookloop_before``: names of plugins whose implementations
      must run before / after this plugin's, for every hook both implement; or a
      mapping of hook name to names to order only those hooks (``"*"``: the others);
    - ``hookloop_rank_zero_only``: call only on the global rank 0 process.
    """

    def __init__(self) -> None:
        super().__init__("hookloop")
        self.add_hookspecs(hookspecs)
        self.hooks = Hooks()
        self.rank = 0
        self._policies: dict[str, _Policy] = {}
        self._once: dict[tuple[str, str], list[bool]] = {}
        self._trace = _env_flag("HOOKLOOP_TRACE")
        self._plan: dict[str, list[PlanEntry]] = {}

    # -- registration ------------------------------------------------------------

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        """Accept ``@hookimpl``-marked callables and plain callables named after a hook."""
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in HOOK_NAMES:
            member = getattr(plugin, name, None)
            if callable(member) and not inspect.isclass(member):
                opts = {}
        return opts

    def register(  # type: ignore[override]
        self,
        plugin: Any,
        name: str | None = None,
        *,
        on_error: str | None = None,
        max_failures: int | None = None,
    ) -> str:
        """Register ``plugin`` (object, class instance or module) and recompile.

        Returns the registered name; a second plugin with the same name gets ``-2``,
        ``-3``... appended. Raises :class:`PluginError` for an unknown hook name or an
        argument the hook's spec lacks, naming the plugin and the hook.
        """
        base = name or getattr(plugin, "hookloop_name", None) or _default_name(plugin)
        final = base
        n = 2
        while self.get_plugin(final) is not None or final in self._name2plugin:
            final = f"{base}-{n}"
            n += 1
        mode = on_error or getattr(plugin, "hookloop_on_error", "raise")
        if mode not in POLICIES:
            raise PluginError(f"plugin {final!r}: on_error={mode!r}; expected one of {POLICIES}")
        limit = max_failures if max_failures is not None else getattr(
            plugin, "hookloop_max_failures", 3
        )
        if not isinstance(limit, int) or limit <= 0:
            raise PluginError(f"plugin {final!r}: max_failures={limit!r}; expected int > 0")
        unknown = self._unknown_hooks(plugin)
        if unknown:
            hook = unknown[0]
            close = difflib.get_close_matches(hook, HOOK_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PluginError(
                f"plugin {final!r} implements unknown hook {hook!r}{hint} "
                f"(known hooks: {', '.join(HOOK_NAMES)})"
            )
        try:
            registered = super().register(plugin, final)
        except pluggy.PluginValidationError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise PluginError(f"plugin {final!r}: {detail}") from exc
        except ValueError as exc:
            raise PluginError(f"plugin {final!r}: {exc}") from exc
        assert registered is not None
        self._policies[registered] = _Policy(registered, mode, limit)
        try:
            self.recompile()
        except (PluginError, TypeError) as exc:  # leave nothing half-registered
            super().unregister(name=registered)
            del self._policies[registered]
            self.recompile()
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"plugin {registered!r}: {exc}") from exc
        return registered

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        out = []
        for attr in dir(plugin):
            try:
                member = getattr(plugin, attr)
            except Exception:
                continue
            marked = getattr(member, "hookloop_impl", None) is not None
            if marked and attr not in HOOK_NAMES:
                out.append(attr)
        return out

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        """Unregister a plugin (by object or name) and recompile."""
        removed = super().unregister(plugin, name)
        for key in [k for k in self._policies if self.get_plugin(k) is None]:
            del self._policies[key]
        self.recompile()
        return removed

    def load(self, spec: str, options: Mapping[str, Any] | None = None) -> str:
        """Instantiate the installed plugin ``spec`` (entry-point name) with ``options``
        and register it under that name. Raises PluginError naming what is available."""
        found = available_plugins()
        entry = found.get(spec)
        if entry is None:
            names = ", ".join(sorted(found)) or "none installed"
            raise PluginError(
                f"no hookloop plugin named {spec!r} is installed (available: {names}); "
                f"install its distribution, e.g. pip install hookloop-{spec.replace('_', '')}"
            )
        if entry.blocked:
            raise PluginError(f"plugin {spec!r} is blocked ({entry.blocked})")
        if entry.error:
            raise PluginError(f"plugin {spec!r} failed to import: {entry.error}")
        obj = entry.obj
        if self.get_plugin(spec) is not None:  # already enabled: build nothing new
            if options:
                raise PluginError(f"plugin {spec!r} is already registered; options {dict(options)} "
                                  "would be ignored")
            return spec
        if inspect.ismodule(obj) or not callable(obj):
            if options:
                raise PluginError(f"plugin {spec!r} is always-on and takes no options")
            plugin = obj
        else:
            try:
                plugin = obj(**dict(options or {}))
            except TypeError as exc:
                raise PluginError(f"plugin {spec!r}: bad options {dict(options or {})}: {exc}") from exc
        if self.is_registered(plugin):  # an always-on module registered by autoload
            return self.get_name(plugin) or spec
        return self.register(plugin, spec)

    def load_autoload_plugins(self) -> list[str]:
        """Register every installed always-on plugin (module or instance entry points),
        unless ``HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD`` is set. Returns the names."""
        if _env_flag("HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD"):
            return []
        names = []
        for name, entry in available_plugins().items():
            if entry.obj is None or entry.blocked or entry.error:
                continue
            if inspect.ismodule(entry.obj) or not callable(entry.obj):
                if self.get_plugin(name) is None and not self.is_registered(entry.obj):
                    names.append(self.register(entry.obj, name))
        return names

    # -- plan ----------------------------------------------------------------------

    def set_rank(self, rank: int) -> None:
        """Set the global rank; rank-zero-only plugins are left out of the plan when != 0."""
        if rank != self.rank:
            self.rank = rank
            self.recompile()

    def plan_entries(self, hook_name: str) -> list[PlanEntry]:
        """The implementations of a hook in call order, with their policies applied."""
        caller = getattr(self.hook, hook_name)
        impls = list(reversed(caller.get_hookimpls()))  # pluggy's call order
        # wrappers first as pluggy runs them; keep relative order
        impls = _declared_order(impls, hook_name)
        entries = []
        for impl in impls:
            plugin = impl.plugin
            if self.rank != 0 and getattr(plugin, "hookloop_rank_zero_only", False):
                continue
            policy = self._policies.get(impl.plugin_name)
            if policy is not None and policy.disabled:
                continue
            entry = PlanEntry(impl)
            if policy is not None and policy.mode != "raise":
                entry.on_failure = self._failure_handler(policy, hook_name)
                if policy.mode == "disable":
                    entry.on_success = _reset_consecutive(policy)
            only_spec = get_only(impl)
            if only_spec is not None and only_spec.once:
                entry.once_cell = self._once.setdefault((impl.plugin_name, hook_name), [True])
            entries.append(entry)
        return entries

    def recompile(self) -> None:
        """Rebuild the compiled caller of every hook (called on every registration change)."""
        hookexec = self._hookexec
        for name in HOOK_NAMES:
            entries = self.plan_entries(name)
            self._plan[name] = entries
            spec = getattr(self.hook, name).spec
            firstresult = bool(spec.opts.get("firstresult")) if spec else False
            setattr(
                self.hooks,
                name,
                compile_hook(name, spec.argnames, entries, firstresult=firstresult,
                             hookexec=hookexec, trace=self._trace),
            )

    def plan(self) -> dict[str, list[str]]:
        """Hook name to the plugin names it calls, in call order."""
        return {name: [e.impl.plugin_name for e in self._plan.get(name, [])] for name in HOOK_NAMES}

    def format_plan(self) -> str:
        """The printable execution plan of every hook, with filters and policies."""
        lines = []
        for name in HOOK_NAMES:
            entries = self._plan.get(name, [])
            lines.append(f"{name}:" + ("" if entries else " (no implementations; not called)"))
            for i, e in enumerate(entries, 1):
                notes = []
                impl = e.impl
                if impl.wrapper or impl.hookwrapper:
                    notes.append("wrapper")
                if impl.tryfirst:
                    notes.append("tryfirst")
                if impl.trylast:
                    notes.append("trylast")
                only_spec = get_only(impl)
                if only_spec is not None:
                    notes.append(_describe_only(only_spec))
                policy = self._policies.get(impl.plugin_name)
                if policy is not None and policy.mode != "raise":
                    notes.append(f"on_error={policy.mode}")
                extra = f"  [{', '.join(notes)}]" if notes else ""
                lines.append(f"  {i}. {impl.plugin_name}{extra}")
        return "\n".join(lines)

    # -- faults --------------------------------------------------------------------

    def _failure_handler(self, policy: _Policy, hook_name: str) -> Any:
        def on_failure(exc: BaseException) -> None:
            policy.failures += 1
            policy.consecutive += 1
            policy.hooks_failed.add(hook_name)
            policy.last_error = f"{type(exc).__name__}: {exc}"
            if not policy.warned:
                policy.warned = True
                warnings.warn(
                    f"hookloop plugin {policy.plugin_name!r} failed in {hook_name}: "
                    f"{policy.last_error} (policy {policy.mode!r}; training continues)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if policy.mode == "disable" and policy.consecutive >= policy.max_failures:
                policy.disabled = True
                warnings.warn(
                    f"hookloop plugin {policy.plugin_name!r} disabled after "
                    f"{policy.consecutive} consecutive failures (last: {policy.last_error})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.recompile()

        return on_failure

    def failure_summary(self) -> list[str]:
        """One line per plugin that failed since the last reset."""
        return [
            f"{p.plugin_name}: {p.failures} failure(s) in {', '.join(sorted(p.hooks_failed))}"
            f" (policy {p.mode}{', disabled' if p.disabled else ''}); last: {p.last_error}"
            for p in self._policies.values()
            if p.failures
        ]

    def reset_run_state(self) -> None:
        """Re-arm ``once`` filters and clear failure counts for a new fit."""
        for cell in self._once.values():
            cell[0] = True
        changed = False
        for p in self._policies.values():
            changed |= p.disabled
            p.failures = p.consecutive = 0
            p.disabled = p.warned = False
            p.hooks_failed.clear()
        if changed:
            self.recompile()

    def plugin_items(self) -> list[tuple[str, Any]]:
        """(name, plugin) pairs in registration order."""
        return [(n, p) for n, p in self._name2plugin.items() if p is not None]


def _reset_consecutive(policy: _Policy) -> Any:
    def on_success() -> None:
        policy.consecutive = 0

    return on_success


def _describe_only(o: Any) -> str:
    parts = []
    if o.every_n_steps:
        parts.append(f"every {o.every_n_steps} steps")
    if o.every_n_epochs:
        parts.append(f"every {o.every_n_epochs} epochs")
    if o.once:
        parts.append("once")
    if o.from_step is not None:
        parts.append(f"from step {o.from_step}")
    if o.until_step is not None:
        parts.append(f"until step {o.until_step}")
    return ", ".join(parts)


def _default_name(plugin: Any) -> str:
    if inspect.ismodule(plugin):
        return plugin.__name__
    return type(plugin).__name__ if not inspect.isclass(plugin) else plugin.__name__


def _declared_order(impls: list[Any], hook: str) -> list[Any]:
    """Reorder implementations so that ``hookloop_after``/``hookloop_before`` hold,
    keeping pluggy's order wherever no declaration says otherwise (stable Kahn sort).
    Wrappers keep their place ahead of plain implementations."""
    # wrappers keep pluggy's place around the plain implementations
    wrappers = [i for i in impls if i.wrapper or i.hookwrapper]
    plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
    return [*_stable_topo_sort(wrappers, hook), *_stable_topo_sort(plain, hook)]


def _stable_topo_sort(impls: list[Any], hook: str) -> list[Any]:
    names = [i.plugin_name for i in impls]
    if not any(
        getattr(i.plugin, "hookloop_after", None) or getattr(i.plugin, "hookloop_before", None)
        for i in impls
    ):
        return impls
    index = {n: k for k, n in enumerate(names)}
    edges: dict[str, set[str]] = {n: set() for n in names}  # a -> b: a runs before b
    for impl in impls:
        me = impl.plugin_name
        for other in _names(getattr(impl.plugin, "hookloop_after", ()), hook):
            if other in index:
                edges[other].add(me)
        for other in _names(getattr(impl.plugin, "hookloop_before", ()), hook):
            if other in index:
                edges[me].add(other)
    indeg = {n: 0 for n in names}
    for bs in edges.values():
        for b in bs:
            indeg[b] += 1
    ready = sorted((n for n in names if indeg[n] == 0), key=index.__getitem__)
    out: list[str] = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for b in edges[n]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
                ready.sort(key=index.__getitem__)
    if len(out) != len(names):
        cycle = sorted(set(names) - set(out))
        raise PluginError(f"plugin ordering has a cycle between {cycle} (hookloop_after/_before)")
    by_name = {i.plugin_name: i for i in impls}
    return [by_name[n] for n in out]


def _names(value: Any, hook: str) -> Iterable[str]:
    """Plugin names from an ordering declaration: a name, a sequence of names (every
    hook), or a mapping of hook name to names (``"*"``: every other hook)."""
    if isinstance(value, Mapping):
        value = value.get(hook, value.get("*", ()))
    if isinstance(value, str):
        return (value,)
    return tuple(value or ())
