"""Compiled hook dispatch: turn a hook's list of implementations into one function.

pluggy's ``HookCaller`` walks its implementations on every call (about 1 us with none
and 0.35 us per implementation). The loop fires several hooks per step, so for each hook
this module generates a plain Python function that calls the implementations in
pluggy's order with the arguments each one asked for, applies frequency filters and
fault policies inline, and returns what pluggy would return. A hook nobody implements
compiles to ``None`` and the loop skips it without a call. Hooks with wrappers are
delegated to pluggy's own ``_hookexec`` so their semantics stay pluggy's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pluggy import HookImpl

__all__ = ["Only", "PlanEntry", "compile_hook", "only"]

ONLY_ATTR = "_hookloop_only"


@dataclass(frozen=True)
class Only:
    """Frequency filter of one hook implementation, evaluated by the compiled plan.

    Steps are ``loop.state.global_step`` (optimizer steps done), epochs are
    ``loop.state.epoch`` (zero-based).
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    once: bool = False
    from_step: int | None = None
    until_step: int | None = None

    def condition(self, state: str) -> str:
        """Return a Python expression over ``state`` that is true when the call runs."""
        parts = []
        if self.every_n_steps:
            parts.append(f"{state}.global_step % {self.every_n_steps} == 0")
        if self.every_n_epochs:
            parts.append(f"({state}.epoch + 1) % {self.every_n_epochs} == 0")
        if self.from_step is not None:
            parts.append(f"{state}.global_step >= {self.from_step}")
        if self.until_step is not None:
            parts.append(f"{state}.global_step < {self.until_step}")
        return " and ".join(parts)


