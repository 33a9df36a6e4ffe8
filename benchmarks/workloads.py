"""Per-step cost of hookloop against a raw PyTorch loop, PyTorch Ignite and PyTorch
Lightning on three workloads, with host-device syncs and peak memory.

Workloads (data pre-generated on the device, so loading is not measured):

- ``noop``: a step function that does nothing: framework overhead per step;
- ``mlp``: a tiny MLP (32-64-64-1, MSE regression, batch 32): dispatch-dominated;
- ``cnn``: a small CNN on 32x32 images (batch 32): a realistic step;
- ``cnn_compiled``: the same CNN under ``torch.compile`` (raw, hookloop and the full
  stack only; compiled once before timing; skipped with the reason printed when
  ``torch.compile`` does not work here). Quick runs use the ``eager`` backend
  (``HOOKLOOP_BENCH_COMPILE_BACKEND`` overrides; default ``inductor``).

Contenders: the raw loop (the floor); the raw loop calling a no-op callback object's
five per-step methods by hand; hookloop with no plugins, with that same object as a
plugin, and with the full bundled stack (every bundled plugin installed: checkpoint
per epoch, early stopping, freeze, summary, TensorBoard + MLflow + W&B offline logging
every 50 steps, progress bar); Ignite with one no-op handler and with comparable
handlers; Lightning with logger, checkpointing, progress bar and summary off, and with
its defaults. Ignite and Lightning are optional (``benchmarks/requirements.txt``).

Every contender consumes the same :class:`benchlib.FetchClock`, which times each epoch
from inside (first to last batch handed out), so start-up and epoch-end work is left
out of the per-step figure; the whole fit's wall time is reported beside it. Rounds
interleave the contenders; the first epoch of every fit is warm-up and dropped. Each
figure is the median over rounds with its spread (min..max across rounds); overheads
are paired by round (contender minus raw in the same round). A difference smaller
than the spread is not a result. The 3% target of the bare loop on the tiny MLP is
judged by ``bare_loop.py`` (paired blocks of one epoch, where the machine's drift
cannot come between the two); the ``mlp`` rows here put it beside the peers. Under a
time budget (``benchlib.set_budget``) a
workload stops after the last round that fits and says how many ran.

Run alone: ``python benchmarks/workloads.py [--device cpu|cuda] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import LOG_EVERY, FetchClock, NoopPlugin, Target, format_table, log, summarize
from torch import nn
from torch.nn import functional as F

from hookloop import hookimpl
from hookloop.testing import SyncGuard

# ----------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model template, pre-generated batches on the device and timing sizes.

    Index ``"1"`` of every model is a parameter-free activation (the freeze plugin of
    the full stack is pointed at it, so it runs without changing the step's arithmetic).
    """

    name: str
    template: nn.Module
    batches: list[Any]
    noop: bool
    epochs: int
    rounds: int
    device: torch.device
    val: list[Any] = field(default_factory=list)
    loss: Callable[..., torch.Tensor] = F.cross_entropy
    contenders: tuple[str, ...] | None = None
    """Names of the contenders that run this workload (``None``: all)."""
    compiled: Any = None
    """The one ``torch.compile``d module every contender shares (compiled once)."""
    note: str = ""

    def model(self) -> nn.Module:
        """A fresh copy of the template (same initial weights for every contender); for
        the compiled workload, the shared compiled module reset to the initial weights."""
        if self.compiled is not None:
            self.compiled._orig_mod.load_state_dict(self._initial)
            return self.compiled
        return copy.deepcopy(self.template)

    def compile(self, backend: str) -> None:
        """Wrap a copy of the template in ``torch.compile`` (compiled on first use)."""
        eager = copy.deepcopy(self.template)
        self._initial = {k: v.clone() for k, v in eager.state_dict().items()}
        self.compiled = torch.compile(eager, backend=backend)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer every contender uses."""
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _batches(n: int, shape: tuple[int, ...], classes: int, device: torch.device) -> list[Any]:
    """``n`` batches ``(x, y)``: class labels, or regression targets of shape (batch, 1)
    when ``classes`` is 0."""
    g = benchlib.seeded(1)
    out = []
    for _ in range(n):
        x = torch.randn(*shape, generator=g)
        y = torch.randn(shape[0], 1, generator=g) if classes == 0 else torch.randint(0, classes, (shape[0],),
                                                                                      generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def tiny_mlp() -> nn.Module:
    """The tiny MLP of the targets: 32-64-64-1 (index "1" is a parameter-free ReLU)."""
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def small_cnn() -> nn.Module:
    """The small CNN: two conv layers on 32x32 images, 10 classes."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


