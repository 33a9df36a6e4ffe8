"""The ``hookloop`` command.

::

    hookloop --version
    hookloop plugins                      # every installed plugin, with its status
    hookloop plugins --plan [SPEC ...]    # the call order of every hook for these plugins
    hookloop <command> [ARGS ...]         # a command that a distribution provides

``--plan`` takes plugin specs as ``Loop(plugins=...)`` does and prints the call order of
every hook for exactly that list, after the always-on plugins every loop registers
(``--no-autoload`` leaves those out). Each ``SPEC`` argument is one of:

- ``NAME``: an installed plugin with its default options (``early_stopping``);
- ``NAME:OPTIONS``: with ``OPTIONS`` a JSON object (``checkpoint:'{"dirpath": "x"}'``);
- a JSON array, the whole list of specs as a config file gives it
  (``'[["checkpoint", {"dirpath": "x"}], "early_stopping"]'``), or a JSON object,
  a mapping of name to options (``'{"checkpoint": {"dirpath": "x"}}'``).

Specs from several arguments are concatenated in order. A bad spec is reported as
``Loop`` reports it, with exit status 2.

Commands from distributions: the entry-point group ``hookloop.commands``. The entry
point's name is the command's name; its object is a function
``main(argv: list[str]) -> int | None`` that receives the arguments after the command's
name, parses them itself (``argparse.ArgumentParser(prog="hookloop <name>")``; see
:func:`positive_int` for an argument type whose errors read well) and returns the exit
status (``None`` means 0). It is imported only when its command runs. For example, in
a distribution's ``pyproject.toml``::

    [project.entry-points."hookloop.commands"]
    demo = "hookloop_demo:main"

Built-in command names (``plugins``) cannot be taken; one name registered by two
distributions is reported, and the distribution whose name sorts first wins. A command
that is known but not installed (``hookloop demo`` without ``hookloop-demo``) prints
what to install and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from hookloop import __version__
from hookloop.discovery import did_you_mean, unique_entry_points
from hookloop.plugins import PluginError, PluginManager, available_plugins

__all__ = ["BUILTIN_COMMANDS", "COMMANDS_GROUP", "KNOWN_COMMANDS", "main", "parse_plan_specs",
           "positive_int"]

COMMANDS_GROUP = "hookloop.commands"
"""The entry-point group of the commands that distributions provide."""
BUILTIN_COMMANDS: tuple[str, ...] = ("plugins",)
"""Commands of the core, which no distribution can replace."""
KNOWN_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hookloop-demo", "make demo"),
}
"""Command name to the distribution that provides it and how to get it in a checkout,
for the message printed when it is not installed."""


def positive_int(text: str) -> int:
    """An ``argparse`` type: a positive integer, with an error message that names the
    value (``argument --epochs: expected a positive integer; got 'abc'``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


_PAIR_HINT = ("one (name, options) pair is written NAME:OPTIONS (checkpoint:'{\"dirpath\": \"x\"}'); "
              "a JSON array is the whole list of specs ('[[\"checkpoint\", {\"dirpath\": \"x\"}]]')")


def parse_plan_specs(values: Sequence[str]) -> list[Any]:
    """``--plan`` arguments to a list of plugin specs (see the module docstring).
    Raises ``argparse.ArgumentTypeError`` naming the argument that cannot be read."""
    specs: list[Any] = []
    for text in values:
        stripped = text.strip()
        if not stripped:
            raise argparse.ArgumentTypeError("an empty plugin spec; give NAME, NAME:OPTIONS or JSON")
        if stripped[0] in "[{":
            value = _json(text, stripped)
            if isinstance(value, list):
                if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
                    raise argparse.ArgumentTypeError(
                        f"{text!r} is ambiguous: a list of two specs, or one pair? {_PAIR_HINT}")
                specs.extend(value)
            else:
                specs.append(value)
            continue
        name, sep, options = stripped.partition(":")
        if not sep:
            specs.append(name)
            continue
        value = _json(text, options)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(
                f"{text!r}: the options after {name + ':'!r} must be a JSON object "
                f"({{\"key\": value, ...}}); got {type(value).__name__}")
        specs.append([name, value])
    return specs


def _json(arg: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{arg!r} is not valid JSON: {exc.msg} at character {exc.pos + 1}; {_PAIR_HINT}"
        ) from None


def _cmd_plugins(args: argparse.Namespace) -> int:
    found = available_plugins()
    if not found:
        print("no hookloop plugins installed (entry-point group 'hookloop')")
    rows = [("name", "distribution", "version", "status", "hooks")]
    for name in sorted(found):
        p = found[name]
        if p.blocked:
            status = f"blocked ({p.blocked})"
        elif p.error:
            status = f"import failed: {p.error}"
        elif p.always_on:
            status = "always-on"
        else:
            status = "available"
        if p.shadowed:
            status += f"; also registered by {', '.join(p.shadowed)} (not used)"
        rows.append((name, p.distribution, p.version, status, ", ".join(p.hooks) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    if args.plan is None:
        return 0
    try:
        specs = parse_plan_specs(args.plan)
    except argparse.ArgumentTypeError as exc:
        print(f"hookloop plugins: error: argument --plan: {exc}", file=sys.stderr)
        return 2
    pm = PluginManager()
    always = pm.load_autoload_plugins() if args.autoload else []
    try:
        pm.add(specs)
    except PluginError as exc:
        print(f"hookloop plugins: error: argument --plan: {exc}", file=sys.stderr)
        return 2
    given = ", ".join(json.dumps(s) for s in specs) or "no plugin specs"
    print()
    print(f"call plan for {given}" + (f", after the always-on {', '.join(always)}" if always else "")
          + ":")
    print(pm.format_plan())
    return 0


def _out_of(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """Parse, turning argparse's exits (errors, ``--help``, ``--version``) into a status."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2


def _distribution_commands() -> dict[str, Any]:
    """The ``hookloop.commands`` entry points by name (built-in names left out)."""
    out = {}
    for name, (ep, _others) in unique_entry_points(COMMANDS_GROUP).items():
        if name in BUILTIN_COMMANDS:
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            print(f"hookloop: ignoring command {name!r} of {dist} ({ep.value}): {name!r} is a "
                  "built-in command", file=sys.stderr)
            continue
        out[name] = ep
    return out


def _run_command(name: str, ep: Any, argv: list[str]) -> int:
    dist = getattr(ep, "dist", None)
    origin = f"{dist.metadata['Name']} {dist.version}, " if dist is not None else ""
    try:
        fn = ep.load()
    except Exception as exc:
        print(f"hookloop: command {name!r} ({origin}{ep.value}) failed to import: "
              f"{type(exc).__name__}: {exc}; reinstall the distribution that provides it",
              file=sys.stderr)
        return 2
    if not callable(fn):
        print(f"hookloop: command {name!r} ({origin}{ep.value}) is not a function "
              "main(argv) -> int", file=sys.stderr)
        return 2
    return _status(fn(argv))


def _status(value: Any) -> int:
    return 0 if value is None else int(value)


def _not_installed(name: str) -> int:
    dist, checkout = KNOWN_COMMANDS[name]
    print(f"hookloop: the {name!r} command is provided by the distribution {dist}, which is not "
          f"installed: pip install {dist} (from a checkout of hookloop: {checkout})",
          file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hookloop`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _distribution_commands()
    if argv and not argv[0].startswith("-") and argv[0] not in BUILTIN_COMMANDS:
        name = argv[0]
        if name in commands:
            return _run_command(name, commands[name], argv[1:])
        if name in KNOWN_COMMANDS:
            return _not_installed(name)
        known = sorted({*BUILTIN_COMMANDS, *commands})
        close = did_you_mean(name, [*known, *KNOWN_COMMANDS], n=2)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        print(f"hookloop: error: unknown command {name!r}{hint} (commands: {', '.join(known)}; "
              "see hookloop --help)", file=sys.stderr)
        return 2
    epilog = _epilog(commands)
    parser = argparse.ArgumentParser(prog="hookloop", description="hookloop's command line.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hookloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("plugins", help="list the installed plugins; --plan prints a call order",
                       description="List the installed plugins. --plan SPEC... prints the call "
                       "order of every hook for these plugin specs: NAME, NAME:OPTIONS (a JSON "
                       "object) or a JSON array or object of specs, as Loop(plugins=...) takes them.")
    p.add_argument("--plan", nargs="*", metavar="SPEC", default=None,
                   help="print the call order of every hook for these plugin specs (after the "
                        "always-on plugins)")
    p.add_argument("--no-autoload", dest="autoload", action="store_false",
                   help="leave the always-on plugins out of the plan")
    p.set_defaults(func=_cmd_plugins)
    args = _out_of(parser, argv)
    if isinstance(args, int):
        return args
    return int(args.func(args))


def _epilog(commands: dict[str, Any]) -> str:
    lines = ["commands of installed distributions (entry-point group hookloop.commands):"]
    for name, ep in sorted(commands.items()):
        dist = getattr(ep, "dist", None)
        lines.append(f"  {name:<12}from {dist.metadata['Name'] if dist is not None else ep.value}")
    for name, (dist, _checkout) in KNOWN_COMMANDS.items():
        if name in commands:
            continue
        lines.append(f"  {name:<12}not installed (pip install {dist})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
