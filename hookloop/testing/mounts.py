"""Real small file systems for fault tests (a full disk, a read-only mount), as
:mod:`hookloop.testing` offers them: mounted as root where the process may, else in a
private user and mount namespace (``unshare -rm``); a test that can do neither is
skipped with the capability that is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["tmpfs_mount_prefix", "unmount"]


def _run_quiet(cmd: list[str]) -> tuple[bool, str]:
    """Run ``cmd``; whether it succeeded, and its last error line."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = (out.stderr or out.stdout).strip().splitlines()
    return out.returncode == 0, lines[-1] if lines else f"exit status {out.returncode}"


def unmount(path: Path) -> None:
    """Unmount whatever is still mounted on ``path`` (lazily if busy)."""
    for _ in range(4):
        if not os.path.ismount(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def tmpfs_mount_prefix(probe: Path, purpose: str = "a fault test") -> list[str]:
    """How a subprocess can mount a tmpfs: ``[]`` directly (root with CAP_SYS_ADMIN, as
    in a privileged container), or ``["unshare", "-rm"]`` to run it in a private user
    and mount namespace. ``probe`` is a folder this function may create and mount once
    to find out. Skips the calling test (``pytest.skip``), naming what is missing for
    ``purpose``, when neither works."""
    import pytest

    why: list[str] = []
    if shutil.which("mount") is None:
        pytest.skip(f"no `mount` command: cannot mount a tmpfs for {purpose}")
    if os.geteuid() == 0:
        probe.mkdir(exist_ok=True)
        try:
            ok, err = _run_quiet(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)])
        finally:
            unmount(probe)
        if ok:
            return []
        why.append(f"running as root, `mount -t tmpfs` failed (CAP_SYS_ADMIN missing?): {err}")
    else:
        why.append(f"not root (uid {os.geteuid()}): no CAP_SYS_ADMIN to mount a tmpfs")
    if shutil.which("unshare") is None:
        why.append("no `unshare` command for a user+mount namespace")
    else:
        ok, err = _run_quiet(["unshare", "-rm", "true"])
        if ok:
            return ["unshare", "-rm"]
        why.append(f"`unshare -rm` (user+mount namespaces) not allowed: {err}")
    pytest.skip(f"cannot mount a tmpfs for {purpose}: " + "; ".join(why))
