"""Durable file writes, the manifest, and safe checkpoint names.

Every file reaches its final name the same way: written to a temporary file in the
same directory (hashed while written), flushed and fsynced, ``os.replace``d into place,
then the directory is fsynced. A reader therefore sees either the old file or the
complete new one, never a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import string
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "TMP_MARK",
    "atomic_write",
    "cleanup_tmp_files",
    "file_digest",
    "fsync_dir",
    "missing_fields",
    "read_manifest",
    "render_filename",
    "sanitize_name",
    "template_fields",
    "write_manifest",
]

MANIFEST_NAME = "checkpoints.json"
MANIFEST_FORMAT = "hookloop.checkpoint.manifest/1"
TMP_MARK = ".tmp-"
_TMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{32}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+\-]")


class HashingWriter:
    """A write-only file wrapper that hashes (SHA-256) and counts what goes through."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        """Write ``data`` (bytes-like) and update the hash and size."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += view.nbytes
        self._f.write(view)
        return view.nbytes

    def flush(self) -> None:
        """Flush the underlying file's Python buffer."""
        self._f.flush()

    def hexdigest(self) -> str:
        """SHA-256 of everything written so far."""
        return self._hash.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and unlinks inside it are durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: str | os.PathLike[str], write: Callable[[HashingWriter], None]) -> tuple[int, str]:
    """Write a file durably and atomically; returns ``(size, sha256)``.

    ``write(f)`` writes the content to ``f``. The temporary file is removed when
    anything fails (including a ``KeyboardInterrupt``) and the error propagates; an
    existing file at ``final`` is left untouched until the new one is complete.
    """
    final = Path(final)
    directory = final.parent
    tmp = directory / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return writer.size, writer.hexdigest()


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 22) -> tuple[int, str]:
    """``(size, sha256)`` of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def cleanup_tmp_files(directory: str | os.PathLike[str]) -> list[str]:
    """Remove temporary files left by writes that were killed, and the temporary
    directories of sharded checkpoints that were never completed; returns their names.

    Only names of the exact form this package creates are touched.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if _TMP_RE.match(name):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(name)
    return removed


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory, ``None`` when there is none.

    Raises ``ValueError`` when the file exists but is not a manifest (e.g. damaged by
    hand); the loader then scans the directory instead.
    """
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a hookloop checkpoint manifest")
    return data


def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write the manifest atomically (temporary file, fsync, replace, directory fsync)."""
    data = json.dumps(dict(manifest), indent=1, sort_keys=True).encode("utf-8")
    atomic_write(Path(directory) / MANIFEST_NAME, lambda f: f.write(data))


def sanitize_name(name: str, max_len: int = 150) -> str:
    """Make ``name`` a plain file name: no separators, no ``..``, no leading dot.

    Characters other than letters, digits and ``._=+-`` become ``_``, so a metric
    named ``val/loss`` or a template like ``../../x`` or ``/abs/path`` can never
    name a file outside the checkpoint directory. A leading ``-`` is kept: it is the
    sign of a score (``-0.5000`` and ``0.5000`` are different checkpoints).
    """
    name = _UNSAFE.sub("_", name)
    name = re.sub(r"\.{2,}", "_", name)
    name = name.lstrip("._") or "checkpoint"
    return name[:max_len]


def _format_value(value: Any, spec: str, conversion: str | None) -> str:
    if conversion == "r":
        value = repr(value)
    elif conversion == "s":
        value = str(value)
    elif conversion == "a":
        value = ascii(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan / inf / -inf whatever the spec
    return format(value, spec)


BUILTIN_FIELDS = ("epoch", "step")


def template_fields(template: str) -> list[str]:
    """The field names of a filename template, checked: raises ``ValueError`` naming the
    template and the field for a malformed one.

    Refused: unbalanced braces, positional fields (``{}``, ``{0}``), attribute or index
    access on ``epoch``/``step`` (``{epoch.real}``, ``{step[0]}``), indexing anywhere
    (``{a[0]}``) and nested specs (``{val/loss:{w}}``). A dotted name such as
    ``{val.loss}`` is a metric name, looked up whole.
    """
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"filename template {template!r} is malformed ({exc}); escape a literal "
                         f"brace as '{{{{' or '}}}}'") from exc
    for _literal, field, spec, _conversion in parsed:
        if field is None:
            continue
        problem = None
        if field == "" or field.isdigit():
            problem = "positional fields are not supported"
        elif "[" in field or "]" in field:
            problem = "indexing is not supported"
        elif field.split(".", 1)[0] in BUILTIN_FIELDS and "." in field:
            problem = "attribute access is not supported"
        elif spec and ("{" in spec or "}" in spec):
            problem = "nested format specs are not supported"
        if problem:
            raise ValueError(
                f"filename template {template!r}: field {{{field}}}: {problem}; name a field "
                f"as {{epoch}}, {{step}} or a logged metric such as {{val/loss:.4f}}"
            )
        fields.append(field)
    return fields


def missing_fields(template: str, namespace: Mapping[str, Any]) -> list[str]:
    """The fields of ``template`` that ``namespace`` cannot fill (``val_loss`` fills
    from ``val/loss``)."""
    names = set(namespace) | {k.replace("/", "_") for k in namespace}
    return [f for f in template_fields(template) if f not in names]


def render_filename(template: str, namespace: Mapping[str, Any]) -> str:
    """Render a filename template such as ``"{epoch:03d}-{step}-{val/loss:.4f}"``.

    Field names are looked up whole in ``namespace`` (so ``val/loss`` works), with
    ``val_loss`` accepted for ``val/loss``; a metric that is not available renders
    as ``na``. The result is passed through :func:`sanitize_name`.
    """
    template_fields(template)  # a malformed template raises, naming itself
    lookup = dict(namespace)
    for key, value in list(lookup.items()):
        lookup.setdefault(key.replace("/", "_"), value)
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        parts.append(literal)
        if field is None:
            continue
        if field not in lookup:
            parts.append("na")
            continue
        try:
            parts.append(_format_value(lookup[field], spec or "", conversion))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"filename template {template!r}: cannot format {field!r}={lookup[field]!r} "
                f"with spec {spec!r}: {exc}"
            ) from exc
    return sanitize_name("".join(parts))
