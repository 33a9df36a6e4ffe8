"""The ``hookloop`` command: ``hookloop plugins [--plan]`` and ``hookloop demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hookloop.plugins import PluginManager, available_plugins

__all__ = ["main"]


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
        rows.append((name, p.distribution, p.version, status, ", ".join(p.hooks) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    if args.plan:
        pm = PluginManager()
        for name in sorted(found):
            p = found[name]
            if p.obj is None:
                continue
            try:
                pm.load(name)
            except Exception as exc:  # a plugin needing options still shows in the table
                print(f"# {name}: not in the plan ({exc})", file=sys.stderr)
        print()
        print("call plan (every installed plugin enabled with default options):")
        print(pm.format_plan())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hookloop`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from hookloop.demo import main as demo_main

        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(prog="hookloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--plan", action="store_true", help="print the call order of every hook")
    p.set_defaults(func=_cmd_plugins)
    sub.add_parser("demo", help="run the end-to-end demo (see hookloop demo --help)")
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
