"""Loading checkpoints: verified, ``weights_only``, with fallback to the previous one."""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hookloop.resume import ResumeError, align_compiled_keys, model_problems, sharded_state
from hookloop_checkpoint._io import MANIFEST_NAME, file_digest, read_manifest, sanitize_name

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "LoadResult",
    "UnsafeCheckpointError",
    "WeightsOnlyCheckpointError",
    "align_compiled_keys",
    "best_checkpoint",
    "is_sharded_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_checkpoint",
    "load_shards",
]

log = logging.getLogger("hookloop.checkpoint")

CHECKPOINT_FORMAT = "hookloop.checkpoint/1"
FORMAT_VERSION = 1
SHARDED_STATE_FILE = "loop.pt"
"""In a sharded checkpoint's directory: everything but the model and optimizer shards
(counters, RNG of every rank, plugin states, hparams), written by rank 0."""
DCP_METADATA = ".metadata"
"""In a sharded checkpoint's directory: torch.distributed.checkpoint's index of the shards."""


class CheckpointError(Exception):
    """Base class of the errors this package raises about checkpoint files."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint was found where one was asked for."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, damaged, or does not match its manifest checksum."""


class UnsafeCheckpointError(CheckpointError):
    """A file carries a pickle payload (arbitrary code) and was refused, not executed."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """The weights do not fit the model: missing, unexpected or differently shaped keys."""


class WeightsOnlyCheckpointError(CheckpointError):
    """A checkpoint saved with ``weights_only=True`` was asked to resume a run; it holds
    only the model's weights (load them with :func:`load`)."""




