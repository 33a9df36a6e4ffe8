"""Model summaries for hookloop, built on torchinfo.

:func:`summarize` returns a :class:`ModelSummary`: one row per layer (name, type,
depth, output shape, parameters, mult-adds), the totals of all, trainable and
non-trainable parameters, and the input, forward/backward pass, parameter and estimated
total sizes in MB, with the printable table. The :class:`Summary` plugin makes one at fit
start (input taken from the first batch unless given), prints it, keeps it as data and
sends it to every tracker with ``loop.log_text``.

The summary's forward pass leaves no trace: it runs in eval mode under ``no_grad``, and
the RNG states, buffers (BatchNorm running statistics) and per-module train/eval modes
are restored afterwards, so a run with the plugin ends with the same weights, bit for
bit, as one without it. When no forward pass is possible, the summary falls back to
parameter counts and says why in :attr:`ModelSummary.note`.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from hookloop import only
from hookloop.plugins import hookimpl

if TYPE_CHECKING:
    from hookloop.loop import Loop

__all__ = [
    "LayerRow", "ModelSummary", "Summary", "default_input_fn", "side_effect_free", "summarize",
    "unwrap_compiled",
]

__version__ = "0.1.0"

InputFn = Callable[[Any], Any]
"""``input_fn(batch)``: the model's inputs in a batch; a tuple is passed as positional
arguments, a mapping as keyword arguments, anything else as the single argument."""


@dataclass
class LayerRow:
    """One row of the summary table."""

    name: str
    """Attribute path of the layer (``"backbone.0"``)."""
    type: str
    """Class name of the layer."""
    depth: int
    """Nesting depth (1 for direct children of the model)."""
    output_shape: list[Any] | None
    """Shape of the layer's output in the summary's forward pass (``None`` without one)."""
    num_params: int
    """Parameters of the layer, its sub-layers included."""
    trainable_params: int
    """Of which trainable (``requires_grad``)."""
    mult_adds: int | None
    """Multiply-accumulate operations of a leaf layer in the forward pass (``None`` for
    containers and without a forward pass)."""
    training: bool | None = None
    """The layer's train/eval mode before the summary (the forward pass itself runs
    in eval mode)."""
    input_shape: list[Any] | None = None
    """Shape of the layer's first input in the summary's forward pass (``None`` without
    one, or when the layer did not run: an unused or scripted layer)."""


@dataclass
class ModelSummary:
    """A model summary as data; ``str()`` gives the printable table."""

    model: str
    """Class name of the model."""
    layers: list[LayerRow]
    """Rows of the table: the layers in the order they ran, then those that did not
    run (unused or scripted layers, with no shapes)."""
    total_params: int
    """All parameters (shared parameters counted once)."""
    trainable_params: int
    """Parameters with ``requires_grad``."""
    non_trainable_params: int
    """Parameters without ``requires_grad`` (e.g. a frozen backbone)."""
    params_size_mb: float
    """Memory of the parameters in MB (1 MB = 10**6 bytes)."""
    other_params: int = 0
    """Parameters of the model itself, held by none of its sub-layers (no row shows
    them; torchinfo's top row does)."""
    training_modes: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0})
    """How many sub-modules (the model itself left out) were in train and in eval mode."""
    input_shapes: list[Any] = field(default_factory=list)
    """Shapes of the inputs of the forward pass."""
    input_size_mb: float | None = None
    """Memory of the inputs in MB (``None`` without a forward pass)."""
    forward_backward_size_mb: float | None = None
    """Memory of the activations kept for backward (outputs x 2) in MB."""
    total_size_mb: float | None = None
    """Input + forward/backward + parameter sizes in MB."""
    mult_adds: int | None = None
    """Total multiply-accumulate operations of one forward pass."""
    text: str = ""
    """The printable table."""
    note: str | None = None
    """Why the summary is reduced to parameter counts, when it is."""

    def __str__(self) -> str:
        return self.text

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON, trackers' config, tests)."""
        return asdict(self)