WORKLOADS = ("noop", "mlp", "cnn", "cnn_compiled")

SIZES = {  # steps per epoch, epochs per fit, rounds
    ("cpu", False): {"noop": (2000, 3, 5), "mlp": (400, 3, 9), "cnn": (40, 3, 4), "cnn_compiled": (40, 3, 4)},
    ("cuda", False): {"noop": (1000, 3, 3), "mlp": (500, 3, 9), "cnn": (200, 3, 5),
                      "cnn_compiled": (200, 3, 5)},
    ("cpu", True): {"noop": (12, 2, 1), "mlp": (6, 2, 1), "cnn": (3, 2, 1), "cnn_compiled": (3, 2, 1)},
    ("cuda", True): {"noop": (12, 2, 1), "mlp": (6, 2, 1), "cnn": (3, 2, 1), "cnn_compiled": (3, 2, 1)},
}

COMPILED_CONTENDERS = ("raw", "hookloop", "hookloop full stack")


def compile_backend(quick: bool) -> str:
    """The ``torch.compile`` backend: ``HOOKLOOP_BENCH_COMPILE_BACKEND``, else ``eager``
    for quick runs (the path is rehearsed without code generation) and ``inductor``."""
    return os.environ.get("HOOKLOOP_BENCH_COMPILE_BACKEND") or ("eager" if quick else "inductor")


def make_workloads(device: torch.device, quick: bool, only: list[str] | None = None
                   ) -> tuple[list[Workload], dict[str, str]]:
    """The workloads at the sizes for ``device`` (tiny with ``quick``), and the ones
    skipped (name to reason: ``torch.compile`` unavailable)."""
    sizes = SIZES[(device.type if device.type == "cuda" else "cpu", quick)]
    torch.manual_seed(0)
    specs = {
        "noop": (nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), (16, 8), 2, True),
        "mlp": (tiny_mlp(), (32, 32), 0, False),
        "cnn": (small_cnn(), (32, 3, 32, 32), 10, False),
    }
    out = []
    skipped: dict[str, str] = {}
    for name in WORKLOADS:
        if only and name not in only:
            continue
        model, shape, classes, noop = specs["cnn" if name == "cnn_compiled" else name]
        steps, epochs, rounds = sizes[name]
        batches = _batches(steps, shape, classes, device)
        w = Workload(name, copy.deepcopy(model).to(device), batches, noop, epochs, rounds, device,
                     val=batches[:1], loss=F.mse_loss if classes == 0 else F.cross_entropy)
        if name == "cnn_compiled":
            backend = compile_backend(quick)
            why = benchlib.compile_unavailable(device, backend)
            if why is not None:
                skipped[name] = why
                log(f"workloads: {name} skipped: {why}")
                continue
            w.compile(backend)
            w.contenders = COMPILED_CONTENDERS
            w.note = f"torch.compile(backend={backend!r})"
        out.append(w)
    return out, skipped


# ----------------------------------------------------------------------------- contenders


@dataclass
class Ctx:
    """What a contender run needs besides the clock."""

    work: Workload
    root: Path
    stack: benchlib.FullStack


Runner = Callable[[Ctx, Any, int], None]