@dataclass
class LoadResult:
    """What :func:`load` did.

    :ivar path: the checkpoint file the weights came from.
    :ivar missing: model keys that the checkpoint did not provide.
    :ivar unexpected: checkpoint keys the model does not have (ignored).
    :ivar skipped: keys whose shapes differ, skipped with ``skip_mismatched=True``.
    :ivar metrics: the metrics recorded with the checkpoint (empty for plain files).
    """

    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = next((ln.strip() for ln in text.splitlines()
                       if "GLOBAL" in ln or "global" in ln.lower() or "Unsupported" in ln), "")
        if "global" in detail.lower():
            hint = ""
            if path.name.endswith(".model.pt"):
                hint = (" This is the pickled model object written by save_model=True; load it "
                        "only if you trust its source, with torch.load(path, weights_only=False).")
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file carries a pickle payload that "
                f"torch.load(weights_only=True) does not allow (it could run arbitrary code); "
                f"nothing from it was executed.{hint} Detail: {detail}"
            ) from exc
        raise CorruptCheckpointError(f"{path}: not a readable checkpoint ({detail or exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CheckpointNotFoundError(f"{path}: no such file") from exc
        raise CorruptCheckpointError(f"{path}: damaged or truncated: {exc}") from exc


def _verify(path: Path, expected: Mapping[str, Any] | None) -> None:
    if not path.exists():
        raise CorruptCheckpointError(f"{path}: listed in the manifest but missing")
    if not expected:
        return
    size = path.stat().st_size
    if "size" in expected and size != expected["size"]:
        raise CorruptCheckpointError(f"{path}: {size} bytes; the manifest recorded {expected['size']} "
                                     "(truncated or overwritten)")
    if "sha256" in expected:
        _, digest = file_digest(path)
        if digest != expected["sha256"]:
            raise CorruptCheckpointError(f"{path}: SHA-256 does not match the manifest (corrupt)")


def _read_entry(directory: Path, entry: Mapping[str, Any], map_location: Any,
                loop: Loop | None = None, shards: bool = True) -> dict[str, Any]:
    files = entry.get("files") or {}
    if entry.get("sharded"):
        primary = entry["primary"]
        if not isinstance(primary, str) or sanitize_name(primary) != primary:
            raise UnsafeCheckpointError(f"{directory / MANIFEST_NAME}: refused the sharded checkpoint "
                                        f"{primary!r}: not a plain directory name inside {directory}")
    for fname, info in files.items():
        _verify(directory / fname, info)
    if entry.get("sharded"):
        return _read_sharded(directory / entry["primary"], map_location, loop, shards)
    return _read_file(directory / entry["primary"], map_location, verified=True)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is the directory of one sharded checkpoint (written from a model
    sharded with ``fully_shard``: DCP's shards plus the loop's small state)."""
    path = Path(path)
    return (path / SHARDED_STATE_FILE).is_file() and (path / DCP_METADATA).is_file()


def _saved_layout(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[int, tuple[set[str], int]]] | None:
    """From DCP's index: the model's keys and global shapes, and per optimizer the
    ``state`` tensors (``"<parameter>/<name>"``) and the number of param groups;
    ``None`` when the index does not say (another planner wrote it)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:
        raise CorruptCheckpointError(f"{path}: unreadable {DCP_METADATA} ({exc!r})") from exc
    paths = getattr(metadata, "planner_data", None)
    if not isinstance(paths, Mapping):
        return None
    model: dict[str, tuple[int, ...]] = {}
    optims: dict[int, tuple[set[str], int]] = {}
    for key, where in paths.items():
        info = metadata.state_dict_metadata.get(key)
        if not isinstance(where, tuple) or len(where) < 2:
            continue
        if where[0] == "model" and len(where) == 2:
            model[str(where[1])] = tuple(getattr(info, "size", ()))
        elif where[0] == "optimizers" and len(where) >= 4 and isinstance(where[1], int):
            state, groups = optims.setdefault(where[1], (set(), 0))
            if where[2] == "state":
                state.add(f"{where[3]}/{where[4] if len(where) > 4 else ''}")
            elif where[2] == "param_groups" and isinstance(where[3], int):
                optims[where[1]] = (state, max(groups, where[3] + 1))
    return model, optims


def _check_sharded(path: Path, small: Mapping[str, Any], template: Mapping[str, Any],
                   loop: Loop) -> list[str]:
    """What keeps the shards at ``path`` from loading into ``template`` (this loop's
    sharded state), found before anything is read: model keys and shapes, optimizer
    classes and count, their state tensors and param groups."""
    layout = _saved_layout(path)
    if layout is None:
        return []
    model, optims = layout
    problems = model_problems(template["model"], model)
    opts = template["optimizers"]
    if len(optims) != len(opts):
        return [*problems, f"optimizers: the checkpoint has {len(optims)} optimizer states; the loop "
                           f"has {len(opts)}"]
    saved_classes = [o.get("class") for o in ((small.get("layout") or {}).get("optimizers") or [])]
    for i, (sd, opt) in enumerate(zip(opts, loop.optimizers, strict=True)):
        saved_cls = saved_classes[i] if i < len(saved_classes) else None
        if saved_cls is not None and saved_cls != type(opt).__name__:
            problems.append(f"optimizer[{i}]: the checkpoint holds a {saved_cls}; the loop has a "
                            f"{type(opt).__name__}")
            continue
        state, groups = optims.get(i, (set(), 0))
        mine_groups = len(sd.get("param_groups", []))
        if groups != mine_groups:
            problems.append(f"optimizer[{i}]: {groups} param group(s) in the checkpoint, {mine_groups} "
                            f"in the loop")
        wanted = {f"{p}/{n}" for p, entry in sd.get("state", {}).items() for n, v in entry.items()
                  if isinstance(v, torch.Tensor)}
        absent = sorted(wanted - state)
        if absent:
            problems.append(f"optimizer[{i}]: state missing from the checkpoint: "
                            f"{absent[:6]}{' ...' if len(absent) > 6 else ''}")
    return problems


def _read_sharded(path: Path, map_location: Any, loop: Loop | None, shards: bool = True) -> dict[str, Any]:
    """A sharded checkpoint as a dict for ``loop.load_state_dict``: the small state from
    ``loop.pt`` and, unless ``shards=False``, the shards (:func:`load_shards`, a
    collective). Without the shards, the dict has no ``model`` and ``optimizers``."""
    small = _read_file(path / SHARDED_STATE_FILE, map_location, verified=True)
    if loop is None:
        raise CheckpointError(
            f"{path} is a sharded checkpoint (written by every rank with torch.distributed.checkpoint "
            f"from a model sharded with fully_shard): its shards load only into a loop's sharded "
            f"model. Pass the loop on every rank: load_checkpoint(path, loop=loop), or resume "
            f"with Checkpoint(resume=...); for the weights alone, convert it to one file with "
            f"torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    if not loop.sharded:
        raise ResumeError(
            f"checkpoint does not fit this loop; nothing was restored:\n  {path} holds sharded model "
            f"and optimizer state (saved from a model sharded with fully_shard, written with "
            f"torch.distributed.checkpoint); this loop's model is not sharded. Shard it with "
            f"torch.distributed.fsdp.fully_shard as the saving run did (on any world size), or "
            f"convert the checkpoint with torch.distributed.checkpoint.format_utils.dcp_to_torch_save "
            f"to load its weights")
    if not small.get("sharded") or not isinstance(small.get("checkpoint"), dict):
        raise CorruptCheckpointError(f"{path / SHARDED_STATE_FILE}: not the state of a sharded checkpoint")
    small["checkpoint"]["path"] = str(path)
    return load_shards(small, loop) if shards else small


def load_shards(small: dict[str, Any], loop: Loop) -> dict[str, Any]:
    """Complete a sharded checkpoint read without its shards: check DCP's index against
    ``loop``'s sharded state, then load the shards with
    ``torch.distributed.checkpoint.load`` into a copy of that state (DCP reshards when
    the world size changed). Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    path = Path(small["checkpoint"]["path"])
    template = sharded_state(loop, copy=True)
    problems = _check_sharded(path, small, template, loop)
    if problems:
        raise ResumeError(f"sharded checkpoint {path} does not fit this loop; nothing was restored:\n  "
                          + "\n  ".join(problems))
    try:
        dcp.load(template, checkpoint_id=str(path))
    except Exception as exc:  # every rank raises: DCP gathers the read results
        raise CorruptCheckpointError(f"{path}: torch.distributed.checkpoint could not load the shards: "
                                     f"{exc}") from exc
    return {**small, **template}


def _read_file(path: Path, map_location: Any, verified: bool = False) -> dict[str, Any]:
    if not verified:
        manifest = _try_manifest(path.parent)
        entry = _entry_for(manifest, path.name) if manifest else None
        if entry is not None:
            for fname, info in (entry.get("files") or {}).items():
                _verify(path.parent / fname, info)
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    meta = ckpt.get("checkpoint")
    if isinstance(meta, Mapping) and meta.get("format", "").startswith("hookloop.checkpoint/"):
        version = int(meta.get("version", 0))
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                                  f"hookloop-checkpoint reads ({FORMAT_VERSION}); upgrade it")
        weights = meta.get("weights_file")
        if weights:
            from safetensors.torch import load_file

            wpath = _weights_path(path, weights)
            try:
                device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
                ckpt["model"] = load_file(wpath, device=device)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{wpath}: weights file missing") from exc
            except Exception as exc:
                raise CorruptCheckpointError(f"{wpath}: damaged safetensors file: {exc}") from exc
        meta["path"] = str(path)  # type: ignore[index]
    return ckpt


def _weights_path(path: Path, weights: Any) -> Path:
    """The weights file a checkpoint names, refused unless it is a plain file name in
    the checkpoint's own folder (a crafted ``../../etc/passwd`` is never opened)."""
    if (not isinstance(weights, str) or not weights or weights in (".", "..")
            or Path(weights).name != weights or "/" in weights or "\\" in weights
            or weights.startswith(".")):
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its weights_file {weights!r} is not a plain file name in "
            f"{path.parent}; a checkpoint may only name a file beside it. Nothing was opened; "
            f"check where this checkpoint came from"
        )
    wpath = path.parent / weights
    if wpath.resolve().parent != path.parent.resolve():
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its weights_file {weights!r} resolves to {wpath.resolve()}, "
            f"outside {path.parent}. Nothing was opened; check where this checkpoint came from"
        )
    return wpath