# ---------------------------------------------------------------------- side effects


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def side_effect_free(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, the RNG states (Python, NumPy, torch, CUDA), every buffer's
    values (BatchNorm running statistics, counters), every parameter's ``.grad`` and
    every module's train/eval mode, whatever the block did with them."""
    rng = _rng_state()
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g
        for m, mode in modes:
            m.training = mode
        _set_rng_state(rng)


# ---------------------------------------------------------------------- summary


def _numel(p: torch.Tensor) -> int:
    """Elements of ``p``; 0 for a lazy layer's parameter not initialized yet."""
    return 0 if is_lazy(p) else p.numel()


def _param_counts(model: nn.Module) -> tuple[int, int, float]:
    total = trainable = 0
    size = 0
    for p in model.parameters():  # shared parameters once
        n = _numel(p)
        total += n
        size += n * p.element_size() if n else 0
        if p.requires_grad:
            trainable += n
    return total, trainable, size / 1e6


def _other_params(model: nn.Module) -> int:
    """Parameters of ``model`` itself that none of its children holds."""
    held = {id(p) for child in model.children() for p in child.parameters()}
    return sum(_numel(p) for p in model.parameters(recurse=False) if id(p) not in held)


def _training_modes(model: nn.Module) -> dict[str, int]:
    modes = [m.training for m in model.modules()][1:]  # the model itself left out
    return {"train": sum(modes), "eval": len(modes) - sum(modes)}


def _layer_row(name: str, module: nn.Module, training: bool | None = None) -> LayerRow:
    """A row for a layer that did not run in a forward pass: parameter counts only."""
    params = list(module.parameters())
    return LayerRow(
        name=name, type=type(module).__name__, depth=name.count(".") + 1, output_shape=None,
        num_params=sum(_numel(p) for p in params),
        trainable_params=sum(_numel(p) for p in params if p.requires_grad), mult_adds=None,
        training=module.training if training is None else training,
    )


def _fallback(model: nn.Module, note: str, depth: int) -> ModelSummary:
    model = unwrap_compiled(model)
    depth = _check_depth(depth, model)
    total, trainable, size_mb = _param_counts(model)
    with _uncompiled_children(model):  # names without torch.compile's ``_orig_mod``
        rows = [_layer_row(name, module) for name, module in model.named_modules()
                if name and name.count(".") < depth]
    width = max([len(r.name) + 2 * r.depth + len(r.type) + 3 for r in rows] + [30])
    lines = [f"{type(model).__name__}: parameter counts only ({note})", "=" * (width + 16),
             f"{'Layer (type)':<{width}}{'Param #':>16}", "=" * (width + 16)]
    for r in rows:
        label = f"{'  ' * (r.depth - 1)}{r.name} ({r.type})"
        lines.append(f"{label:<{width}}{r.num_params:>16,}")
    lines += [
        "=" * (width + 16),
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        f"Params size (MB): {size_mb:0.2f}",
        "=" * (width + 16),
    ]
    return ModelSummary(
        model=type(model).__name__, layers=rows, total_params=total, trainable_params=trainable,
        non_trainable_params=total - trainable, params_size_mb=size_mb,
        other_params=_other_params(model), training_modes=_training_modes(model),
        text="\n".join(lines), note=note,
    )


# ---------------------------------------------------------------------- depth, torch.compile


def _check_depth(depth: Any, model: nn.Module | None = None) -> int:
    """``depth`` validated; -1 (every level) resolved to the model's deepest level."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < -1:
        raise ValueError(f"depth must be -1 (every level), 0 or a positive int; got {depth!r}")
    if depth == -1 and model is not None:
        return max([name.count(".") + 1 for name, _ in model.named_modules() if name] + [0])
    return depth


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), nn.Module)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d model wraps (``model._orig_mod``); ``model``
    itself when it is not compiled."""
    while _is_compiled(model):
        model = model._orig_mod
    return model


@contextlib.contextmanager
def _uncompiled_children(model: nn.Module) -> Iterator[None]:
    """Put the original module in place of every ``torch.compile``'d sub-module for the
    block, so the forward pass runs (and is hooked) uncompiled and nothing compiles."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stack = [model]
    try:
        while stack:
            module = stack.pop()
            for name, child in list(module._modules.items()):
                if child is not None and _is_compiled(child):
                    swapped.append((module, name, child))
                    child = module._modules[name] = unwrap_compiled(child)
                if child is not None:
                    stack.append(child)
        yield
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


def summarize(
    model: nn.Module,
    input_data: Any = None,
    input_size: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    depth: int = 3,
    mult_adds: bool = True,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | str | None = None,
    col_width: int = 20,
) -> ModelSummary:
    """Summarise ``model`` with torchinfo, without side effects on it.

    :param model: the model (pass the unwrapped module, not a DDP wrapper). A
        ``torch.compile``'d model, or one with compiled sub-modules, is summarised as
        the original module, uncompiled and without compiling it.
    :param input_data: the model's inputs: a tensor, a tuple of positional arguments,
        or a mapping of keyword arguments.
    :param input_size: instead of ``input_data``: an input shape including the batch
        dimension, e.g. ``(1, 3, 224, 224)``, or a list of shapes (random inputs).
    :param depth: deepest nesting level shown; -1 for every level, 0 for the totals only.
    :param mult_adds: add the mult-adds column and total.
    :param dtypes: dtypes of the random inputs made for ``input_size``.
    :param device: where the forward pass runs (default: the model's device; the model
        is never moved).
    :param col_width: width of the table's columns.
    :returns: the summary; with no input, or when the forward pass fails, the
        parameter counts with a ``note`` saying why.
    """
    import torchinfo

    model = unwrap_compiled(model)
    depth = _check_depth(depth, model)
    if input_data is None and input_size is None:
        return _fallback(model, "no input given, so no forward pass", depth)
    if any(is_lazy(p) for p in model.parameters()):
        return _fallback(model, "the model has uninitialized (lazy) parameters, which a forward "
                         "pass would initialize, so none was run; their sizes are not counted", depth)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    columns = ["output_size", "num_params", *(["mult_adds"] if mult_adds else [])]
    kwargs: dict[str, Any] = {}
    shapes: list[Any] = []
    if input_data is not None:
        if isinstance(input_data, Mapping):
            data: Any = dict(input_data)  # torchinfo passes a dict as keyword arguments
            shapes = [_shape(data)]
        elif isinstance(input_data, tuple):
            data = list(input_data)  # positional arguments
            shapes = [_shape(v) for v in input_data]
        else:
            data = [input_data]
            shapes = [_shape(input_data)]
        kwargs["input_data"] = data
    else:
        kwargs["input_size"] = input_size
        kwargs["dtypes"] = list(dtypes) if dtypes is not None else None
        sizes = input_size if input_size and isinstance(input_size[0], (list, tuple)) else [input_size]
        shapes = [list(s) for s in sizes]  # type: ignore[union-attr]
    with _uncompiled_children(model):
        modes = {id(m): m.training for m in model.modules()}  # before torchinfo's eval()
        names = {id(m): name for name, m in model.named_modules()}
        try:
            with side_effect_free(model):
                stats = torchinfo.summary(
                    model, depth=depth, col_names=columns, col_width=col_width, device=device,
                    mode="eval", verbose=0, row_settings=("depth", "var_names"), **kwargs,
                )
        except Exception as exc:
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            cause = exc.__cause__ or exc.__context__
            if cause is not None and str(cause).strip():
                detail = str(cause).strip().splitlines()[-1]
            note = f"forward pass failed: {type(cause or exc).__name__}: {detail[:300]}"
            return _fallback(model, note, depth)
        rows: list[LayerRow] = []
        ran: set[int] = set()
        for info in stats.summary_list:
            module = info.module
            name = names.get(id(module)) or _layer_name(info)
            if not name:
                continue  # the model itself
            ran.add(id(module))
            if name.count(".") >= depth:
                continue
            rows.append(LayerRow(
                name=name,
                type=type(module).__name__,
                depth=name.count(".") + 1,
                output_shape=_torchinfo_shape(info.output_size),
                num_params=int(max(info.num_params, 0)),
                trainable_params=int(max(info.trainable_params, 0)),
                mult_adds=int(info.macs) if info.is_leaf_layer else None,
                training=modes.get(id(module)),
                input_shape=_torchinfo_shape(info.input_size),
            ))
        # layers the forward pass did not run (unused, or scripted: hooks do not fire)
        rows += [_layer_row(name, m, modes.get(id(m))) for name, m in model.named_modules()
                 if name and id(m) not in ran and name.count(".") < depth]
    total, trainable, params_mb = _param_counts(model)
    input_mb = stats.total_input / 1e6
    fb_mb = stats.total_output_bytes / 1e6
    text = _UNITS.sub(lambda m: f"({_UNIT_NAMES.get(m.group(1), m.group(1))})", str(stats))
    return ModelSummary(
        model=type(model).__name__,
        layers=rows,
        total_params=total,
        trainable_params=trainable,
        non_trainable_params=total - trainable,
        params_size_mb=params_mb,
        other_params=_other_params(model),
        training_modes=_training_modes(model),
        input_shapes=shapes,
        input_size_mb=input_mb,
        forward_backward_size_mb=fb_mb,
        total_size_mb=input_mb + fb_mb + params_mb,
        mult_adds=int(stats.total_mult_adds) if mult_adds else None,
        text=_own_totals(text, total, trainable, params_mb, input_mb + fb_mb + params_mb),
    )


def _torchinfo_shape(size: Any) -> list[Any] | None:
    return list(size) if size else None


def _own_totals(text: str, total: int, trainable: int, params_mb: float, total_mb: float) -> str:
    """torchinfo's table with the totals counted here: torchinfo counts a scripted
    layer's parameters twice and a lazy layer's not at all."""
    for label, value in (("Total params", f"{total:,}"), ("Trainable params", f"{trainable:,}"),
                         ("Non-trainable params", f"{total - trainable:,}"),
                         ("Params size (MB)", f"{params_mb:0.2f}"),
                         ("Estimated Total Size (MB)", f"{total_mb:0.2f}")):
        text = re.sub(rf"^{re.escape(label)}: .*$", lambda _m, lv=(label, value): f"{lv[0]}: {lv[1]}",
                      text, count=1, flags=re.MULTILINE)
    return text


# torchinfo 1.8 prints "Total mult-adds (Units.MEGABYTES)" on recent Pythons
_UNITS = re.compile(r"\(Units\.(\w+)\)")
_UNIT_NAMES = {"NONE": "", "KILOBYTES": "K", "MEGABYTES": "M", "GIGABYTES": "G", "TERABYTES": "T"}


def _layer_name(info: Any) -> str:
    parts = []
    node = info
    while node is not None and node.depth > 0 and getattr(node, "var_name", None):
        parts.append(str(node.var_name))
        node = getattr(node, "parent_info", None)
    return ".".join(reversed(parts))


def default_input_fn(batch: Any) -> tuple[Any]:
    """The model's input in a batch, as the loop's default step passes it: the first
    element of an ``(input, target, ...)`` tuple or list; any other batch (a dict, a
    tensor) whole. Returned as a one-element tuple: the single positional argument."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return (batch[0],)
    return (batch,)


class Summary:
    """Print a model summary at fit start, keep it as data and send it to trackers.

    :param input_size: an input shape with the batch dimension, e.g. ``(1, 1, 8, 8)``
        (or a list of shapes); the summary is then made at fit start.
    :param input_data: example inputs (see :func:`summarize`); also made at fit start.
    :param input_fn: ``input_fn(batch)`` to find the model's inputs in the first batch
        when neither is given (default :func:`default_input_fn`); return a tuple for
        several positional inputs or a mapping for keyword inputs.
    :param depth: deepest nesting level shown; -1 for every level, 0 for the totals only.
    :param mult_adds: include mult-adds.
    :param print_fn: how the table is shown (``None``: not printed).
    :param log_name: the tag of ``loop.log_text``.
    :param every_fit: make a new summary at every ``fit`` (default: the first only).
    """

    hookloop_name = "summary"
    hookloop_rank_zero_only = True
    # after freezing plugins, so trainable counts reflect the frozen modules
    hookloop_after = ("freeze", "gradual_unfreeze")

    def __init__(
        self,
        input_size: Sequence[int] | Sequence[Sequence[int]] | None = None,
        input_data: Any = None,
        input_fn: InputFn | None = None,
        depth: int = 3,
        mult_adds: bool = True,
        print_fn: Callable[[str], Any] | None = print,
        log_name: str = "model/summary",
        every_fit: bool = False,
    ) -> None:
        _check_depth(depth)
        self.input_size = input_size
        self.input_data = input_data
        self.input_fn = input_fn or default_input_fn
        self.depth = depth
        self.mult_adds = bool(mult_adds)
        self.print_fn = print_fn
        self.log_name = log_name
        self.every_fit = bool(every_fit)
        self.summary: ModelSummary | None = None
        self._pending = False

    @hookimpl
    def on_fit_start(self, loop: Loop) -> None:
        """Summarise now when an input is given, else at the first batch."""
        if self.summary is not None and not self.every_fit:
            return
        if self.input_size is not None or self.input_data is not None:
            self._make(loop, self.input_data)
        else:
            self._pending = True

    @hookimpl
    @only(once=True)  # the compiled plan drops the call after the first batch of a fit
    def on_train_batch_start(self, loop: Loop, batch: Any, batch_idx: int) -> None:
        """Summarise on the first batch's input (once per fit)."""
        if self._pending:
            self._pending = False
            try:
                data = self.input_fn(batch)
            except Exception as exc:
                self._publish(loop, _fallback(loop.module, f"input_fn failed: {exc!r}", self.depth))
                return
            self._make(loop, data)

    def _make(self, loop: Loop, data: Any) -> None:
        result = summarize(loop.module, input_data=data,
                           input_size=None if data is not None else self.input_size,
                           depth=self.depth, mult_adds=self.mult_adds, device=loop.device)
        self._publish(loop, result)

    def _publish(self, loop: Loop, result: ModelSummary) -> None:
        self.summary = result
        text = result.text if result.note is None else f"{result.text}\nNote: {result.note}"
        if self.print_fn is not None:
            self.print_fn(text)
        loop.log_text(self.log_name, text)