def raw(ctx: Ctx, data: Any, epochs: int) -> None:
    """The floor: forward, loss, backward, step, zero_grad; nothing else."""
    w = ctx.work
    if w.noop:
        step = benchlib.noop_step
        for _ in range(epochs):
            for batch in data:
                step(None, batch)
        return
    model = w.model()
    opt = w.optimizer(model)
    model.train()
    loss_fn = w.loss
    for _ in range(epochs):
        for x, y in data:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def raw_callbacks(ctx: Ctx, data: Any, epochs: int) -> None:
    """The raw loop calling a no-op callback object's per-step methods by hand, at the
    points where hookloop fires the same hooks."""
    w = ctx.work
    cb = NoopPlugin()
    start, before_bw, after_bw = cb.on_train_batch_start, cb.on_before_backward, cb.on_after_backward
    before_opt, end = cb.on_before_optimizer_step, cb.on_train_batch_end
    if w.noop:
        step = benchlib.noop_step
        for _ in range(epochs):
            for i, batch in enumerate(data):
                start(None, batch, i)
                out = step(None, batch)
                end(None, out, batch, i)
        return
    model = w.model()
    opt = w.optimizer(model)
    model.train()
    loss_fn = w.loss
    for _ in range(epochs):
        for i, batch in enumerate(data):
            start(None, batch, i)
            x, y = batch
            loss = loss_fn(model(x), y)
            before_bw(None, loss)
            loss.backward()
            after_bw(None)
            before_opt(None, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            end(None, loss, batch, i)


def _hookloop(plugins: Callable[[Ctx], list[Any]]) -> Runner:
    def run(ctx: Ctx, data: Any, epochs: int) -> None:
        w = ctx.work
        loop = benchlib.hookloop_loop(w.model(), data, plugins=plugins(ctx), loss_fn=w.loss,
                                      step_fn=benchlib.noop_step if w.noop else None, val_data=w.val)
        loop.fit(max_epochs=epochs)

    return run


hookloop_none = _hookloop(lambda ctx: [])
hookloop_noop = _hookloop(lambda ctx: [NoopPlugin()])


class TrackersReady:
    """Waits at fit start until every tracker has opened its run.

    hookloop's trackers open their backend while training starts (in their backend
    process, or on a worker thread with ``backend="thread"``, where MLflow's SQLite
    store takes seconds of Python work that competes with the training thread for the
    GIL). Ignite's and Lightning's loggers open synchronously before the first step.
    To compare per-step costs, the full-stack contender waits here too; the start-up
    is in the "fit wall" column, not in the per-step figure."""

    hookloop_name = "bench_trackers_ready"

    @hookimpl(trylast=True)
    def on_fit_start(self, loop: Any) -> None:
        from hookloop.tracking import Tracker

        for _, plugin in loop.pm.plugin_items():
            if isinstance(plugin, Tracker):
                plugin.wait(120)


hookloop_full = _hookloop(lambda ctx: [*ctx.stack.plugins(ctx.root), TrackersReady()])


def _ignite_update(ctx: Ctx) -> tuple[Callable[[Any, Any], Any], nn.Module, torch.optim.Optimizer]:
    w = ctx.work
    model = w.model()
    opt = w.optimizer(model)
    model.train()
    if w.noop:
        return (lambda engine, batch: None), model, opt

    def update(engine: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        loss = w.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return update, model, opt


def ignite_one(ctx: Ctx, data: Any, epochs: int) -> None:
    """Ignite ``Engine`` with one no-op handler on ``ITERATION_COMPLETED``."""
    from ignite.engine import Engine, Events

    update, _, _ = _ignite_update(ctx)
    engine = Engine(update)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: None)
    engine.run(data, max_epochs=epochs)


IGNITE_HANDLERS = ("checkpoint", "early_stopping", "progress", "tensorboard", "mlflow", "wandb")
"""Ignite counterparts of the bundled plugins (Ignite has no freeze or summary handler)."""


def ignite_full(ctx: Ctx, data: Any, epochs: int) -> None:
    """Ignite with the handlers comparable to the full stack: ModelCheckpoint per epoch,
    EarlyStopping, ProgressBar, and TensorBoard, MLflow and W&B (offline) loggers of
    the step output every 50 iterations."""
    from ignite.engine import Engine, Events
    from ignite.handlers import EarlyStopping, ModelCheckpoint, ProgressBar

    update, model, opt = _ignite_update(ctx)
    engine = Engine(update)
    folder = benchlib.fresh_dir(ctx.root, "ignite")
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             ModelCheckpoint(str(folder / "ckpt"), "bench", n_saved=1, require_empty=False),
                             {"model": model, "optimizer": opt})
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             EarlyStopping(10**6, lambda e: -float(e.state.epoch), engine))
    ProgressBar().attach(engine)
    loggers = []

    def transform(out: Any) -> dict[str, Any]:
        return {"loss": 0.0 if out is None else out}

    with contextlib.suppress(ImportError):
        from ignite.handlers.tensorboard_logger import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(folder / "tb")))
    with contextlib.suppress(ImportError):
        from ignite.handlers.mlflow_logger import MLflowLogger

        loggers.append(MLflowLogger(tracking_uri=f"sqlite:///{folder}/mlflow.db"))
    with contextlib.suppress(ImportError):
        from ignite.handlers.wandb_logger import WandBLogger

        loggers.append(WandBLogger(mode="offline", dir=str(folder), project="hookloop-bench"))
    for lg in loggers:
        lg.attach_output_handler(engine, event_name=Events.ITERATION_COMPLETED(every=LOG_EVERY),
                                 tag="train", output_transform=transform)
    try:
        engine.run(data, max_epochs=epochs)
    finally:
        for lg in loggers:
            lg.close()


