"""Freezing schedules for transfer learning, as hookloop plugins.

- :class:`Freeze` freezes modules at fit start (``requires_grad=False``; frozen
  BatchNorm layers stay in eval mode so their running statistics do not move) and can
  unfreeze them at an epoch or an optimizer step.
- :class:`GradualUnfreeze` freezes several groups of modules and unfreezes them one
  after the other, from the head down (ULMFiT / fastai ``freeze_to`` style).

When unfrozen parameters are not held by the optimizer they are added to it as a new
param group whose learning rate is the first group's current learning rate times
``lr_scale`` (discriminative learning rates); the loop's LR schedulers are extended so
that they drive the new group too. Build the optimizer from the trainable parameters
only (e.g. ``model.head.parameters()``) to get this behaviour; parameters the optimizer
already holds keep their own group and learning rate.

Both plugins keep their progress in the loop's checkpoints. On resume, their
``load_state_dict`` runs before the optimizer state loads and re-creates the same
param groups, so the same modules are frozen and training continues bit-identically.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hookloop.plugins import hookimpl

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = ["Freeze", "GradualUnfreeze", "LrGrowth", "ModuleSpec", "freeze_modules", "named_modules",
           "named_parameters", "resolve_modules"]

__version__ = "0.1.0"

log = logging.getLogger("hookloop.freeze")

ModuleSpec = str | nn.Module
"""A module to freeze: an attribute path (``"backbone.layer4"``), a glob over the names
of ``model.named_modules()`` (``"backbone.*.bn*"``), or the module object itself."""

_NORM = nn.modules.batchnorm._NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*
_GLOB = set("*?[")
_COMPILED = "_orig_mod"  # the attribute torch.compile's OptimizedModule keeps the model in

LrGrowth = float | Callable[[int], float]
"""How an unfrozen group's learning rate grows at each epoch start: a factor, or
``fn(epoch) -> factor`` of the zero-based epoch starting."""


def _canonical(name: str) -> str:
    """``name`` without the ``_orig_mod`` parts that ``torch.compile`` adds, so a
    compiled model (or a compiled submodule) is addressed as the plain one."""
    if _COMPILED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` by canonical name (``torch.compile``'s ``_orig_mod``
    parts removed; the compiled wrapper and its model share a name, the model wins)."""
    return {_canonical(n): m for n, m in model.named_modules()}


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model.named_parameters()`` by canonical name (see :func:`named_modules`)."""
    return {_canonical(n): p for n, p in model.named_parameters()}


def _sharded(model: nn.Module) -> str | None:
    """The name of a module of ``model`` sharded by FSDP (1 or 2), or ``None``."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        kinds: tuple[type, ...] = (FSDPModule, FullyShardedDataParallel)
    except ImportError:  # a torch without FSDP2
        kinds = ()
    for name, module in model.named_modules():
        if (kinds and isinstance(module, kinds)) or type(module).__name__ == "FullyShardedDataParallel":
            return name or "<the model>"
    return None


def resolve_modules(model: nn.Module, specs: Iterable[ModuleSpec]) -> list[str]:
    """Names (as in ``model.named_modules()``, without the ``_orig_mod.`` parts of a
    ``torch.compile``d model) of the modules that ``specs`` select, in model order.
    Raises ``ValueError`` listing the available names when a spec selects nothing."""
    named = named_modules(model)
    by_id = {id(m): n for n, m in named.items()}
    chosen: set[str] = set()
    for spec in specs:
        if isinstance(spec, nn.Module):
            name = by_id.get(id(spec))
            if name is None:
                raise ValueError(f"module {type(spec).__name__} is not part of the model")
            chosen.add(name)
        elif isinstance(spec, str):
            spec = _canonical(spec)
            if spec in named:
                chosen.add(spec)
                continue
            hits = [n for n in named if n and _GLOB & set(spec) and fnmatch.fnmatchcase(n, spec)]
            if not hits:
                available = ", ".join(repr(n) for n in named if n)
                raise ValueError(
                    f"no module of {type(model).__name__} matches {spec!r}; modules: {available}"
                )
            chosen.update(hits)
        else:
            raise TypeError(f"expected a module name, glob or nn.Module; got {spec!r}")
    return [n for n in named if n in chosen]