def _try_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(directory)
    except ValueError as exc:
        warnings.warn(f"hookloop-checkpoint: {exc}; scanning {directory} instead", RuntimeWarning,
                      stacklevel=3)
        return None


def _entry_for(manifest: Mapping[str, Any], primary: str) -> Mapping[str, Any] | None:
    for entry in manifest.get("checkpoints", []):
        if entry.get("primary") == primary:
            return entry
    return None


def list_checkpoints(dirpath: str | Path) -> list[dict[str, Any]]:
    """The complete checkpoints the manifest of ``dirpath`` lists, newest first (each a
    dict with ``name``, ``primary``, ``epoch``, ``step``, ``metrics``, ``score``,
    ``files``...). Empty when there is no manifest."""
    manifest = _try_manifest(Path(dirpath))
    if not manifest:
        return []
    return sorted(manifest.get("checkpoints", []), key=lambda e: e.get("seq", 0), reverse=True)


def latest_checkpoint(dirpath: str | Path) -> Path | None:
    """Path of the newest checkpoint the manifest lists (not verified), or ``None``."""
    entries = list_checkpoints(dirpath)
    return Path(dirpath) / entries[0]["primary"] if entries else None


def best_checkpoint(dirpath: str | Path) -> Path | None:
    """Path of the best checkpoint by the monitored metric (not verified), or ``None``
    when the run had no monitor or no finite score yet."""
    manifest = _try_manifest(Path(dirpath))
    if not manifest or not manifest.get("best"):
        return None
    return Path(dirpath) / manifest["best"]