def _lightning(defaults: bool) -> Runner:
    def run(ctx: Ctx, data: Any, epochs: int) -> None:
        import lightning as L

        w = ctx.work

        class Lit(L.LightningModule):
            def __init__(self, model: nn.Module) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                if w.noop:
                    return None
                x, y = batch
                loss = w.loss(self.model(x), y)
                if defaults:
                    self.log("train/loss", loss)
                return loss

            def configure_optimizers(self) -> Any:
                return w.optimizer(self.model)

        folder = benchlib.fresh_dir(ctx.root, "lightning")
        kwargs: dict[str, Any] = dict(max_epochs=epochs, accelerator=w.device.type, devices=1,
                                      default_root_dir=str(folder), num_sanity_val_steps=0,
                                      log_every_n_steps=LOG_EVERY)
        if not defaults:
            kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        trainer = L.Trainer(**kwargs)
        trainer.fit(Lit(w.model()), train_dataloaders=data)

    return run


@dataclass
class Contender:
    """A named runner and what it needs installed."""

    name: str
    run: Runner
    needs: str | None = None
    note: str = ""


CONTENDERS = [
    Contender("raw", raw),
    Contender("raw + callbacks by hand", raw_callbacks, note="5 no-op per-step methods called by hand"),
    Contender("hookloop", hookloop_none),
    Contender("hookloop + 1 no-op plugin", hookloop_noop),
    Contender("hookloop full stack", hookloop_full),
    Contender("ignite, 1 no-op handler", ignite_one, needs="ignite"),
    Contender("ignite, comparable handlers", ignite_full, needs="ignite",
              note="ModelCheckpoint, EarlyStopping, ProgressBar, TensorBoard/MLflow/W&B loggers"),
    Contender("lightning, extras off", _lightning(False), needs="lightning",
              note="logger, checkpointing, progress bar, summary off"),
    Contender("lightning, defaults", _lightning(True), needs="lightning", note="self.log each step"),
]


def _available(module: str | None) -> str | None:
    """Why ``module`` cannot be used, or ``None`` when it imports."""
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} not installed ({exc}); pip install -r benchmarks/requirements.txt"
    return None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Send what contenders print (progress bars, summaries, banners) to /dev/null."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


# ----------------------------------------------------------------------------- measurement


class SyncClock:
    """Batches handed out while counting the sync events seen before each fetch."""

    def __init__(self, batches: list[Any], guard: SyncGuard) -> None:
        self.batches = batches
        self.guard = guard
        self.marks: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.marks.append(self.guard.count)
            yield b


def instrumented(c: Contender, ctx: Ctx, steps: int) -> dict[str, Any]:
    """One epoch of ``steps`` batches under the sync guard and a memory probe.

    Syncs: in total, per step inside the epoch (between the first and last fetch), and
    on steps that do not log (every step but each ``LOG_EVERY``-th). Peak memory in MB:
    the CUDA allocator's peak on CUDA, the Python heap's peak (tracemalloc) on CPU.
    """
    w = ctx.work
    batches = [w.batches[i % len(w.batches)] for i in range(steps)]
    cuda = w.device.type == "cuda"
    if cuda:
        benchlib.sync(w.device)
        torch.cuda.reset_peak_memory_stats(w.device)
        base = torch.cuda.memory_allocated(w.device)
    else:
        tracemalloc.start()
    try:
        with SyncGuard() as guard:
            clock = SyncClock(batches, guard)
            with quiet():
                c.run(ctx, clock, 1)
        if cuda:
            benchlib.sync(w.device)
            mem = (torch.cuda.max_memory_allocated(w.device) - base) / 2**20
        else:
            mem = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        if not cuda:
            tracemalloc.stop()
    marks = clock.marks[:steps]
    per_step = [marks[i + 1] - marks[i] for i in range(len(marks) - 1)]
    logging_steps = {i for i in range(len(per_step)) if (i + 1) % LOG_EVERY == 0}
    nonlog = sum(n for i, n in enumerate(per_step) if i not in logging_steps)
    ops: dict[str, int] = {}
    for e in guard.events:
        ops[e.op] = ops.get(e.op, 0) + 1
    syncs = {"total": guard.count, "steps": steps, "in_epoch_per_step": sum(per_step) / max(len(per_step), 1),
             "non_logging_steps": nonlog, "ops": ops, "cuda_debug_events": guard.cuda_events}
    return {"syncs": syncs, "peak_mem_mb": mem}


