"""Compiled hook dispatch: turn a hook's list of implementations into one function.

pluggy's ``HookCaller`` walks its implementations on every call (about 1 us with none
and 0.35 us per implementation). The loop fires several hooks per step, so for each hook
this module generates a plain Python function that calls the implementations in plan
order with the arguments each one asked for, bound by name (keyword-only parameters
work); applies frequency filters and
fault policies inline; drives wrappers (``wrapper=True`` and old-style
``hookwrapper=True``) around the plain calls; and returns what pluggy would return. A
hook nobody implements compiles to ``None`` and the loop skips it without a call.

Every hook goes through this one generator. The generated source is registered in
:mod:`linecache`, so tracebacks through a plan show its lines.
"""

from __future__ import annotations

import hashlib
import inspect
import linecache
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from pluggy import HookImpl, Result

__all__ = ["Only", "PlanEntry", "call_argnames", "compile_hook", "get_only", "only"]

ONLY_ATTR = "_hookloop_only"
_MAX_NESTED_WRAPPERS = 5  # more wrappers go to an inner plan (Python limits nested blocks)


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
    Combine with ``@hookimpl`` in any order; it applies to wrappers too.
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


def call_argnames(func: Callable[..., Any]) -> tuple[str, ...]:
    """The arguments a plan passes to ``func``, bound by name: its parameters without a
    default (positional-or-keyword or keyword-only), ``self`` excluded. Parameters with
    a default are not passed, as in pluggy.

    Raises ``TypeError`` naming the parameter for what a keyword call cannot fill:
    positional-only parameters, ``*args`` and ``**kwargs``.
    """
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read its signature: {exc}") from None
    if params and params[0].name == "self" and "." in getattr(func, "__qualname__", ""):
        params = params[1:]  # an unbound method, as pluggy treats it
    names = []
    for p in params:
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"parameter {p.name!r} is positional-only; hooks pass arguments by name")
        if p.kind is p.VAR_POSITIONAL:
            raise TypeError(f"parameter '*{p.name}' is not allowed; name the arguments you need")
        if p.kind is p.VAR_KEYWORD:
            raise TypeError(f"parameter '**{p.name}' is not allowed; name the arguments you need")
        if p.default is p.empty:
            names.append(p.name)
    return tuple(names)


@dataclass
class PlanEntry:
    """One implementation in a hook's call plan, with its fault handling.

    ``argnames`` are the arguments passed, bound by name (``None``: computed from the
    function with :func:`call_argnames`). ``on_failure(exc)`` is called when the
    implementation raises an ``Exception`` under a non-raising policy; ``None`` means
    the exception propagates. ``on_success`` (if set) is called after each successful
    call (used to reset consecutive-failure counts). ``once_cell`` is a one-element list
    whose truth says the ``once`` call is still pending. ``catches`` are the exception
    types ``on_failure`` handles; anything else propagates.
    """

    impl: HookImpl
    on_failure: Callable[[BaseException], None] | None = None
    on_success: Callable[[], None] | None = None
    once_cell: list[bool] | None = None
    argnames: tuple[str, ...] | None = None
    catches: tuple[type[BaseException], ...] = (Exception,)


def compile_hook(
    name: str,
    argnames: Sequence[str],
    entries: Sequence[PlanEntry],
    *,
    firstresult: bool = False,
    trace: bool = False,
) -> Callable[..., Any] | None:
    """Compile the call plan of one hook; ``entries`` are in call order (wrappers, which
    come first in a plan, nest: the first is the outermost).

    The returned function takes the spec's arguments (positionally or by keyword) and
    returns what pluggy returns: a list of non-``None`` results, or the first
    non-``None`` result for ``firstresult`` hooks. Returns ``None`` when there is
    nothing to call.
    """
    if not entries:
        return None
    func = _build(name, tuple(argnames), list(entries), firstresult)
    if trace:
        func = _traced(name, entries, func)
    return func


def _is_wrapper(entry: PlanEntry) -> bool:
    return bool(entry.impl.wrapper or entry.impl.hookwrapper)


def _build(
    name: str, argnames: tuple[str, ...], entries: list[PlanEntry], firstresult: bool
) -> Callable[..., Any]:
    ns: dict[str, Any] = {"_finish": _finish, "_wrapfail": _wrapfail}
    wrappers = [e for e in entries if _is_wrapper(e)]
    plain = [e for e in entries if not _is_wrapper(e)]
    outer, deeper = wrappers[:_MAX_NESTED_WRAPPERS], wrappers[_MAX_NESTED_WRAPPERS:]
    if deeper:
        ns["_inner"] = _build(name, argnames, deeper + plain, firstresult)
        body = [f"_res = _inner({', '.join(argnames)})"]
    else:
        body = ["_res = None" if firstresult else "_res = []"]
        for k, entry in enumerate(plain):  # numbered after the wrappers: one namespace
            body += _plain_lines(len(outer) + k, entry, argnames, ns, firstresult, k == 0)
    for i in reversed(range(len(outer))):
        body = _wrapper_lines(i, outer[i], argnames, ns, body)
    lines = [f"def {name}({', '.join(argnames)}):"]
    if any(_condition(e) for e in outer + ([] if deeper else plain)):
        if "loop" not in argnames:
            raise TypeError(f"hook {name!r}: a frequency filter needs the hook's 'loop' argument")
        lines.append("    _st = loop.state")
    lines += ["    " + line for line in body]
    lines.append("    return _res")
    return _define(name, "\n".join(lines) + "\n", ns)


