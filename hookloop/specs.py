"""Plugin specs as ``Loop(plugins=...)`` takes them: the accepted forms, and the checks
that refuse anything else with an error naming the spec and its position."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from hookloop.discovery import HOOK_NAMES, PluginError
from hookloop.hookspecs import ALIASES

__all__ = ["NOT_HOOKS_ATTRIBUTE", "SPEC_FORMS", "check_plugin_object", "is_function", "not_a_plugin",
           "not_hooks", "short", "signature", "spec_items"]

NOT_HOOKS_ATTRIBUTE = "hookloop_not_hooks"
"""The plugin attribute naming methods that start with ``on_`` but are not hooks."""
SPEC_FORMS = (
    "a plugin object (an instance, or a module), an installed plugin name ('checkpoint'), "
    "a (name, options) pair as a tuple or a list (['checkpoint', {'dirpath': 'runs/ckpt'}]), "
    "or a mapping of name to options ({'checkpoint': {'dirpath': 'runs/ckpt'}})"
)
"""What a plugin spec may be, as error messages say it."""


def spec_items(plugins: Any) -> list[tuple[str, Any]]:
    """``plugins`` as (position label, spec) pairs; refuses what is not a collection of
    specs (a bare string, a single pair, a single object)."""
    if isinstance(plugins, (str, bytes)):
        raise PluginError(
            f"plugins={plugins!r} is a single string, which would be read letter by letter; "
            f"give a list of specs: plugins=[{plugins!r}]"
        )
    if isinstance(plugins, Mapping):
        return [(f"plugins[{k!r}]", mapping_pair(k, v)) for k, v in plugins.items()]
    if (isinstance(plugins, tuple) and len(plugins) == 2 and isinstance(plugins[0], str)
            and (plugins[1] is None or isinstance(plugins[1], Mapping))):
        raise PluginError(
            f"plugins={short(plugins)} is one (name, options) pair; give a list of specs: "
            f"plugins=[{short(plugins)}]"
        )
    if inspect.isclass(plugins) or not isinstance(plugins, Iterable):
        raise PluginError(
            f"plugins={short(plugins)} ({type(plugins).__name__}) is not a list of plugin specs; "
            f"give a list (plugins=[...]) whose items are each {SPEC_FORMS}"
        )
    items: list[tuple[str, Any]] = []
    for i, item in enumerate(plugins):
        if isinstance(item, Mapping):  # {name: options} as a list item, as YAML writes it
            items.extend((f"plugins[{i}][{k!r}]", mapping_pair(k, v)) for k, v in item.items())
        else:
            items.append((f"plugins[{i}]", item))
    return items


def mapping_pair(key: Any, value: Any) -> tuple[Any, Any]:
    if not isinstance(key, str):
        raise PluginError(
            f"plugins mapping key {key!r} ({type(key).__name__}) is not a plugin name; the keys "
            "of a plugins mapping are installed plugin names (or names for plugin objects)"
        )
    return (key, value)


def short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def signature(obj: Any) -> str:
    try:
        sig = inspect.signature(obj).replace(return_annotation=inspect.Signature.empty)
        return f"{getattr(obj, '__name__', 'it')}{sig}"
    except (TypeError, ValueError):
        return "keyword arguments its documentation lists"


def not_a_plugin(value: Any) -> str | None:
    """Why ``value`` cannot be a plugin object, or ``None`` when it may be one."""
    if value is None:
        return "None is not a plugin"
    if isinstance(value, (bool, int, float, complex)):
        return f"a number ({type(value).__name__} {value!r}) is not a plugin"
    if isinstance(value, (str, bytes)):
        return (f"a string ({value!r}) is not a plugin object; load an installed plugin by "
                "name with PluginManager.load(name) or Loop(plugins=[name])")
    if isinstance(value, (tuple, list, set, frozenset, Mapping)):
        return (f"a {type(value).__name__} ({short(value)}) is not a plugin object; a list of "
                "specs goes to PluginManager.add or Loop(plugins=...)")
    if inspect.isfunction(value) or inspect.isbuiltin(value) or inspect.ismethod(value):
        return (f"a function ({getattr(value, '__qualname__', value)!r}) is not a plugin; a "
                "plugin is an object or module whose methods are named after hooks, e.g. "
                "def on_train_batch_end(self, loop, outputs)")
    return None


def check_plugin_object(plugin: Any) -> None:
    why = not_a_plugin(plugin)
    if why is not None:
        raise PluginError(f"{why}. Accepted plugin specs: {SPEC_FORMS}")
    if inspect.isclass(plugin) and needs_instance(plugin):
        raise PluginError(
            f"{plugin.__name__} is a class, not an instance: its hook methods need self. "
            f"Pass an instance, {plugin.__name__}(...), or load it by its installed name"
        )


def needs_instance(cls: type) -> bool:
    """Whether a class given as a plugin has hook methods that need an instance, or no
    hooks at all (then it was surely meant to be instantiated)."""
    hooks = 0
    for attr in dir(cls):
        member = inspect.getattr_static(cls, attr, None)
        marked = getattr(getattr(cls, attr, None), "hookloop_impl", None) is not None
        if attr in HOOK_NAMES or attr in ALIASES or marked:
            hooks += 1
            if inspect.isfunction(member):
                return True
    return hooks == 0


def not_hooks(plugin: Any, plugin_name: str | None = None) -> frozenset[str]:
    """The names in the plugin's ``hookloop_not_hooks`` attribute; a malformed value is
    a PluginError when ``plugin_name`` is given (at registration), else ignored."""
    value = getattr(plugin, NOT_HOOKS_ATTRIBUTE, ())
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (tuple, list, set, frozenset)) and all(isinstance(n, str) for n in value):
        return frozenset(value)
    if plugin_name is not None:
        raise PluginError(
            f"plugin {plugin_name!r}: {NOT_HOOKS_ATTRIBUTE}={value!r}; expected a tuple of method "
            "names (strings)"
        )
    return frozenset()


def is_function(plugin: Any, attr: str) -> bool:
    try:
        member = getattr(plugin, attr)
    except Exception:
        return False
    return inspect.isfunction(member) or inspect.ismethod(member)