def only(
    *,
    every_n_steps: int | None = None,
    every_n_epochs: int | None = None,
    once: bool = False,
    from_step: int | None = None,
    until_step: int | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare when a hook implementation runs; the compiled plan applies the filter.

    ``every_n_steps=N`` runs when ``global_step % N == 0``; ``every_n_epochs=N`` runs on
    epochs N-1, 2N-1, ... (every Nth epoch); ``once`` runs the first time only (per fit);
    ``from_step``/``until_step`` bound the global step (from inclusive, until exclusive).
    Combine with ``@hookimpl`` in any order.
    """
    for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"only({name}={value!r}): must be a positive int")
    for name, value in (("from_step", from_step), ("until_step", until_step)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"only({name}={value!r}): must be a non-negative int")
    spec = Only(every_n_steps, every_n_epochs, bool(once), from_step, until_step)

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, ONLY_ATTR, spec)
        return func

    return mark


def get_only(impl: HookImpl) -> Only | None:
    """The frequency filter declared on an implementation's function, if any."""
    func = getattr(impl.function, "__func__", impl.function)
    return getattr(func, ONLY_ATTR, None)


@dataclass
class PlanEntry:
    """One implementation in a hook's call plan, with its fault handling.

    ``on_failure(exc)`` is called when the implementation raises an ``Exception`` under
    a non-raising policy; ``None`` means the exception propagates. ``on_success`` (if
    set) is called after each successful call (used to reset consecutive-failure
    counts). ``once_cell`` is a one-element list whose truth says the ``once`` call is
    still pending.
    """

    impl: HookImpl
    on_failure: Callable[[BaseException], None] | None = None
    on_success: Callable[[], None] | None = None
    once_cell: list[bool] | None = None


def compile_hook(
    name: str,
    argnames: Sequence[str],
    entries: Sequence[PlanEntry],
    *,
    firstresult: bool = False,
    hookexec: Callable[..., Any] | None = None,
    trace: bool = False,
) -> Callable[..., Any] | None:
    """Compile the call plan of one hook; ``entries`` are in call order.

    The returned function takes the spec's arguments (positionally or by keyword) and
    returns what pluggy returns: a list of non-``None`` results, or the first
    non-``None`` result for ``firstresult`` hooks. Returns ``None`` when there is
    nothing to call.
    """
    if not entries:
        return None
    wrappers = [e for e in entries if e.impl.hookwrapper or e.impl.wrapper]
    if wrappers and all(_inline_wrapper(e) for e in wrappers):
        plain = [e for e in entries if not e.impl.wrapper]
        inner = _compile_plain(name, argnames, plain, firstresult) if plain else None
        func = _compile_wrapped(name, argnames, wrappers, inner, firstresult)
    elif wrappers:
        if hookexec is None:
            raise ValueError(f"hook {name!r} has wrappers; pass hookexec")
        func = _compile_with_pluggy(name, argnames, entries, firstresult, hookexec)
    else:
        func = _compile_plain(name, argnames, entries, firstresult)
    if trace:
        func = _traced(name, entries, func)
    return func


def _compile_plain(
    name: str, argnames: Sequence[str], entries: Sequence[PlanEntry], firstresult: bool
) -> Callable[..., Any]:
    ns: dict[str, Any] = {}
    lines = [f"def {name}({', '.join(argnames)}):"]
    if not firstresult:
        lines.append("    _res = []")
    needs_state = any(get_only(e.impl) for e in entries)
    if needs_state:
        lines.append("    _st = loop.state")
    for i, entry in enumerate(entries):
        impl = entry.impl
        ns[f"_f{i}"] = impl.function
        call = f"_r = _f{i}({', '.join(impl.argnames)})"
        body = [call]
        if firstresult:
            body.append("if _r is not None: return _r")
        else:
            body.append("if _r is not None: _res.append(_r)")
        if entry.on_failure is not None:
            ns[f"_fail{i}"] = entry.on_failure
            wrapped = ["try:", *("    " + b for b in body[:1]), "except Exception as _e:",
                       f"    _fail{i}(_e)"]
            if entry.on_success is not None:
                ns[f"_ok{i}"] = entry.on_success
                wrapped += ["else:", f"    _ok{i}()", *("    " + b for b in body[1:])]
            else:
                wrapped += ["else:", *("    " + b for b in body[1:])]
            body = wrapped
        only_spec = get_only(impl)
        cond = only_spec.condition("_st") if only_spec else ""
        if entry.once_cell is not None:
            ns[f"_once{i}"] = entry.once_cell
            cond = f"{cond} and _once{i}[0]" if cond else f"_once{i}[0]"
            body = [f"_once{i}[0] = False", *body]
        if cond:
            lines.append(f"    if {cond}:")
            lines.extend("        " + b for b in body)
        else:
            lines.extend("    " + b for b in body)
    lines.append("    return None" if firstresult else "    return _res")
    src = "\n".join(lines)
    exec(compile(src, f"<hookloop plan {name}>", "exec"), ns)
    func = ns[name]
    func.__hookloop_source__ = src
    return func


def _inline_wrapper(entry: PlanEntry) -> bool:
    """New-style wrappers without filters or fault policies are compiled inline; the
    rest (old-style ``hookwrapper``, guarded wrappers) go through pluggy."""
    return bool(entry.impl.wrapper) and entry.on_failure is None and entry.once_cell is None and (
        get_only(entry.impl) is None
    )


def _wrapfail(func: Any, message: str) -> RuntimeError:
    code = getattr(func, "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else repr(func)
    return RuntimeError(f"wrap_controller at {func.__name__!r} {where} {message}")


def _compile_wrapped(
    name: str,
    argnames: Sequence[str],
    wrappers: Sequence[PlanEntry],
    inner: Callable[..., Any] | None,
    firstresult: bool,
) -> Callable[..., Any]:
    """New-style wrappers around the compiled plain call, with pluggy's semantics: the
    first wrapper in call order is the outermost; each gets the inner result through
    ``send`` (or the inner exception through ``throw``) and returns the new result."""
    ns: dict[str, Any] = {"_inner": inner, "_wrapfail": _wrapfail}
    args = ", ".join(argnames)
    lines = [f"def {name}({args}):"]
    indent = "    "
    for i, entry in enumerate(wrappers):
        impl = entry.impl
        ns[f"_w{i}"] = impl.function
        lines += [
            f"{indent}_g{i} = _w{i}({', '.join(impl.argnames)})",
            f"{indent}try:",
            f"{indent}    next(_g{i})",
            f"{indent}except StopIteration:",
            f"{indent}    raise _wrapfail(_w{i}, 'did not yield') from None",
            f"{indent}try:",
        ]
        indent += "    "
    if inner is not None:
        lines.append(f"{indent}_res = _inner({args})")
    else:
        lines.append(f"{indent}_res = {'None' if firstresult else '[]'}")
    for i in reversed(range(len(wrappers))):
        indent = indent[:-4]
        lines += [
            f"{indent}except BaseException as _exc:",
            f"{indent}    try:",
            f"{indent}        _g{i}.throw(_exc)",
            f"{indent}    except StopIteration as _stop:",
            f"{indent}        _res = _stop.value",
            f"{indent}    else:",
            f"{indent}        raise _wrapfail(_w{i}, 'has second yield')",
            f"{indent}else:",
            f"{indent}    try:",
            f"{indent}        _g{i}.send(_res)",
            f"{indent}    except StopIteration as _stop:",
            f"{indent}        _res = _stop.value",
            f"{indent}    else:",
            f"{indent}        raise _wrapfail(_w{i}, 'has second yield')",
        ]
    lines.append("    return _res")
    src = "\n".join(lines)
    exec(compile(src, f"<hookloop plan {name}>", "exec"), ns)
    func = ns[name]
    func.__hookloop_source__ = src
    return func


def _guard(entry: PlanEntry) -> HookImpl:
    """A copy of a pluggy HookImpl whose function applies the entry's policies."""
    impl = entry.impl
    original = impl.function
    only_spec = get_only(impl)
    if entry.on_failure is None and only_spec is None and entry.once_cell is None:
        return impl
    cell = entry.once_cell
    on_failure = entry.on_failure
    on_success = entry.on_success
    check = None
    if only_spec is not None and only_spec.condition("s"):
        check = eval(f"lambda s: {only_spec.condition('s')}")

    def guarded(*args: Any) -> Any:
        if check is not None and not check(args[impl.argnames.index("loop")].state):
            return None
        if cell is not None:
            if not cell[0]:
                return None
            cell[0] = False
        if on_failure is None:
            return original(*args)
        try:
            result = original(*args)
        except Exception as exc:
            on_failure(exc)
            return None
        if on_success is not None:
            on_success()
        return result

    if (only_spec is not None or cell is not None) and "loop" not in impl.argnames:
        raise TypeError(
            f"{impl.plugin_name}.{original.__name__}: a frequency filter needs the "
            "'loop' argument in the implementation's signature"
        )
    opts = {k: getattr(impl, k) for k in ("wrapper", "hookwrapper", "optionalhook",
                                          "tryfirst", "trylast", "specname")
            if hasattr(impl, k)}
    copy = HookImpl(impl.plugin, impl.plugin_name, guarded, opts)  # type: ignore[arg-type]
    copy.argnames = impl.argnames
    copy.kwargnames = impl.kwargnames
    return copy


def _compile_with_pluggy(
    name: str,
    argnames: Sequence[str],
    entries: Sequence[PlanEntry],
    firstresult: bool,
    hookexec: Callable[..., Any],
) -> Callable[..., Any]:
    # pluggy calls its list from the end: pass the plan reversed.
    impls = [_guard(e) for e in reversed(entries)]
    args = ", ".join(argnames)
    kwargs = ", ".join(f"{a!r}: {a}" for a in argnames)
    src = (
        f"def {name}({args}):\n"
        f"    return _hookexec({name!r}, _impls, {{{kwargs}}}, {firstresult!r})\n"
    )
    ns: dict[str, Any] = {"_hookexec": hookexec, "_impls": impls}
    exec(compile(src, f"<hookloop plan {name}>", "exec"), ns)
    func = ns[name]
    func.__hookloop_source__ = src
    return func


def _traced(name: str, entries: Sequence[PlanEntry], func: Callable[..., Any]) -> Callable[..., Any]:
    targets = ", ".join(e.impl.plugin_name for e in entries)

    def traced(*args: Any, **kwargs: Any) -> Any:
        print(f"[hookloop] {name} -> {targets}", file=sys.stderr)
        return func(*args, **kwargs)

    return traced