def bench_workload(w: Workload, contenders: list[Contender], root: Path, stack: benchlib.FullStack,
                   quick: bool) -> dict[str, Any]:
    """Time, count syncs and measure memory of every contender on one workload.

    Per-step figures are medians over rounds with their spread (min..max across
    rounds); overheads over raw are paired by round."""
    ctx = Ctx(w, root, stack)
    usable = []
    skipped = {}
    for c in contenders:
        if w.contenders is not None and c.name not in w.contenders:
            continue
        why = _available(c.needs)
        if why is None and c.run is hookloop_full and not stack.chosen:
            why = "no bundled plugin usable: " + "; ".join(f"{k}: {v[:40]}" for k, v in stack.missing.items())
        if why is None:
            usable.append(c)
        else:
            skipped[c.name] = why
    out: dict[str, Any] = {"name": w.name, "note": w.note, "steps_per_epoch": len(w.batches),
                           "epochs": w.epochs, "rounds": w.rounds, "batch_shape": list(w.batches[0][0].shape),
                           "rows": [], "skipped": skipped}
    if w.compiled is not None:
        # compile (forward and backward) once, outside every timed run
        t0 = time.perf_counter()
        try:
            with quiet():
                raw(ctx, w.batches[:2], 1)
            benchlib.sync(w.device)
        except Exception as exc:
            out["error"] = f"compiling failed: {type(exc).__name__}: {str(exc)[:300]}"
            log(f"  {w.name}: {out['error']}")
            return out
        out["compile_s"] = time.perf_counter() - t0
        log(f"  {w.name}: compiled in {out['compile_s']:.1f} s")
    per_round: dict[str, list[float | None]] = {c.name: [] for c in usable}
    walls: dict[str, list[float | None]] = {c.name: [] for c in usable}
    all_samples: dict[str, list[float]] = {c.name: [] for c in usable}
    errors: dict[str, str] = {}
    steps = len(w.batches)
    rounds_run = 0
    round_s = 0.0
    for r in range(w.rounds):
        if r > 0 and benchlib.out_of_time(1.5 * round_s):
            log(f"  {w.name}: time budget: stopping after {r} of {w.rounds} rounds")
            break
        t_round = time.perf_counter()
        order = usable[r % len(usable):] + usable[: r % len(usable)]  # rotate: no fixed position
        for c in order:
            if c.name in errors:
                per_round[c.name].append(None)
                walls[c.name].append(None)
                continue
            clock = FetchClock(w.batches, w.device)
            t0 = time.perf_counter()
            try:
                with quiet():
                    c.run(ctx, clock, w.epochs)
            except Exception as exc:
                errors[c.name] = f"{type(exc).__name__}: {exc}"
                log(f"  {w.name}/{c.name} failed: {errors[c.name]}")
                per_round[c.name].append(None)
                walls[c.name].append(None)
                continue
            benchlib.sync(w.device)
            walls[c.name].append(1e6 * (time.perf_counter() - t0) / (steps * w.epochs))
            timed = [t * 1e6 for t in clock.take()[1:]]
            all_samples[c.name] += timed
            per_round[c.name].append(statistics.median(timed) if timed else None)
        rounds_run += 1
        round_s = time.perf_counter() - t_round
        log(f"  {w.name}: round {r + 1}/{w.rounds} done ({round_s:.1f} s)")
    out["rounds_run"] = rounds_run
    sync_steps = 2 * LOG_EVERY + 1 if not quick else 4
    raw_rounds = per_round.get("raw", [])
    raw_mem = None
    for c in usable:
        if c.name in errors:
            out["rows"].append({"contender": c.name, "error": errors[c.name], "note": c.note})
            continue
        diffs = [None if a is None or b is None else a - b for a, b in zip(per_round[c.name], raw_rounds)]
        pcts = [None if d is None or not b else 100.0 * d / b for d, b in zip(diffs, raw_rounds)]
        syncs: dict[str, Any] = {}
        mem = None
        if benchlib.out_of_time(10.0):
            syncs = {"error": "not run: time budget"}
        else:
            try:
                inst = instrumented(c, ctx, sync_steps)
                syncs, mem = inst["syncs"], inst["peak_mem_mb"]
            except Exception as exc:
                syncs, mem = {"error": f"{type(exc).__name__}: {exc}"}, None
                log(f"  {w.name}/{c.name} instrumented run failed: {syncs['error']}")
        if c.name == "raw":
            raw_mem = mem
        over = benchlib.over_rounds(diffs) if raw_rounds else benchlib.over_rounds([])
        pct = benchlib.over_rounds(pcts) if raw_rounds else benchlib.over_rounds([])
        row = {
            "contender": c.name, "note": c.note, "us_per_step": benchlib.over_rounds(per_round[c.name]),
            "us_per_step_all": summarize(all_samples[c.name], 1.0),
            "overhead_us": over["median"], "overhead_us_rounds": over,
            "overhead_pct": pct["median"], "overhead_pct_rounds": pct,
            "fit_wall_us_per_step": benchlib.over_rounds(walls[c.name]),
            "syncs": syncs, "peak_mem_mb": mem,
        }
        out["rows"].append(row)
    for row in out["rows"]:
        if row.get("peak_mem_mb") is not None and raw_mem is not None:
            row["peak_mem_diff_mb"] = row["peak_mem_mb"] - raw_mem
    return out


