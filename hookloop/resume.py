"""Resume and state: what ``loop.state_dict()`` holds and how a checkpoint is restored.

A resume is one core step, requested through ``fit(resume=...)`` or by a plugin's
``on_resume``; it runs before any ``on_fit_start``. Loading has two phases:

1. **validate** everything (format, model keys and shapes, optimizer and scheduler
   layout, every plugin's state) and collect every problem; raise
   :class:`ResumeError` listing them all, having changed nothing;
2. **apply**: model, plugins (their tensors moved to ``loop.device``), optimizers,
   schedulers, scaler, counters, pending metrics, RNG and loader generators (kept on
   the CPU, where torch needs them); then ``on_load_checkpoint`` fires.

Each rank restores its own entry of ``rng`` (its RNG, loader position and metrics not
yet reduced).

A model sharded with FSDP2 (``fully_shard``; :attr:`StateAPI.sharded`) changes the form of
two parts only: ``model`` and ``optimizers`` hold this rank's shards, as
``torch.distributed.checkpoint.state_dict`` gives them (``DTensor`` values, optimizer state
keyed by parameter name; see :func:`sharded_state`), and the checkpoint says
``"sharded": True``. Such a checkpoint is written and read with
``torch.distributed.checkpoint`` (the checkpoint plugin does); restoring it uses
``set_model_state_dict`` / ``set_optimizer_state_dict``. A sharded checkpoint does not
restore into a model that is not sharded, nor the reverse (:class:`ResumeError`).

A plugin whose ``load_state_dict`` rebuilds the optimizer's param groups (freezing)
declares ``hookloop_changes_param_groups = True``; the group layout is then checked by
torch when the optimizer state is applied, after the model and plugin states.

Plugin state is stored under a key that says what the plugin is: the name the user gave
it, else its ``state_key`` (see :func:`state_key`), else its registered name. A plugin's
class attribute ``hookloop_state_required`` (default ``True``) says whether a resume
without its state is wrong (an error, a warning with ``strict=False``) or merely
incomplete (trackers, progress bars: a warning).
"""

from __future__ import annotations

import copy
import inspect
import logging
import random
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hookloop import _distributed as dist
from hookloop import position
from hookloop._devices import to_device

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = ["COMPILED_PREFIX", "STATE_FORMAT", "ResumeError", "StateAPI", "align_compiled_keys", "claim",
           "collect", "migrate", "model_problems", "restore", "sharded_state", "state_key"]

log = logging.getLogger("hookloop")

STATE_FORMAT = "hookloop.loop/2"
FORMAT_V1 = "hookloop.loop/1"


class ResumeError(ValueError):
    """A checkpoint does not fit this loop; nothing was changed. The message lists every
    problem found."""


def state_key(base: str, **identity: Any) -> str:
    """A stable checkpoint key from a plugin's defining options, e.g.
    ``state_key("early_stopping", monitor="val/loss", mode="min")`` is
    ``"early_stopping{mode='min', monitor='val/loss'}"``. Plugins return it from a
    ``state_key`` property so that two instances with different options never swap
    state and nothing shifts when plugins are added."""
    inner = ", ".join(f"{k}={identity[k]!r}" for k in sorted(identity))
    return f"{base}{{{inner}}}"


COMPILED_PREFIX = "_orig_mod."
"""The key segment ``torch.compile`` adds to a compiled module's ``state_dict``."""


def align_compiled_keys(state: Mapping[str, Any], model_keys: Any) -> dict[str, Any]:
    """Rename the keys of a model ``state`` to those of a model whose ``state_dict``
    has ``model_keys``, when they differ only by ``torch.compile``'s ``_orig_mod.``
    segments (a compiled model's checkpoint into a plain model, or the other way round,
    also for a compiled submodule). Any other difference is left for the caller to
    report; ``state`` is returned unchanged when nothing needs renaming.
    """
    own = list(model_keys)
    if set(state) == set(own):
        return dict(state)
    if not any(COMPILED_PREFIX in k for k in (*state, *own)):
        return dict(state)
    target = {k.replace(COMPILED_PREFIX, ""): k for k in own}
    if len(target) != len(own):
        return dict(state)  # ambiguous: leave it
    out: dict[str, Any] = {}
    for k, v in state.items():
        out[target.get(k.replace(COMPILED_PREFIX, ""), k)] = v
    return out if len(out) == len(state) else dict(state)


