"""Plugin management on pluggy: registration, ordering, fault policies and the compiled
call plan the loop dispatches through (entry-point discovery is in
:mod:`hookloop.discovery`)."""

from __future__ import annotations

import difflib
import inspect
import itertools
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from hookloop import hookspecs
from hookloop._dispatch import PlanEntry, call_argnames, compile_hook, get_only
from hookloop._ordering import declared_order
from hookloop.discovery import (
    ENTRY_POINT_GROUP,
    HOOK_NAMES,
    AvailablePlugin,
    PluginError,
    _env_flag,
    available_plugins,
    did_you_mean,
    missing_plugin_message,
)
from hookloop.hookspecs import ALIASES
from hookloop.specs import (
    NOT_HOOKS_ATTRIBUTE,
    SPEC_FORMS,
    check_plugin_object,
    is_function,
    not_a_plugin,
    not_hooks,
    short,
    signature,
    spec_items,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "HOOK_NAMES",
    "ISOLATED_HOOKS",
    "NAME_OPTION",
    "AvailablePlugin",
    "Callers",
    "Hooks",
    "PluginError",
    "PluginManager",
    "available_plugins",
    "base_name",
    "hookimpl",
]

hookimpl = pluggy.HookimplMarker("hookloop")
"""Marker for hook implementations: ``@hookimpl`` or ``@hookimpl(tryfirst=True)``."""

ISOLATED_HOOKS: tuple[str, ...] = ("on_exception", "on_close")
"""Hooks whose implementations are all called even when one raises: an ``Exception`` or
``SystemExit`` is logged (logger ``hookloop``, with its traceback) whatever the plugin's
fault policy, so it never replaces the exception in flight; plugins disabled by their
policy are still called. KeyboardInterrupt propagates."""
NAME_OPTION = "hookloop_name"
"""The reserved option of the config forms that names a plugin instance."""
_ISOLATED_CATCHES: tuple[type[BaseException], ...] = (Exception, SystemExit)
POLICIES = ("raise", "warn", "disable")
_log = logging.getLogger("hookloop")


class Callers:
    """The compiled callers of every hook; an attribute is ``None`` when no plugin
    implements that hook, so the loop can skip it without a call::

        h = pm.callers.on_train_batch_end
        if h is not None:
            h(loop, outputs, batch, batch_idx)

    A caller takes the spec's arguments positionally, in spec order, or by keyword.
    """

    __slots__ = HOOK_NAMES

    def __init__(self) -> None:
        for name in HOOK_NAMES:
            setattr(self, name, None)


Hooks = Callers
"""Former name of :class:`Callers`, kept for one release."""


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


def base_name(plugin: Any) -> str:
    """The name a plugin is registered under when no name is given: its
    ``hookloop_name`` attribute, else its class name (a module's or a class's own name).
    Ordering declarations (``hookloop_after``/``hookloop_before``) match it too."""
    name = getattr(plugin, "hookloop_name", None)
    if isinstance(name, str) and name:
        return name
    if inspect.ismodule(plugin) or inspect.isclass(plugin):
        return plugin.__name__
    return type(plugin).__name__