def paired_pct(work: dict[str, Any], who: str, base: str) -> dict[str, Any]:
    """``who`` over ``base`` in % of ``base``'s step, paired by round (median, spread)."""
    rows = {r["contender"]: r for r in work["rows"] if "error" not in r}
    if who not in rows or base not in rows:
        return benchlib.over_rounds([])
    a, b = rows[who]["us_per_step"]["rounds"], rows[base]["us_per_step"]["rounds"]
    return benchlib.over_rounds([None if x is None or y is None or y == 0 else 100.0 * (x - y) / y
                                 for x, y in zip(a, b)])


def workload_targets(result: dict[str, Any], device: torch.device) -> list[Target]:
    """The suite's targets that come from the workloads (median over rounds, spread)."""
    out = []
    works = {w["name"]: w for w in result["workloads"]}
    by = {name: {r["contender"]: r for r in w["rows"]} for name, w in works.items()}
    missing = result["stack"]["missing"]
    note = ("missing: " + ", ".join(sorted(missing))) if missing else "all bundled plugins"
    tfr = benchlib.target_from_rounds

    def rounds(work: str, who: str, key: str) -> dict[str, Any] | None:
        return by.get(work, {}).get(who, {}).get(key)

    if "noop" in by:
        out.append(tfr("noop overhead, hookloop no plugins", rounds("noop", "hookloop", "overhead_us_rounds"),
                       1.0, "us/step"))
        out.append(tfr("noop overhead, hookloop full stack",
                       rounds("noop", "hookloop full stack", "overhead_us_rounds"), 2.0, "us/step", note))
    cuda_note = f"CUDA only; not measured on {device.type}"
    for work, label in (("cnn", "small CNN"), ("cnn_compiled", "small CNN, torch.compile")):
        name = f"CUDA, {label}, full stack over hookloop no plugins"
        if device.type != "cuda":
            if work == "cnn":
                out.append(Target(name, None, 1.0, "% of step", cuda_note))
            continue
        if work in works:
            out.append(tfr(name, paired_pct(works[work], "hookloop full stack", "hookloop"), 1.0, "% of step",
                           note))
        else:
            why = result.get("skipped_workloads", {}).get(work, "")
            out.append(Target(name, None, 1.0, "% of step", why))
    for work in by:
        syncs = by[work].get("hookloop full stack", {}).get("syncs") or {}
        out.append(Target(f"{work}: syncs on non-logging steps, full stack", syncs.get("non_logging_steps"),
                          0, "syncs", note))
    return out


