"""Install hookloop and its plugin distributions into the running Python without a
package index (the lent GPU machine has none).

``python benchmarks/install_offline.py [--wheels DIR] [--mode auto|force|skip]``

1. Wheels carried in ``DIR`` (``benchmarks/wheels/`` or ``HOOKLOOP_BENCH_WHEELS``), if
   any, are installed first (``--no-index --no-deps --find-links DIR``): the SDKs the
   machine lacks (torchinfo, pytorch-ignite, ...), as many as fit the 64 MiB carry.
2. Every distribution in the repository (the root, ``plugins/*``, ``examples/*``) whose
   dependencies are installed, or are other distributions of the repository being
   installed, is installed from a copy of its sources with ``pip install --no-index
   --no-deps --no-build-isolation`` (the sources stay clean). The others are left out,
   and the missing dependency is printed.

``--mode auto`` (default) leaves distributions that are already installed alone (a
development venv keeps its editable installs); ``force`` reinstalls them; ``skip``
only prints what would be done. Uses only the standard library and pip.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_project(folder: Path) -> tuple[str, list[str]]:
    """Name and dependency names (version specifiers dropped) of ``folder``'s
    pyproject.toml."""
    text = (folder / "pyproject.toml").read_text()
    try:
        import tomllib

        project = tomllib.loads(text)["project"]
        name, deps = project["name"], project.get("dependencies", [])
    except ImportError:  # Python 3.10: a small reading of the two fields
        name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        deps = re.findall(r'"([^"]+)"', block.group(1)) if block else []
    return name, [m.group(1) for d in deps if (m := _NAME.match(d))]


def installed(name: str) -> str | None:
    """Installed version of distribution ``name``, or ``None``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def projects() -> dict[str, tuple[Path, list[str]]]:
    """Every distribution of the repository: name to (folder, dependency names)."""
    out = {}
    for folder in [ROOT, *sorted(ROOT.glob("plugins/*")), *sorted(ROOT.glob("examples/*"))]:
        if (folder / "pyproject.toml").is_file():
            name, deps = read_project(folder)
            out[_norm(name)] = (folder, [_norm(d) for d in deps])
    return out


def plan(found: dict[str, tuple[Path, list[str]]]) -> tuple[list[str], dict[str, str]]:
    """Which repository distributions can be installed (their dependencies are
    installed or installable from the repository), and why the others cannot."""
    ok = set(found)
    left_out: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name in sorted(ok):
            for dep in found[name][1]:
                if dep in ok or (dep not in found and installed(dep) is not None):
                    continue
                left_out[name] = f"needs {dep}" + (" (left out)" if dep in found else " (not installed)")
                ok.discard(name)
                changed = True
                break
    return [n for n in found if n in ok], left_out


def _copy_sources(folder: Path, stage: Path) -> Path:
    """A clean copy of a distribution's sources (no build outputs, no tests); for the
    root, only what its build reads."""
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "tests", "*.pyc")
    if folder != ROOT:
        dest = stage / folder.name
        shutil.copytree(folder, dest, ignore=ignore)
        return dest
    dest = stage / "hookloop-root"
    dest.mkdir()
    for item in ROOT.iterdir():
        if item.name in ("pyproject.toml", "hookloop") or item.name.startswith(("README", "LICENSE")):
            if item.is_dir():
                shutil.copytree(item, dest / item.name, ignore=ignore)
            else:
                shutil.copy2(item, dest / item.name)
    return dest


def pip(args: list[str]) -> None:
    """Run pip of this Python with no index; raise on failure."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
           "--no-compile", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"install_offline: pip failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_wheels = os.environ.get("HOOKLOOP_BENCH_WHEELS") or str(ROOT / "benchmarks" / "wheels")
    parser.add_argument("--wheels", default=default_wheels, help="folder of carried wheels")
    parser.add_argument("--mode", choices=("auto", "force", "skip"),
                        default=os.environ.get("HOOKLOOP_BENCH_INSTALL", "auto"))
    args = parser.parse_args(argv)
    wheels = Path(args.wheels)
    carried = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    print(f"install_offline: python {sys.executable}; carried wheels: "
          + (", ".join(w.name for w in carried) if carried else f"none ({wheels} has no .whl)"))
    if carried and args.mode != "skip":
        fresh = [w for w in carried if args.mode == "force" or installed(w.name.split("-")[0]) is None]
        if fresh:
            pip(["--find-links", str(wheels), *map(str, fresh)])
    found = projects()
    ok, left_out = plan(found)
    todo = [n for n in ok if args.mode == "force" or installed(n) is None]
    kept = [n for n in ok if n not in todo]
    if todo and args.mode != "skip":
        with tempfile.TemporaryDirectory(prefix="hookloop-install-") as tmp:
            sources = [str(_copy_sources(found[n][0], Path(tmp))) for n in todo]
            extra = ["--find-links", str(wheels)] if carried else []
            pip([*extra, *(["--force-reinstall"] if args.mode == "force" else []), *sources])
    print("install_offline: installed: " + (", ".join(todo) if args.mode != "skip" and todo else "none"))
    if kept:
        print("install_offline: already installed, kept: " + ", ".join(kept))
    if left_out:
        print("install_offline: left out (SDK missing): "
              + "; ".join(f"{n} ({why})" for n, why in sorted(left_out.items())))
    else:
        print("install_offline: left out: none")
    peers = {p: installed(p) for p in ("pytorch-ignite", "lightning", "matplotlib")}
    print("install_offline: benchmark peers: " + ", ".join(f"{p} {v or 'MISSING'}" for p, v in peers.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