# ---------------------------------------------------------------------- plugin keys


def _stateful(plugin: Any) -> bool:
    return callable(getattr(plugin, "state_dict", None)) and not inspect.isclass(plugin)


def plugin_key(loop: Loop, name: str, plugin: Any) -> str:
    """The key of a registered plugin's state in a checkpoint."""
    if name in loop.pm.given_names:
        return name
    key = getattr(plugin, "state_key", None)
    return key if isinstance(key, str) and key else name


def _required(plugin: Any) -> bool:
    return bool(getattr(plugin, "hookloop_state_required", True))


def _plugin_states(loop: Loop) -> tuple[dict[str, Any], dict[str, Any]]:
    states: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for name, plugin in loop.pm.plugin_items():
        if _stateful(plugin):
            key = plugin_key(loop, name, plugin)
            states[key] = plugin.state_dict()
            meta[key] = {"name": name, "class": type(plugin).__qualname__,
                         "required": _required(plugin)}
    return states, meta


def _load_plugin_state(loop: Loop, plugin: Any, state: Any) -> None:
    loader = plugin.load_state_dict
    if "loop" in inspect.signature(loader).parameters:
        loader(state, loop=loop)  # e.g. to rebuild param groups
    else:
        loader(state)


def claim(loop: Loop, plugin: Any) -> None:
    """Per-run state: remember a stateful plugin's state before its first loop, and
    give it that state back when the object joins another loop (a checkpoint restores
    it later). A second ``fit`` on the same loop continues."""
    if not (_stateful(plugin) and callable(getattr(plugin, "load_state_dict", None))):
        return
    owner = getattr(plugin, "_hookloop_owner", None)
    if owner is None:
        try:
            plugin._hookloop_initial = copy.deepcopy(plugin.state_dict())
            plugin._hookloop_owner = weakref.ref(loop)
        except (AttributeError, TypeError):  # __slots__ or frozen: cannot tell runs apart
            pass
    elif owner() is not loop:
        _load_plugin_state(loop, plugin, copy.deepcopy(plugin._hookloop_initial))
        plugin._hookloop_owner = weakref.ref(loop)


# ---------------------------------------------------------------------- sharded state