def freeze_modules(model: nn.Module, specs: Iterable[ModuleSpec], *, train_bn: bool = False) -> int:
    """Freeze the selected modules of ``model`` now, outside a loop: their parameters
    get ``requires_grad=False`` and their normalisation layers eval mode (unless
    ``train_bn``). Returns the number of parameters frozen. Handy before building an
    optimizer from ``filter(lambda p: p.requires_grad, model.parameters())``."""
    names = resolve_modules(model, specs)
    modules = named_modules(model)
    count = 0
    for name in names:
        for module in modules[name].modules():
            if train_bn and isinstance(module, _NORM):
                continue
            if isinstance(module, _NORM):
                module.eval()
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
                p.grad = None
                count += p.numel()
    return count


@dataclass
class _Group:
    specs: tuple[ModuleSpec, ...]
    at_epoch: int | None
    at_step: int | None
    lr_scale: float
    lr: float | None = None  # an absolute learning rate instead of lr_scale


def _check_scale(value: Any, name: str = "lr_scale") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


def _check_growth(value: Any) -> LrGrowth | None:
    if value is None or callable(value):
        return value
    return _check_scale(value, "lr_growth")


def _check_at(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None; got {value!r}")
    return value


def _as_specs(modules: ModuleSpec | Sequence[ModuleSpec]) -> tuple[ModuleSpec, ...]:
    if isinstance(modules, (str, nn.Module)):
        return (modules,)
    specs = tuple(modules)
    if not specs:
        raise ValueError("give at least one module to freeze")
    return specs


class _Schedule:
    """The machinery shared by :class:`Freeze` and :class:`GradualUnfreeze`: groups of
    modules, each frozen at fit start and unfrozen at its own epoch or step."""

    hookloop_name = "freeze"
    # load_state_dict adds the unfrozen groups to the optimizer before the optimizer's
    # own state is restored: the core checks the group layout when it is applied
    hookloop_changes_param_groups = True

    def __init__(self, groups: list[_Group], *, train_bn: bool, optimizer_idx: int,
                 lr_growth: LrGrowth | None = None, align_with_head: bool = False) -> None:
        if isinstance(optimizer_idx, bool) or not isinstance(optimizer_idx, int) or optimizer_idx < 0:
            raise ValueError(f"optimizer_idx must be a non-negative int; got {optimizer_idx!r}")
        self._groups = groups
        self.train_bn = bool(train_bn)
        self.lr_growth = _check_growth(lr_growth)
        self.align_with_head = bool(align_with_head)
        # per grown group: (its optimizer param group, the learning rate set last)
        self._grown: dict[int, tuple[int, float]] = {}
        self._grown_epoch = -1  # the last epoch whose start grew the learning rates
        self.optimizer_idx = optimizer_idx
        self._unfrozen = [False] * len(groups)
        self._added: list[dict[str, Any]] = []
        self._loop: Loop | None = None
        self._params: list[list[str]] = []  # per group, parameter names
        self._norms: list[list[nn.Module]] = []  # per group, normalisation layers kept in eval
        self._frozen_norms: list[nn.Module] = []
        self._step_pending = False

    # ------------------------------------------------------------------ queries

    @property
    def unfrozen(self) -> list[bool]:
        """Per group, whether it was unfrozen."""
        return list(self._unfrozen)

    def frozen_parameter_names(self) -> list[str]:
        """Names of the parameters this plugin keeps frozen now (empty before fit)."""
        return [n for k, names in enumerate(self._params) if not self._unfrozen[k] for n in names]

    # ------------------------------------------------------------------ binding

    def _bind(self, loop: Loop) -> None:
        if self._loop is loop and self._params:
            return
        self._loop = loop
        model = loop.module
        sharded = _sharded(model)
        if sharded is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: module {sharded!r} of the model is sharded with FSDP; "
                "freezing or unfreezing a sharded model is not supported (FSDP holds flat or "
                "distributed parameters, and requires_grad must be uniform within a sharded unit). "
                "Freeze with hookloop_freeze.freeze_modules before sharding, or train with DDP"
            )
        named_params = list(named_parameters(model).items())
        modules = named_modules(model)
        owner: dict[int, int] = {}
        norms: list[list[nn.Module]] = [[] for _ in self._groups]
        seen_norms: set[int] = set()
        for k, group in enumerate(self._groups):
            for name in resolve_modules(model, group.specs):
                for module in modules[name].modules():
                    is_norm = isinstance(module, _NORM)
                    if is_norm and self.train_bn:
                        continue  # trainable: parameters stay as they are, train mode
                    if is_norm and id(module) not in seen_norms:
                        seen_norms.add(id(module))
                        norms[k].append(module)
                    for p in module.parameters(recurse=False):
                        owner.setdefault(id(p), k)  # a parameter belongs to its first group
        self._params = [[n for n, p in named_params if owner.get(id(p)) == k]
                        for k in range(len(self._groups))]
        self._norms = norms
        if loop.optimizers and self.optimizer_idx >= len(loop.optimizers):
            raise ValueError(
                f"{type(self).__name__}: optimizer_idx={self.optimizer_idx} but the loop has "
                f"{len(loop.optimizers)} optimizer(s)"
            )

    # ------------------------------------------------------------------ applying

    def _apply(self, loop: Loop) -> None:
        """Make ``requires_grad`` and normalisation modes match the schedule's state. When
        that changes which parameters train, the model is wrapped again for DDP
        (``loop.rewrap_model()``), which registers only those: every rank does this at
        the same point, since the schedule is the same on every rank."""
        params = named_parameters(loop.module)
        frozen_norms: list[nn.Module] = []
        changed = False
        for k, names in enumerate(self._params):
            trainable = self._unfrozen[k]
            for n in names:
                p = params[n]
                changed = changed or p.requires_grad != trainable
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None
            if not trainable:
                frozen_norms.extend(self._norms[k])
        self._frozen_norms = frozen_norms
        self._norms_to_eval()
        self._step_pending = any(
            g.at_step is not None and not self._unfrozen[k] for k, g in enumerate(self._groups)
        )
        if changed:
            loop.rewrap_model()

    def _norms_to_eval(self) -> None:
        for m in self._frozen_norms:
            if m.training:
                m.eval()

    def _unfreeze(self, loop: Loop, k: int) -> None:
        self._unfrozen[k] = True
        self._apply(loop)
        for m in self._norms[k]:
            m.train(loop.module.training)
        group = self._groups[k]
        added = self._add_to_optimizer(loop, k, self._params[k], group.lr_scale, lr=group.lr)
        if added is not None and self.lr_growth is not None:
            self._grown[k] = (len(loop.optimizers[self.optimizer_idx].param_groups) - 1, added)
            self._grown_epoch = max(self._grown_epoch, loop.state.epoch)  # grows from the next epoch
        state = loop.state
        where = f"epoch {state.epoch}, step {state.global_step}"
        if added is not None:
            log.info("hookloop.freeze: unfroze group %d (%s) at %s; new param group with lr %.3g",
                     k, ", ".join(map(str, self._groups[k].specs)), where, added)
        else:
            log.info("hookloop.freeze: unfroze group %d at %s (the optimizer already held its "
                     "parameters; their learning rate is unchanged)", k, where)

    def _add_to_optimizer(self, loop: Loop, k: int, names: list[str], scale: float,
                          record: bool = True, lr: float | None = None) -> float | None:
        """Add the parameters of ``names`` the optimizer does not hold as a new param
        group: learning rate ``lr``, else the first group's times ``scale``. Returns the
        new group's learning rate (``None`` when nothing was added)."""
        if not loop.optimizers or not names:
            return None
        opt = loop.optimizers[self.optimizer_idx]
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        params = named_parameters(loop.module)
        missing = [n for n in names if id(params[n]) not in held]
        if not missing:
            return None
        ref = opt.param_groups[0]
        before = len(opt.param_groups)
        if lr is not None:
            # the scale the schedulers' per-group values (base_lrs, max_lrs...) get
            scale = lr / ref["lr"] if ref["lr"] else 1.0
        new_lr = lr if lr is not None else ref["lr"] * scale
        group: dict[str, Any] = {"params": [params[n] for n in missing], "lr": new_lr}
        opt.add_param_group(group)
        new = opt.param_groups[-1]
        # keys schedulers put on every group (initial_lr, max_lr, momentum ranges...)
        for key, value in ref.items():
            if key == "params" or key in new:
                continue
            new[key] = _scaled(key, value, scale)
        new["lr"] = new_lr
        for sched in loop.schedulers:
            _extend_scheduler(sched, opt, before, scale, new["lr"])
        if record:
            self._added.append({"group": k, "optimizer": self.optimizer_idx, "params": missing,
                                "lr_scale": scale})
        return float(new["lr"])

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_fit_start(self, loop: Loop) -> None:
        """Bind to the loop's model and freeze every group not unfrozen yet; with
        ``train_bn``, hand the optimizer the normalisation parameters it lacks."""
        self._bind(loop)
        self._apply(loop)
        if self.train_bn:
            self._add_train_bn(loop)

    def _add_train_bn(self, loop: Loop) -> None:
        """``train_bn=True``: the normalisation layers inside still-frozen groups train,
        so their parameters join the optimizer (one param group, at the learning rate
        the first frozen group will get) when it does not hold them."""
        model = loop.module
        frozen = [k for k in range(len(self._groups)) if not self._unfrozen[k]]
        if not frozen:
            return
        modules = named_modules(model)
        names_of = {id(p): n for n, p in named_parameters(model).items()}
        names: list[str] = []
        for k in frozen:
            for name in resolve_modules(model, self._groups[k].specs):
                for module in modules[name].modules():
                    if isinstance(module, _NORM):
                        names.extend(names_of[id(p)] for p in module.parameters(recurse=False)
                                     if names_of[id(p)] not in names)
        first = self._groups[frozen[0]]
        lr = self._add_to_optimizer(loop, frozen[0], names, first.lr_scale, lr=first.lr)
        if lr is not None:
            log.info("hookloop.freeze: train_bn: %d normalisation parameter(s) of the frozen "
                     "modules added to the optimizer with lr %.3g", len(names), lr)

    @hookimpl
    def on_train_epoch_start(self, loop: Loop, epoch: int) -> None:
        """Grow the learning rates of groups unfrozen before (``lr_growth``), unfreeze
        the groups due at this epoch, and keep frozen norm layers in eval mode (the
        loop switched the whole model to train mode)."""
        if self._grown and epoch > self._grown_epoch:
            self._grow(loop, epoch)
        self._due(loop)
        self._norms_to_eval()

    def _grow(self, loop: Loop, epoch: int) -> None:
        """Multiply each grown group's learning rate by ``lr_growth`` (at most the first
        param group's with ``align_with_head``), as Lightning's BackboneFinetuning."""
        self._grown_epoch = epoch
        opt = loop.optimizers[self.optimizer_idx]
        head = opt.param_groups[0]["lr"]
        growth = self.lr_growth
        factor = growth(epoch) if callable(growth) else growth
        for k, (index, previous) in list(self._grown.items()):
            lr = previous * float(factor)  # type: ignore[arg-type]
            if self.align_with_head and lr > head:
                lr = head
            self._grown[k] = (index, lr)
            opt.param_groups[index]["lr"] = lr

    @hookimpl
    def on_train_batch_start(self, loop: Loop, batch: Any, batch_idx: int) -> None:
        """Unfreeze the groups due at this optimizer step."""
        if self._step_pending:
            self._due(loop)
        if self._frozen_norms:
            self._norms_to_eval()

    def _due(self, loop: Loop) -> None:
        state = loop.state
        for k, g in enumerate(self._groups):
            if self._unfrozen[k]:
                continue
            if (g.at_epoch is not None and state.epoch >= g.at_epoch and not state.epoch_done) or (
                g.at_step is not None and state.global_step >= g.at_step
            ):
                self._unfreeze(loop, k)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Which groups are unfrozen and which param groups were added, by parameter
        name (plain lists; loadable with ``torch.load(weights_only=True)``)."""
        return {
            "unfrozen": list(self._unfrozen),
            "added": [dict(a, params=list(a["params"])) for a in self._added],
            "grown": [[k, index, lr] for k, (index, lr) in sorted(self._grown.items())],
            "grown_epoch": self._grown_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any], loop: Loop | None = None) -> None:
        """Restore the schedule; called by ``Loop.load_state_dict`` before the optimizer
        state loads, it re-creates the param groups added so far and re-applies the
        freezing, so the optimizer state fits and training continues identically."""
        unfrozen = list(state["unfrozen"])
        if len(unfrozen) != len(self._groups):
            raise ValueError(
                f"{type(self).__name__}: checkpoint has {len(unfrozen)} groups; this plugin "
                f"has {len(self._groups)}"
            )
        self._unfrozen = [bool(u) for u in unfrozen]
        self._grown = {int(k): (int(index), float(lr)) for k, index, lr in state.get("grown", [])}
        self._grown_epoch = int(state.get("grown_epoch", -1))
        self._added = []
        loop = loop or self._loop
        if loop is None:
            # no loop known: keep the lists; on_fit_start applies the freezing, but param
            # groups cannot be re-created before the optimizer state loads
            self._added = [dict(a) for a in state.get("added", [])]
            return
        self._bind(loop)
        params = named_parameters(loop.module)
        for entry in state.get("added", []):
            names = list(entry["params"])
            unknown = [n for n in names if n not in params]
            if unknown:
                raise ValueError(f"{type(self).__name__}: checkpoint names unknown parameters {unknown}")
            saved_idx = self.optimizer_idx
            self.optimizer_idx = int(entry.get("optimizer", saved_idx))
            try:
                self._add_to_optimizer(loop, int(entry["group"]), names, float(entry["lr_scale"]),
                                       record=False)
            finally:
                self.optimizer_idx = saved_idx
            self._added.append({"group": int(entry["group"]), "optimizer": int(entry.get("optimizer", 0)),
                                "params": names, "lr_scale": float(entry["lr_scale"])})
        self._apply(loop)


def _scaled(key: str, value: Any, scale: float) -> Any:
    if "lr" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * scale
    if isinstance(value, torch.Tensor) and "lr" in key:
        return value.clone() * scale
    return value


# the per-param-group lists of torch's LR schedulers
_PER_GROUP = frozenset({"base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs",
                        "base_momentums", "max_momentums"})


def _extend_scheduler(sched: Any, opt: torch.optim.Optimizer, n_before: int, scale: float,
                      lr: float) -> None:
    """Grow the per-group lists of an LR scheduler by one entry for a new param group."""
    for inner in getattr(sched, "_schedulers", None) or ():  # SequentialLR, ChainedScheduler
        _extend_scheduler(inner, opt, n_before, scale, lr)
    if getattr(sched, "optimizer", None) is not opt:
        return
    for key, value in list(vars(sched).items()):
        if key not in _PER_GROUP or not isinstance(value, list) or len(value) != n_before:
            continue
        if key == "_last_lr":
            value.append(lr)
        else:
            value.append(_scaled(key, value[0], scale))


class Freeze(_Schedule):
    """Freeze modules at fit start; optionally unfreeze them later.

    :param modules: attribute paths, globs over ``named_modules()`` names, or module
        objects (default ``["backbone"]``).
    :param unfreeze_at_epoch: unfreeze at the start of this (zero-based) epoch.
    :param unfreeze_at_step: unfreeze before the batch that follows this many
        optimizer steps (``loop.state.global_step >= unfreeze_at_step``).
    :param lr_scale: the learning rate of the param group added for the unfrozen
        parameters, relative to the first group's learning rate at that moment.
    :param lr: the learning rate of that param group, as an absolute value (instead
        of ``lr_scale``; Lightning's ``backbone_initial_lr``).
    :param lr_growth: grow that learning rate at the start of every later epoch: a
        factor (``2.0`` doubles it each epoch) or ``fn(epoch) -> factor`` of the
        zero-based epoch starting (Lightning's BackboneFinetuning ``lambda_func``). The
        plugin then sets the group's learning rate at each epoch start, over what a
        scheduler did to it.
    :param align_with_head: with ``lr_growth``, never let the grown learning rate
        exceed the first param group's (the head's): once it would, it follows the
        head's (Lightning's ``should_align``).
    :param train_bn: keep normalisation layers inside the frozen modules trainable and
        in train mode, and add their parameters to the optimizer when it does not hold
        them (at ``lr``/``lr_scale``); by default they are frozen and kept in eval mode,
        so their running statistics do not move.
    :param optimizer_idx: which of the loop's optimizers receives the unfrozen
        parameters.

    Under DDP the model is wrapped again (``loop.rewrap_model()``) whenever the set of
    trainable parameters changes; a model sharded with FSDP is refused.
    """

    hookloop_name = "freeze"

    def __init__(
        self,
        modules: ModuleSpec | Sequence[ModuleSpec] = ("backbone",),
        unfreeze_at_epoch: int | None = None,
        unfreeze_at_step: int | None = None,
        lr_scale: float = 0.1,
        train_bn: bool = False,
        optimizer_idx: int = 0,
        *,
        lr: float | None = None,
        lr_growth: LrGrowth | None = None,
        align_with_head: bool = False,
    ) -> None:
        at_epoch = _check_at("unfreeze_at_epoch", unfreeze_at_epoch)
        at_step = _check_at("unfreeze_at_step", unfreeze_at_step)
        if at_epoch is not None and at_step is not None:
            raise ValueError("give unfreeze_at_epoch or unfreeze_at_step, not both")
        self.modules = _as_specs(modules)
        self.unfreeze_at_epoch = at_epoch
        self.unfreeze_at_step = at_step
        self.lr_scale = _check_scale(lr_scale)
        self.lr = None if lr is None else _check_scale(lr, "lr")
        super().__init__([_Group(self.modules, at_epoch, at_step, self.lr_scale, self.lr)],
                         train_bn=train_bn, optimizer_idx=optimizer_idx, lr_growth=lr_growth,
                         align_with_head=align_with_head)

    @property
    def is_frozen(self) -> bool:
        """Whether the modules are frozen now (``False`` once unfrozen)."""
        return not self._unfrozen[0]

    def __repr__(self) -> str:
        return (f"Freeze(modules={list(map(str, self.modules))}, unfreeze_at_epoch="
                f"{self.unfreeze_at_epoch}, unfreeze_at_step={self.unfreeze_at_step}, "
                f"lr_scale={self.lr_scale}, lr={self.lr}, lr_growth={self.lr_growth}, "
                f"align_with_head={self.align_with_head}, train_bn={self.train_bn})")


class GradualUnfreeze(_Schedule):
    """Freeze several groups of modules at fit start and unfreeze them one at a time,
    from the head down (ULMFiT's gradual unfreezing, fastai's ``freeze_to``).

    :param groups: the groups in the order they are unfrozen: the one nearest the head
        first. Each group is a module spec or a list of them (see :class:`Freeze`).
    :param every_n_epochs: epochs between two unfreezings.
    :param start_epoch: epoch at which the first group is unfrozen (default
        ``every_n_epochs``: the head trains alone for that many epochs first).
    :param every_n_steps: unfreeze by optimizer steps instead: group ``k`` at step
        ``start_step + k * every_n_steps``.
    :param start_step: step of the first unfreezing (default ``every_n_steps``).
    :param lr_scale: learning-rate scale of each group's new param group, relative to
        the first param group's learning rate at that moment: one number for all groups
        or one per group (e.g. ``[1/2.6, 1/2.6**2, 1/2.6**3]`` for ULMFiT's
        discriminative rates).
    :param lr: absolute learning rates instead of ``lr_scale``: one number for all
        groups or one per group.
    :param lr_growth: see :class:`Freeze`; applies to every unfrozen group.
    :param align_with_head: see :class:`Freeze`.
    :param train_bn: see :class:`Freeze`.
    :param optimizer_idx: see :class:`Freeze`.
    """

    hookloop_name = "gradual_unfreeze"

    def __init__(
        self,
        groups: Sequence[ModuleSpec | Sequence[ModuleSpec]],
        every_n_epochs: int = 1,
        lr_scale: float | Sequence[float] = 0.1,
        *,
        start_epoch: int | None = None,
        every_n_steps: int | None = None,
        start_step: int | None = None,
        train_bn: bool = False,
        optimizer_idx: int = 0,
        lr: float | Sequence[float] | None = None,
        lr_growth: LrGrowth | None = None,
        align_with_head: bool = False,
    ) -> None:
        if isinstance(groups, (str, nn.Module)) or not groups:
            raise ValueError("groups must be a non-empty list of module specs (or lists of them)")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        n = len(groups)
        if isinstance(lr_scale, (int, float)):
            scales = [_check_scale(lr_scale)] * n
        else:
            scales = [_check_scale(s) for s in lr_scale]
            if len(scales) != n:
                raise ValueError(f"lr_scale has {len(scales)} entries for {n} groups")
        lrs: list[float | None]
        if lr is None:
            lrs = [None] * n
        elif isinstance(lr, (int, float)):
            lrs = [_check_scale(lr, "lr")] * n
        else:
            lrs = [_check_scale(v, "lr") for v in lr]
            if len(lrs) != n:
                raise ValueError(f"lr has {len(lrs)} entries for {n} groups")
        self.lr = lrs
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.lr_scale = scales
        built = []
        if every_n_steps is not None:
            first = _check_at("start_step", start_step)
            first = every_n_steps if first is None else first
            self.start_step: int | None = first
            self.start_epoch: int | None = None
            for k, g in enumerate(groups):
                built.append(_Group(_as_specs(g), None, first + k * every_n_steps, scales[k], lrs[k]))
        else:
            first = _check_at("start_epoch", start_epoch)
            first = every_n_epochs if first is None else first
            self.start_epoch = first
            self.start_step = None
            for k, g in enumerate(groups):
                built.append(_Group(_as_specs(g), first + k * every_n_epochs, None, scales[k], lrs[k]))
        self.groups = [g.specs for g in built]
        super().__init__(built, train_bn=train_bn, optimizer_idx=optimizer_idx, lr_growth=lr_growth,
                         align_with_head=align_with_head)

    def unfreeze_points(self) -> list[tuple[str, int]]:
        """When each group unfreezes: ``("epoch", n)`` or ``("step", n)`` per group."""
        return [("step", g.at_step) if g.at_step is not None else ("epoch", g.at_epoch)  # type: ignore[misc]
                for g in self._groups]

    def __repr__(self) -> str:
        return f"GradualUnfreeze(groups={self.groups!r}, points={self.unfreeze_points()})"