def _scan(directory: Path, map_location: Any, weights_ok: bool = False) -> dict[str, Any]:
    candidates = sorted((p for p in directory.glob("*.pt") if not p.name.endswith(".model.pt")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    errors = []
    for path in candidates:
        try:
            ckpt = _read_file(path, map_location, verified=True)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            errors.append(str(exc))
            continue
        if not weights_ok and _is_weights_only(ckpt):
            continue
        if isinstance(ckpt.get("checkpoint"), Mapping) and ("format" in ckpt or weights_ok):
            if errors:
                warnings.warn(f"hookloop-checkpoint: skipped damaged files: {errors}", RuntimeWarning,
                              stacklevel=3)
            return ckpt
    raise CheckpointNotFoundError(
        f"{directory}: no readable hookloop checkpoint (no {MANIFEST_NAME}; "
        f"{len(candidates)} .pt file(s) tried{': ' + '; '.join(errors) if errors else ''})"
    )


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", *, which: str = "latest", loop: Loop | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :class:`~hookloop_checkpoint.Checkpoint` as a dict
    that ``loop.fit(..., resume=...)`` and ``loop.load_state_dict`` accept.

    :param path: a checkpoint file, the directory of one sharded checkpoint, or a
        checkpoint folder (``dirpath``). For a folder, ``which="latest"`` takes the
        newest complete checkpoint and, when a file is truncated or fails its manifest
        checksum, falls back to the previous complete one with a warning;
        ``which="best"`` takes the best by the monitored metric (the latest when there
        is no best), with the same fallback.
    :param map_location: as for ``torch.load``.
    :param loop: the loop to resume, needed for a sharded checkpoint (saved from a model
        sharded with ``fully_shard``): its shards are loaded with
        ``torch.distributed.checkpoint.load`` into a copy of this loop's sharded state
        (resharded when the world size changed), so every rank must make the call.
        Ignored for other checkpoints.
    :raises CheckpointNotFoundError: nothing loadable there (never a silent fresh start).
    :raises UnsafeCheckpointError: the file carries a pickle payload; it is refused and
        nothing in it runs. Loading always uses ``torch.load(weights_only=True)``; the
        shards of a sharded checkpoint are read by torch.distributed.checkpoint, whose
        index (``.metadata``) is a pickle: load those only from a trusted source.
    :raises CorruptCheckpointError: a single file given by path is damaged.
    :raises hookloop.ResumeError: a sharded checkpoint that does not fit ``loop`` (a
        model that is not sharded, other keys or shapes, another optimizer).
    """
    return _load_any(path, map_location, which, weights_ok=False, loop=loop)


def _is_weights_only(ckpt: Mapping[str, Any]) -> bool:
    meta = ckpt.get("checkpoint")
    return isinstance(meta, Mapping) and bool(meta.get("weights_only"))


def _load_any(path: str | Path, map_location: Any, which: str, *, weights_ok: bool,
              loop: Loop | None = None, shards: bool = True) -> dict[str, Any]:
    """:func:`load_checkpoint`; ``weights_ok`` also accepts (and, in a folder, picks)
    checkpoints saved with ``weights_only=True``; ``shards=False`` leaves the shards of a
    sharded checkpoint for :func:`load_shards`."""
    if which not in ("latest", "best"):
        raise ValueError(f"which={which!r}; expected 'latest' or 'best'")
    path = Path(path)
    if is_sharded_checkpoint(path):
        manifest = _try_manifest(path.parent)
        entry = _entry_for(manifest, path.name) if manifest else None
        for fname, info in ((entry or {}).get("files") or {}).items():
            _verify(path.parent / fname, info)
        return _read_sharded(path, map_location, loop, shards)
    if not path.is_dir():
        if not path.exists():
            raise CheckpointNotFoundError(f"{path}: no such checkpoint file or directory")
        ckpt = _read_file(path, map_location)
        if not weights_ok and _is_weights_only(ckpt):
            raise WeightsOnlyCheckpointError(
                f"{path}: holds only the model's weights (saved with weights_only=True), not a "
                f"loop state to resume: load the weights with hookloop_checkpoint.load({str(path)!r}, "
                f"model), or resume from a full checkpoint")
        return ckpt
    manifest = _try_manifest(path)
    if manifest is None:
        return _scan(path, map_location, weights_ok)
    entries = sorted(manifest.get("checkpoints", []), key=lambda e: e.get("seq", 0), reverse=True)
    if which == "best" and manifest.get("best"):
        best = [e for e in entries if e.get("primary") == manifest["best"]]
        entries = best + [e for e in entries if e not in best]
    if not weights_ok:
        partial = [e for e in entries if e.get("weights_only")]
        entries = [e for e in entries if not e.get("weights_only")]
        if partial and not entries:
            raise WeightsOnlyCheckpointError(
                f"{path}: every checkpoint the manifest lists ({len(partial)}) holds only the "
                f"model's weights (weights_only=True); none can resume a run. Load weights with "
                f"hookloop_checkpoint.load({str(path)!r}, model)")
    if not entries:
        raise CheckpointNotFoundError(f"{path}: the manifest lists no checkpoint")
    errors = []
    for entry in entries:
        try:
            ckpt = _read_entry(path, entry, map_location, loop, shards)
        except CorruptCheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(
                f"hookloop-checkpoint: {len(errors)} newer checkpoint(s) unusable "
                f"({'; '.join(errors)}); fell back to {entry['primary']} "
                f"(epoch {entry.get('epoch')}, step {entry.get('step')})",
                RuntimeWarning,
                stacklevel=2,
            )
            log.warning("hookloop.checkpoint: fell back to %s: %s", entry["primary"], errors)
        return ckpt
    raise CheckpointNotFoundError(f"{path}: every checkpoint in the manifest is unusable: {errors}")


def _model_state(ckpt: Mapping[str, Any], path: Path) -> dict[str, Any]:
    for key in ("model", "model_state_dict", "state_dict"):
        value = ckpt.get(key)
        if isinstance(value, Mapping):
            return dict(value)
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)  # a plain torch.save(model.state_dict()) file
    raise CheckpointError(f"{path}: no model weights found (keys: {sorted(ckpt)[:20]})")


def load(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    which: str = "best",
    prefix: str | None = None,
    skip_mismatched: bool = False,
) -> LoadResult:
    """Load a checkpoint's model weights into ``model`` (and optionally the optimizer
    state), e.g. a trained backbone into a new model for transfer learning.

    :param path: a checkpoint file or directory (see :func:`load_checkpoint`; for a
        directory the default is the best checkpoint). Plain ``state_dict`` files and
        dicts with ``model_state_dict`` load too.
    :param model: the module to load into.
    :param optimizer: also restore the first optimizer's state saved in the checkpoint.
    :param strict: raise when the model has keys the checkpoint lacks or the
        checkpoint has keys the model lacks; ``False`` loads the keys both have.
    :param map_location: as for ``torch.load``.
    :param which: ``"best"`` or ``"latest"`` for a directory.
    :param prefix: take only checkpoint keys starting with ``prefix`` and strip it
        (``prefix="backbone."`` loads the backbone of a whole model into a backbone).
    :param skip_mismatched: leave keys whose shapes differ (e.g. a new head) at their
        current values instead of raising.
    :raises CheckpointMismatchError: listing missing and unexpected keys and shape
        mismatches.
    :raises UnsafeCheckpointError: the file carries a pickle payload (never executed).
    """
    ckpt = _load_any(path, map_location, which, weights_ok=True)
    meta = ckpt.get("checkpoint")
    source = Path(meta["path"]) if isinstance(meta, Mapping) and "path" in meta else Path(path)
    state = _model_state(ckpt, source)
    if not prefix:  # a torch.compile'd model's weights into a plain one, or back
        state = align_compiled_keys(state, model.state_dict().keys())
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointMismatchError(f"{source}: no key starts with prefix {prefix!r}")
        state = align_compiled_keys(state, model.state_dict().keys())
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        k for k in set(own) & set(state)
        if isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    )
    problems = []
    if strict and missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {missing[:20]}")
    if strict and unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the model): {unexpected[:20]}")
    if mismatched and not skip_mismatched:
        problems.append("shape mismatches: " + ", ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in mismatched[:20]))
    if problems:
        raise CheckpointMismatchError(
            f"cannot load {source} into {type(model).__name__}: " + "; ".join(problems)
            + ". Use strict=False to load the keys both have, prefix= to select a submodule, "
              "skip_mismatched=True to keep differently shaped layers."
        )
    for k in mismatched:
        state.pop(k)
    model.load_state_dict(state, strict=False)
    if optimizer is not None:
        if _is_weights_only(ckpt):
            raise WeightsOnlyCheckpointError(
                f"{source}: saved with weights_only=True, it holds no optimizer state; call load() "
                f"without optimizer, or use a full checkpoint")
        opts = ckpt.get("optimizers") or ([ckpt["optimizer_state_dict"]] if "optimizer_state_dict" in ckpt
                                          else [])
        if not opts:
            raise CheckpointError(f"{source}: holds no optimizer state")
        optimizer.load_state_dict(opts[0])
    metrics = dict(meta.get("metrics") or {}) if isinstance(meta, Mapping) else {}
    log.info("hookloop.checkpoint: loaded %d tensors from %s into %s", len(state), source,
             type(model).__name__)
    return LoadResult(str(source), missing, unexpected, mismatched, metrics)
