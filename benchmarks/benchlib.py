"""Shared helpers of the hookloop benchmark scripts.

Timing, machine description, target bookkeeping, the no-op plugin used to count
dispatch costs, and the assembly of the "full bundled stack" of installed plugins.
Every script in this folder imports it as ``benchlib`` (the folder is on ``sys.path``
when a script runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hookloop.plugins import hookimpl

BUNDLED = ("checkpoint", "early_stopping", "freeze", "summary", "tensorboard", "mlflow", "wandb", "progress")
"""Entry-point names of the plugins that make up the full bundled stack."""

LOG_EVERY = 50
"""Logging interval (optimizer steps) of every contender that logs."""

TRACKERS = ("tensorboard", "mlflow", "wandb")
"""The bundled tracker plugins (the tracker target measures these three together)."""

_T0 = time.perf_counter()
_DEADLINE: list[float | None] = [None]


# ----------------------------------------------------------------------------- time budget


def set_budget(seconds: float | None) -> None:
    """Give the whole run ``seconds`` from now (``None``: no limit). Parts check
    :func:`time_left` between rounds and stop early, or are reported ``NOT RUN``."""
    _DEADLINE[0] = None if seconds is None else time.perf_counter() + seconds


def time_left() -> float:
    """Seconds left of the budget (infinite without one)."""
    end = _DEADLINE[0]
    return float("inf") if end is None else end - time.perf_counter()


def out_of_time(need_s: float = 0.0) -> bool:
    """Whether less than ``need_s`` seconds of the budget are left."""
    return time_left() <= need_s


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: CPU, GPU, core count and library versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for dist in ("hookloop", "pluggy", "pytorch-ignite", "lightning", *(f"hookloop-{n.replace('_', '')}"
                                                                         for n in BUNDLED)):
        info[f"version:{dist}"] = dist_version(dist)
    return info


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- stats


def summarize(samples: Sequence[float], scale: float = 1e6) -> dict[str, Any]:
    """Median, quartiles, min, max and count of ``samples`` (seconds), scaled (default:
    to us)."""
    if not samples:
        return {"median": None, "p25": None, "p75": None, "min": None, "max": None, "n": 0}
    values = sorted(s * scale for s in samples)
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = values[0], values[-1]
    return {"median": statistics.median(values), "p25": p25, "p75": p75, "min": values[0],
            "max": values[-1], "n": len(values)}


def over_rounds(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and spread (min and max) of one figure measured once per round.

    The figures of this suite are quoted this way: a difference smaller than the
    spread across rounds is not a result. ``None`` entries (a round that did not run)
    are left out."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "rounds": []}
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals),
            "rounds": list(values)}


def rng(stat: dict[str, Any] | None) -> str | None:
    """``"min..max"`` of a stats dict with ``min``/``max`` (``None`` when absent)."""
    if not stat or stat.get("min") is None:
        return None
    return f"{_fmt(stat['min'])}..{_fmt(stat['max'])}"


def spread_text(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``"median [min..max, n rounds]"`` of an :func:`over_rounds` result."""
    if not stat or stat.get("median") is None:
        return "-"
    return (f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}..{stat['max']:.{digits}f}, "
            f"n={stat['n']}]")


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FetchClock:
    """An iterable over pre-generated batches that times each pass from inside.

    Every pass records the time from handing out the first batch to handing out the
    last one, which covers exactly ``len - 1`` full steps of whatever consumes it and
    leaves out epoch-start and epoch-end work (validation, checkpointing, tracker
    start-up). All contenders consume the same clock, so its own cost (one generator
    resumption per batch) is the same for each of them. On CUDA the pass starts with a
    synchronisation and is timed with CUDA events.
    """

    def __init__(self, batches: Sequence[Any], device: torch.device) -> None:
        if len(batches) < 2:
            raise ValueError("FetchClock needs at least 2 batches per pass")
        self.batches = list(batches)
        self.device = device
        self._times: list[float] = []
        self._events: list[tuple[Any, Any]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        batches = self.batches
        last = len(batches) - 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(last):
                yield batches[i]
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            for i in range(last):
                yield batches[i]
            self._times.append(time.perf_counter() - t0)
        yield batches[last]

    def take(self) -> list[float]:
        """Seconds per step of every pass since the last call; clears them."""
        steps = len(self.batches) - 1
        if self._events:
            sync(self.device)
            out = [s.elapsed_time(e) / 1e3 / steps for s, e in self._events]
        else:
            out = [t / steps for t in self._times]
        self._times, self._events = [], []
        return out


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One target of the suite: a measured figure against a limit."""

    name: str
    value: float | None
    limit: float
    unit: str
    note: str = ""
    spread: Sequence[float] | None = None
    """``(min, max)`` of the figure across rounds (or repetitions), when measured so."""

    @property
    def status(self) -> str:
        """``met``, ``MISSED`` or ``NOT RUN`` (no figure); judged on the median."""
        if self.value is None:
            return "NOT RUN"
        return "met" if self.value <= self.limit else "MISSED"

    @property
    def inconclusive(self) -> bool:
        """Whether the spread across rounds straddles the limit (the status is then not
        a result: a repeat could flip it)."""
        if self.value is None or not self.spread:
            return False
        lo, hi = self.spread
        return lo <= self.limit < hi

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit,
                "status": self.status, "note": self.note,
                "spread": None if self.spread is None else list(self.spread),
                "inconclusive": self.inconclusive}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        """Inverse of :meth:`as_dict`."""
        return cls(d["name"], d["value"], d["limit"], d["unit"], d.get("note", ""), d.get("spread"))

    def line(self) -> str:
        """One printed line: figure with its spread, limit and status."""
        value = "-" if self.value is None else f"{self.value:.3f}"
        if self.value is not None and self.spread:
            value += f" [{self.spread[0]:.3f}..{self.spread[1]:.3f}]"
        notes = [self.note] if self.note else []
        if self.inconclusive:
            notes.append("spread straddles the limit: not a result")
        note = f"  ({'; '.join(notes)})" if notes else ""
        limit = f"(target <= {self.limit:g} {self.unit})"
        return f"  [{self.status:>7}] {self.name}: {value} {self.unit} {limit}{note}"


def report_text(lines: Sequence[str], targets: Sequence[dict[str, Any]]) -> str:
    """A script's printed report: ``lines``, then ``targets:`` and one line per target
    (JSON form, as in a result's ``targets``)."""
    return "\n".join([*lines, "targets:", *(Target.from_dict(t).line() for t in targets)])


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain text table with right-aligned numeric columns."""
    cells = [[str(h) for h in header]] + [["-" if c is None else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------- no-op plugin


class NoopPlugin:
    """Implements every per-step hook and does nothing: the cost of dispatch alone."""

    @hookimpl
    def on_train_batch_start(self, loop: Any, batch: Any, batch_idx: int) -> None:
        """No-op."""

    @hookimpl
    def on_before_backward(self, loop: Any, loss: Any) -> None:
        """No-op."""

    @hookimpl
    def on_after_backward(self, loop: Any) -> None:
        """No-op."""

    @hookimpl
    def on_before_optimizer_step(self, loop: Any, optimizer: Any) -> None:
        """No-op."""

    @hookimpl
    def on_train_batch_end(self, loop: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """No-op."""


# ----------------------------------------------------------------------------- environment


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """Run inside a temporary working folder with trackers forced offline and quiet.

    Plugins and peers that write to relative paths (``runs/``, ``mlruns/``,
    ``wandb/``, ``lightning_logs/``) write there; it is removed afterwards.
    """
    old_cwd = os.getcwd()
    old_env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="hookloop-bench-") as tmp:
        os.chdir(tmp)
        os.environ.update({
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_DIR": tmp,
            "WANDB_CONSOLE": "off",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "HOOKLOOP_DISABLE_PLUGIN_AUTOLOAD": "1",
        })
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield Path(tmp)
        finally:
            os.chdir(old_cwd)
            os.environ.clear()
            os.environ.update(old_env)


_counter = [0]


def fresh_dir(root: Path, prefix: str) -> Path:
    """A new empty folder under ``root``."""
    _counter[0] += 1
    path = root / f"{prefix}-{_counter[0]}"
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- full stack


def _option_candidates(name: str) -> list[dict[str, Any]]:
    """Options tried, in order, for each bundled plugin; ``{dir}`` is a fresh folder."""
    return {
        "checkpoint": [{"dirpath": "{dir}/ckpt", "every_n_epochs": 1},
                       {"dirpath": "{dir}/ckpt"}],
        "early_stopping": [{"monitor": "val/loss", "patience": 10**6}],
        # "1" is a parameter-free activation in every benchmark model: the plugin is
        # registered and runs its hooks without changing the arithmetic of the step
        "freeze": [{"modules": ["1"]}, {"modules": ["0"], "unfreeze_at_step": 1},
                   {"modules": ["0"], "unfreeze_at_epoch": 1}],
        "summary": [{}],
        "tensorboard": [{"log_dir": "{dir}/tb"}, {"logdir": "{dir}/tb"}, {"save_dir": "{dir}/tb"}, {}],
        "mlflow": [{"tracking_uri": "sqlite:///{dir}/mlflow.db"}, {"tracking_uri": "file://{dir}/mlruns"},
                   {}],
        "wandb": [{"mode": "offline", "dir": "{dir}"}, {"mode": "offline", "save_dir": "{dir}"},
                  {"mode": "offline"}, {}],
        "progress": [{}],
    }[name]


def _fill(options: dict[str, Any], folder: Path) -> dict[str, Any]:
    return {k: (v.replace("{dir}", str(folder)) if isinstance(v, str) else v) for k, v in options.items()}


@dataclass
class FullStack:
    """The bundled plugins found installed and working, with their options.

    ``chosen`` maps name to the option template that worked; ``missing`` maps name to
    why it is not in the stack (not installed, failed with every option set).
    """

    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def plugins(self, root: Path) -> list[tuple[str, dict[str, Any]]]:
        """``(name, options)`` pairs for a new Loop, each with fresh folders under ``root``."""
        folder = fresh_dir(root, "stack")
        return [(name, _fill(opts, folder)) for name, opts in self.chosen.items()]

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"plugins": list(self.chosen), "options": self.chosen, "missing": self.missing}


def resolve_full_stack(
    root: Path, probe: Callable[[list[tuple[str, dict[str, Any]]]], None], names: Sequence[str] = BUNDLED
) -> FullStack:
    """Find which bundled plugins are installed and which option set each accepts.

    ``HOOKLOOP_BENCH_PLUGINS`` (comma separated names) restricts the candidates.
    ``probe(plugins)`` runs a short fit with the given plugin specs and raises on
    failure. Each plugin is probed alone, then the whole stack together; a plugin that
    fails is left out and recorded in ``missing`` with the error.
    """
    from hookloop.plugins import available_plugins

    found = available_plugins(refresh=True)
    stack = FullStack()
    allowed = os.environ.get("HOOKLOOP_BENCH_PLUGINS")
    for name in names:
        entry = found.get(name)
        if allowed is not None and name not in [n.strip() for n in allowed.split(",")]:
            stack.missing[name] = "left out by HOOKLOOP_BENCH_PLUGINS"
            continue
        if entry is None:
            stack.missing[name] = "not installed"
            continue
        if entry.error:
            stack.missing[name] = f"import failed: {entry.error}"
            continue
        errors = []
        for options in _option_candidates(name):
            try:
                probe([(name, _fill(options, fresh_dir(root, f"probe-{name}")))])
            except Exception as exc:
                errors.append(f"{options}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            stack.chosen[name] = options
            break
        else:
            stack.missing[name] = "failed with every option set: " + " | ".join(errors)
    if stack.chosen:
        try:
            probe(stack.plugins(root))
        except Exception as exc:
            for name in list(stack.chosen):
                stack.missing[name] = f"full stack failed together: {type(exc).__name__}: {exc}"
            stack.chosen = {}
    return stack


def hookloop_loop(
    model: nn.Module,
    train_data: Any,
    *,
    plugins: Sequence[Any] = (),
    step_fn: Callable[[Any, Any], Any] | None = None,
    val_data: Any = None,
    lr: float = 0.01,
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
) -> Any:
    """A hookloop ``Loop`` as every benchmark builds it: SGD with momentum,
    cross-entropy (or ``loss_fn``), logging every ``LOG_EVERY`` steps, no autoload,
    not distributed."""
    from hookloop.loop import Loop

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Loop(model, opt, train_data, loss_fn=loss_fn, step_fn=step_fn,
                val_data=val_data, plugins=list(plugins), log_every_n_steps=LOG_EVERY,
                autoload=False, distributed=False)


def noop_step(loop: Any, batch: Any) -> None:
    """A step function that does nothing (the loop then skips optimisation)."""
    return None


def log(msg: str) -> None:
    """Progress message on stderr (results go to stdout), with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def compile_unavailable(device: torch.device, backend: str) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot be used on ``device``, or ``None``.

    Compiles and runs a two-op function once (this is where a missing C++ compiler or
    Triton shows up). ``HOOKLOOP_BENCH_COMPILE=0`` turns the compiled variants off."""
    if os.environ.get("HOOKLOOP_BENCH_COMPILE", "1") == "0":
        return "turned off by HOOKLOOP_BENCH_COMPILE=0"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        fn = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend=backend)
        fn(torch.ones(8, device=device))
        sync(device)
    except Exception as exc:
        return f"torch.compile(backend={backend!r}) failed: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def target_from_rounds(name: str, stat: dict[str, Any] | None, limit: float, unit: str,
                       note: str = "") -> Target:
    """A :class:`Target` from an :func:`over_rounds` result (median, with its spread)."""
    if not stat or stat.get("median") is None:
        return Target(name, None, limit, unit, note)
    return Target(name, stat["median"], limit, unit, note, (stat["min"], stat["max"]))


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def param_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters of ``model``."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plugin_script_main(argv: list[str] | None, doc: str, json_name: str,
                       run: Callable[..., dict[str, Any]],
                       report: Callable[[dict[str, Any]], str]) -> int:
    """The command line of a benchmark script that runs with the bundled plugins:
    ``--device``, ``--quick``, ``--out``; ``run(device, quick, root, plugins)`` inside a
    sandbox, then its JSON written and its report printed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, help=f"folder for {json_name}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with sandbox() as root:
        from workloads import _resolve

        result = run(device, args.quick, root, _resolve(device, root))
    result["machine"] = machine_info(device)
    if args.out is not None:
        write_json(args.out.resolve() / json_name, result)
    print(report(result))
    return 0