def _call(prefix: str, i: int, entry: PlanEntry, argnames: tuple[str, ...], ns: dict[str, Any]) -> str:
    """``_f3(loop, batch, step=step)``: the call of one implementation, binding each
    argument by name. Leading parameters that the function's own signature takes
    positionally, in that order, are passed positionally (a keyword call costs about
    twice as much); the rest (keyword-only) by keyword."""
    func = entry.impl.function
    names = entry.argnames if entry.argnames is not None else call_argnames(func)
    extra = [a for a in names if a not in argnames]
    if extra:
        raise TypeError(
            f"{entry.impl.plugin_name}: argument(s) {extra} are not in the hook's spec {list(argnames)}"
        )
    ns[f"{prefix}{i}"] = func
    npos = _positional_count(func, names)
    args = [*names[:npos], *(f"{a}={a}" for a in names[npos:])]
    return f"{prefix}{i}({', '.join(args)})"


def _positional_count(func: Callable[..., Any], names: Sequence[str]) -> int:
    """How many of ``names`` (in order) are the leading required positional-or-keyword
    parameters of ``func``'s own signature, so passing them positionally binds them
    exactly as keywords would. 0 for a wrapper read through ``__wrapped__``."""
    try:
        params = list(inspect.signature(func, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        return 0
    if params and params[0].name == "self" and "." in getattr(func, "__qualname__", ""):
        params = params[1:]
    count = 0
    for param, name in zip(params, names):
        if param.kind is not param.POSITIONAL_OR_KEYWORD or param.name != name:
            break
        if param.default is not param.empty:
            break
        count += 1
    return count


def _condition(entry: PlanEntry) -> str:
    only_spec = get_only(entry.impl)
    return only_spec.condition("_st") if only_spec else ""


def _gate(i: int, entry: PlanEntry, ns: dict[str, Any], extra: str = "") -> tuple[str, list[str]]:
    """The ``if`` condition guarding one entry (filters, ``once``) and the lines that run
    first under it."""
    conds = [c for c in (extra, _condition(entry)) if c]
    first = []
    if entry.once_cell is not None:
        ns[f"_once{i}"] = entry.once_cell
        conds.append(f"_once{i}[0]")
        first.append(f"_once{i}[0] = False")
    return " and ".join(conds), first


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


def _plain_lines(
    i: int, entry: PlanEntry, argnames: tuple[str, ...], ns: dict[str, Any], firstresult: bool,
    first: bool,
) -> list[str]:
    call = _call("_f", i, entry, argnames, ns)
    if firstresult:
        run, keep = [f"_res = {call}"], []
    else:
        run, keep = [f"_r = {call}"], ["if _r is not None: _res.append(_r)"]
    if entry.on_failure is not None:
        ns[f"_fail{i}"] = entry.on_failure
        ok = []
        if entry.on_success is not None:
            ns[f"_ok{i}"] = entry.on_success
            ok = [f"_ok{i}()"]
        after = ok + keep
        body = ["try:", *_indent(run), f"except {_catches(i, entry, ns)} as _e:", f"    _fail{i}(_e)"]
        if after:
            body += ["else:", *_indent(after)]
    else:
        body = run + keep
    cond, before = _gate(i, entry, ns, "_res is None" if firstresult and not first else "")
    if cond:
        return [f"if {cond}:", *_indent(before + body)]
    return before + body


def _wrapper_lines(
    i: int, entry: PlanEntry, argnames: tuple[str, ...], ns: dict[str, Any], inner: list[str]
) -> list[str]:
    """One wrapper around ``inner`` (lines that set ``_res``): set it up to its
    ``yield``, run ``inner``, then finish it with the result or the exception."""
    call = _call("_w", i, entry, argnames, ns)
    g = f"_g{i}"
    old = bool(entry.impl.hookwrapper)
    cond, first = _gate(i, entry, ns)
    guarded = entry.on_failure is not None
    if not guarded and not cond and not old:  # the common case, fully inline
        return [
            "try:", f"    {g} = {call}", f"    next({g})",
            "except StopIteration:", f"    raise _wrapfail(_w{i}, 'did not yield') from None",
            "try:", *_indent(inner),
            "except BaseException as _exc:",
            "    try:", f"        {g}.throw(_exc)",
            "    except StopIteration as _stop:", "        _res = _stop.value",
            "    else:", f"        raise _wrapfail(_w{i}, 'has second yield', {g})",
            "else:",
            "    try:", f"        {g}.send(_res)",
            "    except StopIteration as _stop:", "        _res = _stop.value",
            "    else:", f"        raise _wrapfail(_w{i}, 'has second yield', {g})",
        ]
    policy = "None"
    setup = ["try:", f"    {g} = {call}", f"    next({g})", "except StopIteration:"]
    if guarded:
        ns[f"_fail{i}"] = entry.on_failure
        ns[f"_p{i}"] = entry
        policy = f"_p{i}"
        setup += [f"    {g} = None", f"    _fail{i}(_wrapfail(_w{i}, 'did not yield'))",
                  f"except {_catches(i, entry, ns)} as _e:", f"    {g} = None", f"    _fail{i}(_e)"]
    else:
        setup += [f"    raise _wrapfail(_w{i}, 'did not yield') from None"]
    optional = bool(cond) or guarded  # the wrapper may not be running: skip its teardown
    lines = [f"{g} = None"] if optional else []
    lines += [f"if {cond}:", *_indent(first + setup)] if cond else setup
    finish = f"_finish({g}, _w{i}, {{}}, {old}, {policy})"
    on_exc = f"_res = {finish.format('_exc, None')}"
    on_res = f"_res = {finish.format('None, _res')}"
    return [
        *lines,
        "try:", *_indent(inner),
        "except BaseException as _exc:",
        *([f"    if {g} is None:", "        raise"] if optional else []),
        f"    {on_exc}",
        "else:",
        *([f"    if {g} is not None:", f"        {on_res}"] if optional else [f"    {on_res}"]),
    ]


def _finish(
    gen: Generator[Any, Any, Any],
    func: Callable[..., Any],
    exc: BaseException | None,
    result: Any,
    old: bool,
    policy: PlanEntry | None,
) -> Any:
    """Run a wrapper's teardown with the inner outcome (``exc``, else ``result``) and
    return the outcome it leaves. Old-style wrappers get a :class:`pluggy.Result`. A
    failure of the wrapper itself (not the inner exception passing through) propagates,
    or, when ``policy`` handles it, is reported and the inner outcome is kept."""
    outcome = None
    try:
        if old:
            outcome = Result.from_call(_none)
            if exc is not None:
                outcome.force_exception(exc)
            else:
                outcome.force_result(result)
            gen.send(outcome)
        elif exc is not None:
            gen.throw(exc)
        else:
            gen.send(result)
    except StopIteration as stop:
        if policy is not None and policy.on_success is not None:
            policy.on_success()
        return outcome.get_result() if outcome is not None else stop.value
    except BaseException as err:
        if err is exc or policy is None or policy.on_failure is None:
            raise
        if not isinstance(err, policy.catches):
            raise
        policy.on_failure(err)
    else:
        err = _wrapfail(func, "has second yield", gen)
        if policy is None or policy.on_failure is None:
            raise err
        policy.on_failure(err)
    if exc is not None:
        raise exc
    return result


def _catches(i: int, entry: PlanEntry, ns: dict[str, Any]) -> str:
    """The ``except`` clause's expression for what an entry's policy handles."""
    if entry.catches == (Exception,):
        return "Exception"
    ns[f"_catch{i}"] = entry.catches
    return f"_catch{i}"


def _none() -> None:
    return None


def _wrapfail(func: Any, message: str, gen: Generator[Any, Any, Any] | None = None) -> RuntimeError:
    """The error for a misbehaving wrapper, as pluggy words it; ``gen`` is closed first."""
    if gen is not None:
        gen.close()
    code = getattr(func, "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else repr(func)
    return RuntimeError(f"wrap_controller at {func.__name__!r} {where} {message}")


def _define(name: str, src: str, ns: dict[str, Any]) -> Callable[..., Any]:
    """Compile ``src`` (defining ``name``) under a filename unique to its content and
    register the source in linecache so tracebacks show the generated lines."""
    digest = hashlib.sha1(src.encode()).hexdigest()[:8]
    filename = f"<hookloop plan {name} {digest}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), ns)
    func = ns[name]
    func.__hookloop_source__ = src
    return func


def _traced(name: str, entries: Sequence[PlanEntry], func: Callable[..., Any]) -> Callable[..., Any]:
    targets = ", ".join(e.impl.plugin_name for e in entries)

    def traced(*args: Any, **kwargs: Any) -> Any:
        print(f"[hookloop] {name} -> {targets}", file=sys.stderr)
        return func(*args, **kwargs)

    traced.__hookloop_source__ = func.__hookloop_source__  # type: ignore[attr-defined]
    return traced