def _copy_tree(obj: Any) -> Any:
    """A copy of nested dicts, lists and tuples whose tensors are cloned (a ``DTensor``
    stays a ``DTensor`` of the same sharding); other leaves are deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_tree(v) for v in obj)
    return copy.deepcopy(obj)


def sharded_state(loop: Loop, *, copy: bool = False) -> dict[str, Any]:
    """The ``model`` and ``optimizers`` parts of :meth:`~hookloop.Loop.state_dict` for a
    loop whose model is sharded (:attr:`~hookloop.Loop.sharded`): this rank's shards,
    from ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` and
    ``get_optimizer_state_dict`` (one per optimizer, keyed by parameter name).

    Without ``copy`` the tensors are the live ones (what a save writes). With
    ``copy=True`` they are clones of the same shapes and sharding, linked to nothing
    live: a state to load a checkpoint into (``torch.distributed.checkpoint.load``)
    before :meth:`~hookloop.Loop.load_state_dict` validates and applies it. torch
    initialises the state of an optimizer that has none yet (a step with zero learning
    rate) to describe it; with ``copy=True`` that state is dropped again, so the loop is
    left as it was.
    """
    if not loop.sharded:
        raise ValueError("sharded_state: this loop's model is not sharded (loop.sharded is False); "
                         "its state is loop.state_dict()")
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module = loop.module
    fresh = [not opt.state for opt in loop.optimizers]
    model = get_model_state_dict(module)
    optimizers = [get_optimizer_state_dict(module, opt) for opt in loop.optimizers]
    if not copy:
        return {"model": model, "optimizers": optimizers}
    out = {"model": _copy_tree(model), "optimizers": _copy_tree(optimizers)}
    for opt, was_fresh in zip(loop.optimizers, fresh, strict=True):
        if was_fresh:
            opt.state.clear()
    return out


def _live_model_state(loop: Loop) -> dict[str, Any]:
    if loop.sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(loop.module)
    return loop.module.state_dict()


# ---------------------------------------------------------------------- saving


def collect(loop: Loop) -> dict[str, Any]:
    """Build the checkpoint of ``loop`` (see :meth:`hookloop.Loop.state_dict`)."""
    from hookloop.tracking import mask_secrets

    pending = loop.metrics.state_dict()
    rng: dict[str, Any] = {
        "now": get_rng(),
        "epoch_start": loop._rng_epoch_start,
        "loader": loop._loader_state,
        "loader_now": get_loader_state(loop.train_data),
    }
    if loop._dist.active:  # each rank's metrics not yet reduced are its own
        rng["metrics_pending"] = pending
    ranks = dist.all_gather_object(rng) if loop._dist.active else [rng]
    optim = loop.optim
    plugins, meta = _plugin_states(loop)
    if loop.sharded:
        parts = sharded_state(loop)
    else:
        parts = {"model": loop.module.state_dict(),
                 "optimizers": [opt.state_dict() for opt in optim.optimizers]}
    checkpoint: dict[str, Any] = {
        "format": STATE_FORMAT,
        "sharded": loop.sharded,
        "model": parts["model"],
        "optimizers": parts["optimizers"],
        "schedulers": [s.state_dict() for s in optim.schedulers],
        "scaler": optim.scaler.state_dict() if optim.scaler is not None else None,
        "layout": optim.describe(),
        "loop": loop.state.counters(),
        "metrics_pending": pending,
        "rng": ranks,
        "position": {**position.saved_position(loop.train_data, loop.state.epoch_batches_done,
                                               loop._epoch_base),
                     "world_size": loop.state.world_size},
        "plugins": plugins,
        "plugin_meta": meta,
        "hparams": _plain_hparams(mask_secrets(loop.hparams)),  # checkpoints get uploaded
    }
    h = loop.callers.on_save_checkpoint
    if h is not None:
        h(loop, checkpoint)
    return checkpoint


# ---------------------------------------------------------------------- loading


def migrate(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint of an older format to :data:`STATE_FORMAT` (a new dict).

    ``hookloop.loop/1``: plugin states were keyed by registered name and had no
    ``plugin_meta`` (they are matched by name and treated as optional); pending metrics
    held the whole interval at a log step (``flush_due``), which the current format
    reduces before ``on_train_batch_end``: they are delivered at resume as before.
    """
    fmt = checkpoint.get("format")
    if fmt == STATE_FORMAT:
        return dict(checkpoint)
    if fmt != FORMAT_V1:
        raise ResumeError(
            f"not a hookloop loop state (format={fmt!r}; expected {STATE_FORMAT!r} or {FORMAT_V1!r})"
        )
    out = dict(checkpoint)
    out["format"] = STATE_FORMAT
    out["plugin_meta"] = {k: {"name": k, "class": "?", "required": False}
                          for k in checkpoint.get("plugins", {})}
    out["layout"] = None
    return out


def _match_plugins(loop: Loop, checkpoint: Mapping[str, Any]) -> tuple[
        list[tuple[str, Any, str]], list[str], list[str]]:
    """(registered name, plugin, checkpoint key) pairs to load, and the problems and
    warnings of plugins that have no state or state that has no plugin."""
    saved: Mapping[str, Any] = checkpoint.get("plugins", {})
    meta: Mapping[str, Any] = checkpoint.get("plugin_meta", {})
    by_name = {m.get("name"): k for k, m in meta.items()}
    matches, problems, warnings_ = [], [], []
    used: set[str] = set()
    missing = []
    for name, plugin in loop.pm.plugin_items():
        if not callable(getattr(plugin, "load_state_dict", None)) or not _stateful(plugin):
            continue
        key = plugin_key(loop, name, plugin)
        found = key if key in saved else None
        if found is None and meta.get(by_name.get(name, ""), {}).get("class") == "?":
            found = by_name[name]  # migrated format 1: matched by registered name
        if found is None:
            missing.append((name, plugin, key))
            continue
        used.add(found)
        matches.append((name, plugin, found))
    unknown = [k for k in saved if k not in used]
    for name, plugin, key in missing:
        line = (f"plugin {name!r} ({type(plugin).__name__}, state key {key!r}) has no state in "
                f"the checkpoint, which holds states for {sorted(saved) or 'no plugin'}")
        (problems if _required(plugin) else warnings_).append(line)
    for key in unknown:
        info = meta.get(key, {})
        line = (f"the checkpoint holds state {key!r} of plugin {info.get('name', key)!r} "
                f"({info.get('class', '?')}) but no registered plugin has that key; registered: "
                f"{sorted(plugin_key(loop, n, p) for n, p in loop.pm.plugin_items() if _stateful(p))}")
        (problems if info.get("required", True) else warnings_).append(line)
    return matches, problems, warnings_


def _check_form(loop: Loop, checkpoint: Mapping[str, Any]) -> str | None:
    """A sharded checkpoint into a model that is not sharded, or the reverse."""
    saved = bool(checkpoint.get("sharded", False))
    if saved == loop.sharded:
        return None
    if saved:
        return ("the checkpoint holds sharded model and optimizer state (saved from a model "
                "sharded with fully_shard, written with torch.distributed.checkpoint); this loop's "
                "model is not sharded. Shard it with torch.distributed.fsdp.fully_shard as the "
                "saving run did (on any world size), or convert the checkpoint with "
                "torch.distributed.checkpoint.format_utils.dcp_to_torch_save to load its weights")
    return ("the checkpoint holds full (unsharded) model and optimizer state; this loop's model "
            "is sharded with fully_shard, and a sharded loop resumes only from sharded "
            "checkpoints (torch.distributed.checkpoint). Resume without fully_shard, as the "
            "saving run did, or load only the weights into the model before sharding it")


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else
            (tuple(v) if isinstance(v, (tuple, torch.Size)) else None) for k, v in state.items()}


def model_problems(live: Mapping[str, Any], saved: Mapping[str, Any], *, strict: bool = True) -> list[str]:
    """What keeps a saved model state from loading into a live one: keys missing or
    unexpected (with ``strict``) and shapes that differ. Values are tensors or shapes
    (for a checkpoint described by its index, such as a sharded one)."""
    live_shapes, saved_shapes = _shapes(live), _shapes(saved)
    problems = []
    if strict:
        missing = [k for k in live_shapes if k not in saved_shapes]
        unexpected = [k for k in saved_shapes if k not in live_shapes]
        if missing:
            problems.append(f"model: keys missing from the checkpoint: {missing[:8]}"
                            f"{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"model: unexpected keys in the checkpoint: {unexpected[:8]}"
                            f"{' ...' if len(unexpected) > 8 else ''}")
    for k, shape in saved_shapes.items():
        mine = live_shapes.get(k)
        if shape is not None and mine is not None and shape != mine:
            problems.append(f"model: {k} has shape {shape} in the checkpoint and {mine} in the model")
    return problems


def _check_model(loop: Loop, saved: Mapping[str, Any], strict: bool,
                 live: Mapping[str, Any] | None = None) -> list[str]:
    return model_problems(_live_model_state(loop) if live is None else live, saved, strict=strict)


def _check_optim(loop: Loop, checkpoint: Mapping[str, Any]) -> list[str]:
    optim = loop.optim
    problems = []
    opts = checkpoint.get("optimizers")
    if not isinstance(opts, list) or len(opts) != len(optim.optimizers):
        got = len(opts) if isinstance(opts, list) else opts
        return [f"optimizers: the checkpoint has {got} optimizer states; the loop has "
                f"{len(optim.optimizers)}"]
    layout = checkpoint.get("layout") or {}
    # a plugin that rebuilds param groups in its load_state_dict (freezing) changes the
    # layout first: then torch checks the groups when the optimizer state is applied
    regrouped = any(getattr(p, "hookloop_changes_param_groups", False)
                    for _, p in loop.pm.plugin_items())
    for i, (opt, sd) in enumerate(zip(optim.optimizers, opts, strict=True)):
        saved_cls = (layout.get("optimizers") or [{}] * len(opts))[i].get("class")
        if saved_cls is not None and saved_cls != type(opt).__name__:
            problems.append(f"optimizer[{i}]: the checkpoint holds a {saved_cls}; the loop has "
                            f"a {type(opt).__name__}")
            continue
        if regrouped:
            continue
        groups = [len(g["params"]) for g in sd.get("param_groups", [])]
        mine = [len(g["params"]) for g in opt.param_groups]
        if groups != mine:
            problems.append(f"optimizer[{i}] ({type(opt).__name__}): parameters per group are "
                            f"{groups} in the checkpoint and {mine} in the loop")
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        index = {pid: k for k, pid in enumerate(p for g in sd["param_groups"] for p in g["params"])}
        for pid, entry in sd.get("state", {}).items():
            param = params[index[pid]] if pid in index else None
            for name, value in (entry.items() if param is not None else ()):
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                    problems.append(f"optimizer[{i}]: state {name!r} of parameter {pid} has shape "
                                    f"{tuple(value.shape)}; the parameter has {tuple(param.shape)}")
    scheds = checkpoint.get("schedulers", [])
    if len(scheds) != len(optim.schedulers):
        problems.append(f"schedulers: the checkpoint has {len(scheds)} scheduler states; the loop "
                        f"has {len(optim.schedulers)}")
    else:
        saved_names = layout.get("schedulers") or [None] * len(scheds)
        for i, (s, saved) in enumerate(zip(optim.schedulers, saved_names, strict=True)):
            if saved is not None and saved != type(s).__name__:
                problems.append(f"scheduler[{i}]: the checkpoint holds a {saved}; the loop has a "
                                f"{type(s).__name__}")
    return problems


def restore(loop: Loop, checkpoint: Mapping[str, Any], *, strict: bool = True) -> None:
    """Validate, then apply ``checkpoint`` to ``loop`` (see :meth:`hookloop.Loop.load_state_dict`)."""
    if not isinstance(checkpoint, Mapping):
        raise ResumeError(f"a checkpoint is a dict made by loop.state_dict(); got "
                          f"{type(checkpoint).__name__}")
    checkpoint = migrate(checkpoint)
    form = _check_form(loop, checkpoint)
    if form is not None:
        if loop._dist.active:
            _agree(checkpoint, True)
        raise ResumeError(f"checkpoint does not fit this loop; nothing was restored:\n  {form}")
    live = _live_model_state(loop)
    if isinstance(checkpoint.get("model"), Mapping):  # a torch.compile'd model, or the reverse
        checkpoint["model"] = align_compiled_keys(checkpoint["model"], live.keys())
    # phase 1: validate everything, change nothing
    problems: list[str] = []
    for key in ("model", "optimizers", "loop"):
        if key not in checkpoint:
            problems.append(f"the checkpoint has no {key!r} entry")
    if problems:
        if loop._dist.active:
            _agree(checkpoint, True)
        raise ResumeError("checkpoint does not fit this loop:\n  " + "\n  ".join(problems))
    problems += _check_model(loop, checkpoint["model"], strict, live)
    problems += _check_optim(loop, checkpoint)
    counters = checkpoint["loop"]
    if loop.train_data is not None and not counters.get("epoch_done"):
        saved = checkpoint.get("position")
        problems += position.check(loop.train_data, saved, (saved or {}).get(
            "world_size", len(checkpoint.get("rng") or [None])), loop.state.world_size)
    matches, plugin_problems, notes = _match_plugins(loop, checkpoint)
    if strict:
        problems += plugin_problems
    else:
        notes += plugin_problems
    if loop._dist.active:  # every rank restores the same state, or none does
        _agree(checkpoint, bool(problems))
    if problems:
        raise ResumeError(
            "checkpoint does not fit this loop; nothing was restored:\n  " + "\n  ".join(problems)
            + ("\n(plugin state problems become warnings with strict=False)" if plugin_problems else "")
        )
    for note in notes:
        log.warning("hookloop: resume: %s", note)
    _apply(loop, checkpoint, matches, strict)


def _agree(checkpoint: Mapping[str, Any], failed: bool) -> None:
    """Under DDP: raise on every rank when the ranks were given different checkpoints
    (told apart by their counters and position) or when another rank's does not fit."""
    counters = checkpoint.get("loop") or {}
    mine = (f"epoch {counters.get('epoch')}, step {counters.get('global_step')}, "
            f"{counters.get('epoch_batches_done')} batch(es) into the epoch")
    found = dist.all_gather_object((mine, failed))
    if len({what for what, _ in found}) > 1:
        per_rank = "\n  ".join(f"rank {r}: {what}" for r, (what, _) in enumerate(found))
        raise ResumeError("the ranks were given different checkpoints to resume from; nothing was "
                          f"restored:\n  {per_rank}\nEvery rank must load the same checkpoint "
                          "(a checkpoint folder on storage every node shares)")
    others = [r for r, (_, bad) in enumerate(found) if bad]
    if others and not failed:
        raise ResumeError(f"the checkpoint does not fit the loop on rank(s) {others} (see their "
                          "errors); nothing was restored on any rank")


def _apply(loop: Loop, checkpoint: Mapping[str, Any], matches: list[tuple[str, Any, str]],
           strict: bool) -> None:
    optim = loop.optim
    if loop.sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(loop.module, checkpoint["model"], options=StateDictOptions(strict=strict))
    else:
        loop.module.load_state_dict(checkpoint["model"], strict=strict)
    for _name, plugin, key in matches:  # after the model: e.g. freezing rebuilds param groups
        _load_plugin_state(loop, plugin, to_device(checkpoint["plugins"][key], loop.device))
    for opt, sd in zip(optim.optimizers, checkpoint["optimizers"], strict=True):
        if loop.sharded:
            set_optimizer_state_dict(loop.module, opt, sd)
        else:
            opt.load_state_dict(sd)
    for sched, sd in zip(optim.schedulers, checkpoint.get("schedulers", []), strict=True):
        sched.load_state_dict(sd)
    if optim.scaler is not None and checkpoint.get("scaler"):
        optim.scaler.load_state_dict(checkpoint["scaler"])
    loop.state.load_counters(checkpoint["loop"])
    ranks = checkpoint.get("rng") or []
    rank = loop.state.rank
    mine = ranks[rank] if rank < len(ranks) else (ranks[0] if ranks else None)
    loop.metrics.load_state_dict((mine or {}).get("metrics_pending")
                                 or checkpoint.get("metrics_pending", {}))
    if mine is not None:
        set_rng(mine["now"])
        # the loader's own generators: the next epoch's shuffle continues from here
        set_loader_state(loop.train_data, mine.get("loader_now") or {})
        loop._rng_epoch_start = mine.get("epoch_start")
        loop._loader_state = mine.get("loader") or {}
        mid_epoch = loop.state.epoch_batches_done and not loop.state.epoch_done
        loop._position = checkpoint.get("position") if mid_epoch else None
        if loop._position is None and mid_epoch:  # an older checkpoint: batches only
            loop._position = {"batches": loop.state.epoch_batches_done, "world_size": len(ranks)}
        loop._resume_rng = mine["now"] if mid_epoch else None
    h = loop.callers.on_load_checkpoint
    if h is not None:
        h(loop, checkpoint)


class StateAPI:
    """The state calls of :class:`~hookloop.Loop`: its configuration for trackers and
    checkpoints, and the checkpoint itself."""

    optimizers: list[torch.optim.Optimizer]
    module: torch.nn.Module
    state: Any
    device: torch.device
    user_hparams: dict[str, Any]
    log_every_n_steps: int
    precision: str
    grad_accum: int
    grad_clip_norm: float | None

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the ranks with FSDP2
        (``torch.distributed.fsdp.fully_shard`` applied to its root module). Then
        ``loop.model`` and ``loop.module`` are the same object, its parameters are
        ``DTensor`` shards, and :meth:`state_dict` holds this rank's shards of the model and
        optimizer state (see :func:`hookloop.resume.sharded_state`), to be written with
        ``torch.distributed.checkpoint`` by every rank rather than by rank 0 alone."""
        return dist.is_sharded(self.module)

    @property
    def hparams(self) -> dict[str, Any]:
        """The loop's configuration plus the user's ``hparams``, for trackers to record."""
        opt = self.optimizers[0] if self.optimizers else None
        cfg: dict[str, Any] = {
            "model": type(self.module).__name__,
            "optimizer": type(opt).__name__ if opt else None,
            "lr": opt.param_groups[0].get("lr") if opt else None,
            "precision": self.precision,
            "grad_accum": self.grad_accum,
            "grad_clip_norm": self.grad_clip_norm,
            "log_every_n_steps": self.log_every_n_steps,
            "max_epochs": self.state.max_epochs,
            "max_steps": self.state.max_steps,
            "device": str(self.device),
            "world_size": self.state.world_size,
        }
        cfg.update(self.user_hparams)
        return cfg

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly; loadable with
        ``torch.load(weights_only=True)``. Under DDP every rank must call it (RNG
        states of all ranks are gathered, so rank 0 can write them all). For a sharded
        model (:attr:`sharded`) ``model`` and ``optimizers`` hold this rank's shards
        (``DTensor`` values; see :func:`hookloop.resume.sharded_state`), which
        ``torch.distributed.checkpoint`` writes from every rank.

        Keys: ``format`` (``hookloop.loop/2``), ``sharded``, ``model``, ``optimizers``,
        ``schedulers``, ``scaler``, ``layout`` (optimizer and scheduler classes and
        group sizes), ``loop`` (counters and stamped metrics), ``metrics_pending``,
        ``rng`` (one entry per rank, each with ``now``, ``epoch_start``, ``loader`` and
        ``loader_now``; under DDP also that rank's own ``metrics_pending``),
        ``plugins`` (each stateful plugin's ``state_dict()`` under its state key, see
        :mod:`hookloop.resume`), ``plugin_meta``, ``hparams``; plugins may add keys in
        ``on_save_checkpoint``.
        """
        return collect(self)  # type: ignore[arg-type]

    def load_state_dict(self, checkpoint: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict` output in two phases: validate everything (model
        keys and shapes, optimizer and scheduler layout, plugin states; a mismatch raises
        :class:`~hookloop.resume.ResumeError` listing every problem and changes
        nothing; so does a sharded checkpoint into a model that is not sharded, or the
        reverse), then apply: model, plugins (tensors on ``loop.device``; a plugin's
        ``load_state_dict`` that takes a ``loop`` keyword receives this loop),
        optimizers, schedulers, scaler, counters, pending metrics, RNG; then
        ``on_load_checkpoint`` fires. ``strict=False`` allows missing or unexpected
        model keys and turns missing or unknown plugin state into warnings.
        Checkpoints of format ``hookloop.loop/1`` are migrated."""
        restore(self, checkpoint, strict=strict)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- helpers


def _plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        out[str(k)] = v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)
    return out


def get_rng() -> dict[str, Any]:
    """The process's RNG states: Python, torch CPU, NumPy (if installed), CUDA (if
    initialised)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos),
                          int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng(state: Mapping[str, Any]) -> None:
    """Restore :func:`get_rng` output (RNG tensors are moved to the CPU first)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.cpu().numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _generators(data: Any) -> dict[str, torch.Generator]:
    gens = {}
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["loader"] = gen
    sampler = getattr(data, "sampler", None)
    gen = getattr(sampler, "generator", None)
    if isinstance(gen, torch.Generator):
        gens["sampler"] = gen
    batch_sampler = getattr(data, "batch_sampler", None)
    gen = getattr(getattr(batch_sampler, "sampler", None), "generator", None)
    if isinstance(gen, torch.Generator):
        gens.setdefault("sampler", gen)
    return gens


def get_loader_state(data: Any) -> dict[str, Any]:
    """The states of the torch.Generators a DataLoader (or its sampler) shuffles with."""
    return {name: gen.get_state() for name, gen in _generators(data).items()}


def set_loader_state(data: Any, states: Mapping[str, Any]) -> None:
    """Restore :func:`get_loader_state` output (on the CPU)."""
    for name, gen in _generators(data).items():
        if name in states:
            gen.set_state(states[name].cpu())