class PluginManager(pluggy.PluginManager):
    """pluggy's PluginManager with hookloop's hookspecs, compiled dispatch
    (:attr:`callers`), declared ordering, fault policies and entry-point loading.

    Plugins are called in registration order (wrappers first, outermost first; then
    ``tryfirst``, normal, ``trylast``), then reordered by these declarations. Plugins
    may declare, as attributes:

    - ``hookloop_name``: the name to register under when none is given;
    - ``hookloop_on_error``: ``"raise"`` (default), ``"warn"`` or ``"disable"``;
    - ``hookloop_max_failures``: consecutive failures before ``disable`` stops calling
      the plugin (default 3);
    - ``hookloop_after`` / ``hookloop_before``: names of plugins whose implementations
      must run before / after this plugin's, for every hook both implement; or a
      mapping of hook name to names to order only those hooks (``"*"``: the others).
      A name matches a plugin's registered name or its :func:`base_name`;
    - ``hookloop_rank_zero_only``: call only on the global rank 0 process;
    - ``hookloop_not_hooks``: names of methods that start with ``on_`` but are not
      hooks. Any other unmarked ``on_...`` method must be named after a hook or an
      alias: a misspelled hook is refused with a "did you mean", never ignored.

    Registration refuses what cannot be a plugin, naming it: ``None``, numbers,
    strings (load installed plugins by name with :meth:`load`), containers, functions,
    and a class whose hook methods need an instance (``Checkpoint`` instead of
    ``Checkpoint(...)``).
    """

    def __init__(self) -> None:
        super().__init__("hookloop")
        self.add_hookspecs(hookspecs)
        self.callers = Callers()
        self.rank = 0
        self._policies: dict[str, _Policy] = {}
        self._once: dict[tuple[str, str], list[bool]] = {}
        self._trace = _env_flag("HOOKLOOP_TRACE")
        self._plan: dict[str, list[PlanEntry]] = {}
        self._seq: dict[str, int] = {}  # registered name -> registration number, in order
        self._counter = itertools.count()
        self._aka: dict[str, frozenset[str]] = {}  # names ordering declarations may use
        self._argnames: dict[tuple[str, str], tuple[str, ...]] = {}
        self._origin: dict[str, str] = {}  # registered name -> entry point it was loaded from
        self._options: dict[str, dict[str, Any]] = {}  # registered name -> options it was loaded with
        self.given_names: set[str] = set()
        """Registered names that the user chose (``register(name=...)`` or the
        ``hookloop_name`` option); a plugin's state is keyed by such a name."""

    @property
    def hooks(self) -> Callers:
        """Deprecated name of :attr:`callers`."""
        warnings.warn(
            "PluginManager.hooks is renamed to PluginManager.callers; "
            "PluginManager.hooks will be removed in the next release",
            FutureWarning,
            stacklevel=2,
        )
        return self.callers

    # -- registration ------------------------------------------------------------

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        """Accept ``@hookimpl``-marked functions and unmarked functions named after a
        hook or an alias (``hookspecs.ALIASES``); an alias implements its canonical
        hook (pluggy's ``specname``)."""
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and (name in HOOK_NAMES or name in ALIASES) and name not in not_hooks(plugin):
            try:
                member = getattr(plugin, name)
            except Exception:
                return None
            if inspect.isfunction(member) or inspect.ismethod(member):
                opts = {}
        if opts is not None and name in ALIASES and not opts.get("specname"):
            opts = {**opts, "specname": ALIASES[name]}
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

        ``name`` given explicitly is used as is (a :class:`PluginError` if taken).
        Without it the plugin gets its :func:`base_name`; when that is taken, ``-2``,
        ``-3``... in registration order, so earlier plugins keep their names. Returns
        the registered name. Raises :class:`PluginError`, naming the plugin, for an
        unknown hook name, a method whose parameters the hook cannot fill by name,
        the same object registered twice, or a bad policy; nothing stays registered.
        """
        registered = self._register(plugin, name, on_error, max_failures, ())
        if name is not None:
            self.given_names.add(registered)
        return registered

    def add(self, plugins: Iterable[Any] | Mapping[str, Any] | None) -> list[str]:
        """Register plugin specs in order (the first is called first) and return their
        names. ``plugins`` is ``None``, a mapping of name to options (or to a plugin
        object, registered under that name), or a list of specs, each one of:

        - a plugin object: an instance (or a module) with hook methods;
        - an installed plugin name (entry point of the ``hookloop`` group);
        - a ``(name, options)`` pair, as a tuple or a list (as JSON and YAML deliver
          it): ``options`` is a mapping of keyword arguments or ``None``; given a
          plugin object instead, the object is registered under ``name``;
        - a mapping of name to options (a YAML list item ``{checkpoint: {...}}``).

        The reserved option ``hookloop_name`` names an instance, so one plugin can be
        configured twice. Anything else raises :class:`PluginError` naming the spec and
        its position, before anything of that spec is registered.
        """
        if plugins is None:
            return []
        names = []
        for label, spec in spec_items(plugins):
            try:
                names.append(self._add_one(spec))
            except PluginError as exc:
                raise PluginError(f"{label} = {short(spec)}: {exc}") from exc.__cause__
        return names

    def _add_one(self, spec: Any) -> str:
        if isinstance(spec, str):
            return self.load(spec)
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2:
                raise PluginError(
                    f"a {type(spec).__name__} of {len(spec)} item(s) is not a plugin spec; a pair "
                    f"is (name, options) with options a mapping. Accepted: {SPEC_FORMS}"
                )
            name, value = spec
            if not isinstance(name, str):
                raise PluginError(
                    f"the first item of a (name, options) pair must be a plugin name (a string); "
                    f"got {type(name).__name__} {short(name)}. Accepted: {SPEC_FORMS}"
                )
            if value is None or isinstance(value, Mapping):
                return self.load(name, value)
            if not_a_plugin(value):
                raise PluginError(
                    f"the options of {name!r} must be a mapping of keyword arguments (or None); "
                    f"got {type(value).__name__} {short(value)}"
                )
            return self.register(value, name)  # a chosen name for a plugin object
        return self.register(spec)

    def _register(
        self, plugin: Any, name: str | None, on_error: str | None, max_failures: int | None,
        aka: Iterable[str],
    ) -> str:
        check_plugin_object(plugin)
        if name is not None and (not isinstance(name, str) or not name):
            raise PluginError(f"a plugin name must be a non-empty string; got {name!r}")
        if self.is_registered(plugin):
            raise PluginError(
                f"plugin object {plugin!r} is already registered as {self.get_name(plugin)!r}: "
                "one instance is registered once (it was given twice); to run two of one kind, "
                "build a second instance"
            )
        base = base_name(plugin)
        if name is not None:
            other = self.get_plugin(name)
            if other is not None:
                raise PluginError(
                    f"cannot register {plugin!r} as {name!r}: that name is taken by {other!r}"
                )
            final = name
        else:
            final, n = base, 2
            while self.has_plugin(final):
                final, n = f"{base}-{n}", n + 1
        mode = on_error or getattr(plugin, "hookloop_on_error", "raise")
        if mode not in POLICIES:
            raise PluginError(f"plugin {final!r}: on_error={mode!r}; expected one of {POLICIES}")
        limit = max_failures if max_failures is not None else getattr(
            plugin, "hookloop_max_failures", 3
        )
        if not isinstance(limit, int) or limit <= 0:
            raise PluginError(f"plugin {final!r}: max_failures={limit!r}; expected int > 0")
        argnames = self._check_impls(plugin, final)
        try:
            registered = super().register(plugin, final)
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.is_registered(plugin):  # pluggy < 1.6 validates after adding
                super().unregister(plugin)
            detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise PluginError(f"plugin {final!r}: {detail}") from exc
        if registered is None:
            raise PluginError(f"plugin name {final!r} is blocked")
        self._seq[registered] = next(self._counter)
        self._aka[registered] = frozenset((registered, base, *aka))
        self._argnames.update({(registered, hook): names for hook, names in argnames.items()})
        self._policies[registered] = _Policy(registered, mode, limit)
        try:
            self.recompile()
        except (PluginError, TypeError) as exc:  # e.g. an ordering cycle
            self.unregister(plugin)
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"plugin {registered!r}: {exc}") from exc
        return registered

    def _check_impls(self, plugin: Any, plugin_name: str) -> dict[str, tuple[str, ...]]:
        """Validate every hook implementation of ``plugin`` before anything is
        registered: known hook (or alias), one method per hook, parameters the hook can
        fill by name. Returns hook name to the argument names each is called with."""
        found: dict[str, str] = {}
        argnames: dict[str, tuple[str, ...]] = {}
        label = plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__name__
        skipped = not_hooks(plugin, plugin_name)
        for attr in dir(plugin):
            try:
                opts = self.parse_hookimpl_opts(plugin, attr)
            except Exception:
                continue
            if opts is None:
                if attr.startswith("on_") and attr not in skipped and attr not in HOOK_NAMES \
                        and attr not in ALIASES and is_function(plugin, attr):
                    close = did_you_mean(attr, [*HOOK_NAMES, *ALIASES], n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise PluginError(
                        f"plugin {plugin_name!r}: method {label}.{attr} looks like a hook, but no "
                        f"hook is named {attr!r}; {hint}(known hooks: {', '.join(HOOK_NAMES)}; "
                        f"aliases: {', '.join(ALIASES)}). If it is not meant as a hook, list it in "
                        f"the attribute {NOT_HOOKS_ATTRIBUTE} = ({attr!r},)"
                    )
                continue
            hook = opts.get("specname") or attr
            if hook not in HOOK_NAMES:
                close = difflib.get_close_matches(hook, [*HOOK_NAMES, *ALIASES], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise PluginError(
                    f"plugin {plugin_name!r} implements unknown hook {hook!r}{hint} "
                    f"(known hooks: {', '.join(HOOK_NAMES)})"
                )
            if hook in found:
                raise PluginError(
                    f"plugin {plugin_name!r} implements hook {hook} twice: methods "
                    f"{label}.{found[hook]} and {label}.{attr}; keep one"
                )
            found[hook] = attr
            spec_args = getattr(self.hook, hook).spec.argnames
            method = f"{label}.{attr}" + (f" (hook {hook})" if attr != hook else "")
            try:
                names = call_argnames(getattr(plugin, attr))
            except TypeError as exc:
                raise PluginError(
                    f"plugin {plugin_name!r}: method {method}: {exc} "
                    f"(the hook's arguments: {', '.join(spec_args)})"
                ) from None
            for arg in names:
                if arg not in spec_args:
                    raise PluginError(
                        f"plugin {plugin_name!r}: method {method} takes parameter {arg!r}, "
                        f"which hook {hook} does not provide (its arguments: {', '.join(spec_args)})"
                    )
            argnames[hook] = names
        return argnames

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        """Unregister a plugin (by object or name) and recompile."""
        removed = super().unregister(plugin, name)
        for key in [k for k in self._seq if not self.has_plugin(k)]:
            del self._seq[key]
            self._aka.pop(key, None)
            self._policies.pop(key, None)
            self._origin.pop(key, None)
            self._options.pop(key, None)
            self.given_names.discard(key)
            for hook_key in [h for h in self._argnames if h[0] == key]:
                del self._argnames[hook_key]
            for once_key in [h for h in self._once if h[0] == key]:
                del self._once[once_key]
        self.recompile()
        return removed

    def load(self, spec: str, options: Mapping[str, Any] | None = None) -> str:
        """Instantiate the installed plugin ``spec`` (entry-point name) with ``options``
        and register it under that name. Raises PluginError naming what is available.

        The option ``"hookloop_name"`` is reserved: it is not passed to the plugin
        (a plugin may well take a ``name`` of its own) and sets the
        registered name, so one plugin can be loaded twice
        (``load("tensorboard", {"hookloop_name": "tb_val", ...})``). Loading a name that is
        already registered from the same entry point builds nothing and returns it
        (an error when other options are given, as they would be ignored).
        """
        if not isinstance(spec, str) or not spec:
            raise PluginError(f"an installed plugin name must be a non-empty string; got {spec!r}")
        if options is not None and not isinstance(options, Mapping):
            raise PluginError(
                f"the options of {spec!r} must be a mapping of keyword arguments (or None); "
                f"got {type(options).__name__} {short(options)}"
            )
        bad_keys = [k for k in (options or {}) if not isinstance(k, str)]
        if bad_keys:
            raise PluginError(f"the options of {spec!r} must have string keys; got {bad_keys!r}")
        found = available_plugins()
        entry = found.get(spec)
        if entry is None:
            raise PluginError(missing_plugin_message(spec, found))
        if entry.blocked:
            raise PluginError(f"plugin {spec!r} is blocked ({entry.blocked})")
        if entry.error:
            raise PluginError(f"plugin {spec!r} failed to import: {entry.error}")
        obj = entry.obj
        kwargs = dict(options or {})
        explicit = kwargs.pop(NAME_OPTION, None)
        if explicit is not None and (not isinstance(explicit, str) or not explicit):
            raise PluginError(
                f"plugin {spec!r}: option {NAME_OPTION}={explicit!r} must be a non-empty string")
        target = explicit or spec
        if self.get_plugin(target) is not None:  # already enabled: build nothing new
            if self._origin.get(target) != spec:
                raise PluginError(
                    f"cannot load plugin {spec!r} as {target!r}: that name is taken by "
                    f"{self.get_plugin(target)!r}; give this one another name with the option "
                    f"{NAME_OPTION}"
                )
            earlier = self._options.get(target, {})
            if kwargs and kwargs != earlier:
                raise PluginError(
                    f"plugin {target!r} is already registered; options {kwargs} would be ignored: "
                    f"it was loaded from {spec!r} with options {earlier}. One name cannot have two "
                    f"sets of options; to run both, give this one its own name with the option "
                    f"{NAME_OPTION} (e.g. {{{NAME_OPTION!r}: {target + '_2'!r}}})"
                )
            return target
        if inspect.ismodule(obj) or not callable(obj):
            if kwargs:
                raise PluginError(f"plugin {spec!r} is always-on and takes no options")
            plugin = obj
        else:
            try:
                plugin = obj(**kwargs)
            except TypeError as exc:
                raise PluginError(
                    f"plugin {spec!r}: bad options {kwargs}: {exc} (it takes {signature(obj)})"
                ) from exc
        if self.is_registered(plugin):  # an always-on module registered by autoload
            return self.get_name(plugin) or spec
        registered = self._register(plugin, target, None, None, (spec,))
        self._origin[registered] = spec
        self._options[registered] = kwargs
        if explicit is not None:
            self.given_names.add(registered)
        return registered

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
                    names.append(self._register(entry.obj, name, None, None, (name,)))
                    self._origin[name] = name
        return names

    def plugin_items(self) -> list[tuple[str, Any]]:
        """(name, plugin) pairs in registration order."""
        return [(n, self.get_plugin(n)) for n in self._seq]

    # -- plan ----------------------------------------------------------------------

    def set_rank(self, rank: int) -> None:
        """Set the global rank; rank-zero-only plugins are left out of the plan when != 0."""
        if rank != self.rank:
            self.rank = rank
            self.recompile()

    def plan_entries(self, hook_name: str) -> list[PlanEntry]:
        """The implementations of a hook in call order, with their policies applied:
        wrappers (new- and old-style; the first is the outermost) before plain
        implementations; within each, ``tryfirst``, then normal, then ``trylast``, each
        in registration order; then ``hookloop_after``/``hookloop_before``."""
        impls = sorted(
            getattr(self.hook, hook_name).get_hookimpls(),
            key=lambda i: (
                not (i.wrapper or i.hookwrapper),
                0 if i.tryfirst else 2 if i.trylast else 1,
                self._seq.get(i.plugin_name, -1),
            ),
        )
        impls = declared_order(impls, hook_name, self._aka)
        isolated = hook_name in ISOLATED_HOOKS
        entries = []
        for impl in impls:
            plugin = impl.plugin
            if self.rank != 0 and getattr(plugin, "hookloop_rank_zero_only", False):
                continue
            policy = self._policies.get(impl.plugin_name)
            entry = PlanEntry(impl, argnames=self._argnames.get((impl.plugin_name, hook_name)))
            if isolated:
                entry.on_failure = _log_failure(impl.plugin_name, hook_name)
                entry.catches = _ISOLATED_CATCHES
            elif policy is not None and policy.disabled:
                continue
            elif policy is not None and policy.mode != "raise":
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
        for name in HOOK_NAMES:
            entries = self.plan_entries(name)
            self._plan[name] = entries
            spec = getattr(self.hook, name).spec
            setattr(
                self.callers,
                name,
                compile_hook(name, spec.argnames, entries,
                             firstresult=bool(spec.opts.get("firstresult")), trace=self._trace),
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
                if impl.wrapper:
                    notes.append("wrapper")
                if impl.hookwrapper:
                    notes.append("hookwrapper")
                if impl.tryfirst:
                    notes.append("tryfirst")
                if impl.trylast:
                    notes.append("trylast")
                only_spec = get_only(impl)
                if only_spec is not None:
                    notes.append(_describe_only(only_spec))
                policy = self._policies.get(impl.plugin_name)
                if name in ISOLATED_HOOKS:
                    notes.append("isolated")
                elif policy is not None and policy.mode != "raise":
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


def _log_failure(plugin_name: str, hook_name: str) -> Any:
    def on_failure(exc: BaseException) -> None:
        _log.error("hookloop plugin %r failed in %s", plugin_name, hook_name, exc_info=exc)

    return on_failure


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