def run(device: torch.device, quick: bool, root: Path, stack: benchlib.FullStack | None = None,
        only: list[str] | None = None) -> dict[str, Any]:
    """Every workload; returns the JSON-ready result with its targets."""
    quiet_lightning()
    works, skipped = make_workloads(device, quick, only)
    if stack is None:
        stack = _resolve(device, root)
    out: dict[str, Any] = {"stack": stack.as_dict(), "workloads": [], "skipped_workloads": skipped}
    for w in works:
        if w.compiled is not None and benchlib.out_of_time(90.0):
            skipped[w.name] = "not run: time budget (compiling needs about a minute)"
            log(f"workloads: {w.name} skipped: time budget")
            continue
        if benchlib.out_of_time(5.0):
            skipped[w.name] = "not run: time budget"
            continue
        log(f"workloads: {w.name} ({len(w.batches)} steps x {w.epochs} epochs x {w.rounds} rounds)")
        out["workloads"].append(bench_workload(w, CONTENDERS, root, stack, quick))
    out["targets"] = [t.as_dict() for t in workload_targets(out, device)]
    return out


def quiet_lightning() -> None:
    """Import Lightning if installed (it configures its loggers on import), then quiet
    its loggers."""
    if _available("lightning") is None:
        import lightning  # noqa: F401
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _resolve(device: torch.device, root: Path) -> benchlib.FullStack:
    log("workloads: resolving the full bundled stack")
    w = make_workloads(device, True, ["noop"])[0][0]

    def probe(plugins: list[Any]) -> None:
        with quiet():
            benchlib.hookloop_loop(w.model(), w.batches[:4], plugins=plugins, step_fn=benchlib.noop_step,
                                   val_data=w.val).fit(max_epochs=1)

    return benchlib.resolve_full_stack(root, probe)


def report(result: dict[str, Any]) -> str:
    """The printed table of this script, targets last."""
    lines = []
    for w in result["workloads"]:
        ran = w.get("rounds_run", w["rounds"])
        lines.append(f"workload {w['name']}{' (' + w['note'] + ')' if w.get('note') else ''}: batch "
                     f"{w['batch_shape']}, {w['steps_per_epoch']} steps/epoch, median over {ran} rounds"
                     + (f" (of {w['rounds']} planned; time budget)" if ran < w["rounds"] else "")
                     + f" of {w['epochs'] - 1} timed epochs each, [min..max] across rounds"
                     + (f"; compiled in {w['compile_s']:.1f} s" if "compile_s" in w else ""))
        if w.get("error"):
            lines.append(f"  failed: {w['error']}")
        rows = []
        for r in w["rows"]:
            if "error" in r:
                rows.append([r["contender"], "failed: " + r["error"][:60]] + [None] * 8)
                continue
            s = r["us_per_step"]
            sy = r["syncs"]
            rows.append([r["contender"], s["median"], benchlib.rng(s), r["overhead_us"],
                         benchlib.rng(r["overhead_us_rounds"]), r["overhead_pct"],
                         benchlib.rng(r["overhead_pct_rounds"]),
                         r["fit_wall_us_per_step"]["median"], sy.get("non_logging_steps", sy.get("error")),
                         r.get("peak_mem_diff_mb")])
        for name, why in w["skipped"].items():
            rows.append([name, "skipped: " + why[:60]] + [None] * 8)
        lines.append(format_table(rows, ["contender", "us/step", "[min..max]", "over raw us", "[min..max]",
                                         "over raw %", "[min..max]", "fit wall us/step", "non-log syncs",
                                         "peak mem +MB"]))
        lines.append("")
    for name, why in result.get("skipped_workloads", {}).items():
        lines.append(f"workload {name}: NOT RUN: {why}")
    if result["stack"]["missing"]:
        lines.append("full stack: missing " + "; ".join(f"{k} ({v[:100]})"
                                                         for k, v in result["stack"]["missing"].items()))
    return benchlib.report_text(lines, result["targets"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, help="workload names")
    parser.add_argument("--out", type=Path, help="folder for workloads.json and plots")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = args.out.resolve() if args.out else None
    with benchlib.sandbox() as root:
        result = run(device, args.quick, root, only=args.only)
    result["machine"] = benchlib.machine_info(device)
    result["quick"] = args.quick
    if out is not None:
        benchlib.write_json(out / "workloads.json", result)
        import plots

        plots.plot_workloads(result, out)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
