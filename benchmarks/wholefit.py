"""What users feel in short runs: the wall time of a whole 2,000-step fit of the tiny
MLP, start-up and close included.

Contenders, interleaved over rounds (order rotating): the raw loop; hookloop with no
plugins; hookloop with the full bundled stack (no waiting for the trackers); Ignite
with comparable handlers (ModelCheckpoint, EarlyStopping, ProgressBar, the TensorBoard,
MLflow and W&B loggers that are installed, every 50 iterations); Lightning with
comparable handlers (its checkpointing, progress bar and model summary, EarlyStopping,
the TensorBoard, MLflow and W&B loggers that are installed, ``self.log`` each step,
``log_every_n_steps=50``). Each timing runs from before the model, optimizer and
loop/engine/trainer are built to after the fit returned and the loop or loggers were
closed. Modules are already imported (every contender ran before in the same
process); what importing costs is measured apart, once per round in a fresh process
that has imported torch already ("import s").

Run alone: ``python benchmarks/wholefit.py [--device cpu|cuda] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import TRACKERS, format_table, log
from torch.nn import functional as F

STEPS = {False: 2000, True: 20}
ROUNDS = {("cpu", False): 5, ("cuda", False): 3, ("cpu", True): 1, ("cuda", True): 1}
PLUGIN_MODULES = {"checkpoint": "hookloop_checkpoint", "early_stopping": "hookloop_earlystopping",
                  "freeze": "hookloop_freeze", "summary": "hookloop_summary",
                  "tensorboard": "hookloop_tensorboard", "mlflow": "hookloop_mlflow",
                  "wandb": "hookloop_wandb", "progress": "hookloop_progress"}
SDKS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _sdks() -> list[str]:
    """The tracker SDKs installed (import names)."""
    return [m for n, m in SDKS.items() if importlib.util.find_spec(m.split(".")[0]) is not None
            and (n != "tensorboard" or importlib.util.find_spec("tensorboard") is not None)]


class _Batches:
    """The batch list as one iterable: Lightning reads a plain list as a list of loaders."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_comparable(ctx: Any, data: Any, epochs: int) -> None:
    """Lightning with handlers comparable to the full stack (see the module docstring)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    w = ctx.work

    class Lit(L.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = w.loss(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return w.optimizer(self.model)

    folder = benchlib.fresh_dir(ctx.root, "lightning-full")
    loggers: list[Any] = []
    sdks = _sdks()
    if "torch.utils.tensorboard" in sdks:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(folder / "tb")))
    if "mlflow" in sdks:
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(tracking_uri=f"sqlite:///{folder}/mlflow.db"))
    if "wandb" in sdks:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(offline=True, save_dir=str(folder), project="hookloop-bench"))
    trainer = L.Trainer(max_epochs=epochs, accelerator=w.device.type, devices=1, default_root_dir=str(folder),
                        num_sanity_val_steps=0, log_every_n_steps=benchlib.LOG_EVERY, logger=loggers or False,
                        callbacks=[ModelCheckpoint(dirpath=str(folder / "ckpt")),
                                   EarlyStopping("train/loss", patience=10**6,
                                                 check_on_train_epoch_end=True)])
    trainer.fit(Lit(w.model()), train_dataloaders=_Batches(data))
    if "wandb" in sdks:
        import wandb

        wandb.finish()


def _contenders() -> list[tuple[str, Callable[..., None], str | None, str]]:
    import workloads as wl

    def hookloop_closed(plugins: Callable[[Any], list[Any]]) -> Callable[..., None]:
        def run(ctx: Any, data: Any, epochs: int) -> None:
            w = ctx.work
            loop = benchlib.hookloop_loop(w.model(), data, plugins=plugins(ctx), loss_fn=w.loss,
                                          val_data=w.val)
            try:
                loop.fit(max_epochs=epochs)
            finally:
                loop.close()

        return run

    return [
        ("raw", wl.raw, None, ""),
        ("hookloop", hookloop_closed(lambda ctx: []), None, ""),
        ("hookloop full stack", hookloop_closed(lambda ctx: ctx.stack.plugins(ctx.root)), None,
         "no waiting for the trackers"),
        ("ignite, comparable handlers", wl.ignite_full, "ignite", "trackers that are installed"),
        ("lightning, comparable handlers", lightning_comparable, "lightning", "trackers that are installed"),
    ]


def _import_stmt(name: str, stack: benchlib.FullStack) -> str | None:
    sdks = _sdks()
    if name == "raw":
        return None
    if name == "hookloop":
        return "import hookloop.loop"
    if name == "hookloop full stack":
        mods = ["hookloop.loop", *(PLUGIN_MODULES[n] for n in stack.chosen if n in PLUGIN_MODULES),
                *(SDKS[n] for n in stack.chosen if n in TRACKERS)]
        return "; ".join(f"import {m}" for m in mods)
    if name.startswith("ignite"):
        return "; ".join(f"import {m}" for m in ("ignite.engine", "ignite.handlers", *sdks))
    return "; ".join(f"import {m}" for m in ("lightning", *sdks))


def import_seconds(stmt: str) -> float | None:
    """Seconds ``stmt`` takes in a fresh process that imported torch first."""
    code = f"import time, torch; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return float(proc.stdout.strip().splitlines()[-1])
    except Exception:
        return None


def run(device: torch.device, quick: bool, root: Path, stack: benchlib.FullStack | None = None
        ) -> dict[str, Any]:
    """Every contender over rounds; returns the JSON-ready result (no target: reported)."""
    import workloads as wl

    wl.quiet_lightning()
    steps = STEPS[quick]
    rounds = ROUNDS[(device.type if device.type == "cuda" else "cpu", quick)]
    stack = stack or benchlib.FullStack()
    batches = wl._batches(steps, (32, 32), 0, device)
    torch.manual_seed(0)
    work = wl.Workload("mlp", wl.tiny_mlp().to(device), batches, False, 1, rounds, device, val=batches[:1],
                       loss=F.mse_loss)
    ctx = wl.Ctx(work, root, stack)
    usable, skipped = [], {}
    for name, fn, needs, note in _contenders():
        why = wl._available(needs)
        if why is None and name == "hookloop full stack" and not stack.chosen:
            why = "no bundled plugin usable"
        if why is None:
            usable.append((name, fn, note))
        else:
            skipped[name] = why
    walls: dict[str, list[float | None]] = {n: [] for n, _, _ in usable}
    imports: dict[str, list[float | None]] = {n: [] for n, _, _ in usable}
    errors: dict[str, str] = {}
    log(f"wholefit: {steps} steps, {rounds} rounds, {len(usable)} contenders")
    round_s = 0.0
    rounds_run = 0
    for r in range(rounds):
        if benchlib.out_of_time(1.5 * round_s + 5):
            log(f"wholefit: time budget: stopping after {r} of {rounds} rounds")
            break
        t_round = time.perf_counter()
        for name, fn, _ in usable[r % len(usable):] + usable[: r % len(usable)]:
            if name in errors:
                continue
            benchlib.sync(device)
            t0 = time.perf_counter()
            try:
                with wl.quiet():
                    fn(ctx, batches, 1)
                benchlib.sync(device)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                log(f"wholefit: {name} failed: {errors[name]}\n{traceback.format_exc(limit=-4)}")
                continue
            walls[name].append(time.perf_counter() - t0)
            stmt = _import_stmt(name, stack)
            if quick and name != "hookloop":
                stmt = None  # quick runs rehearse the import timing once only
            imports[name].append(None if stmt is None else import_seconds(stmt))
        rounds_run += 1
        round_s = time.perf_counter() - t_round
        log(f"wholefit: round {r + 1}/{rounds} done ({round_s:.1f} s)")
    rows = []
    raw = walls.get("raw", [])
    for name, _, note in usable:
        if name in errors:
            rows.append({"contender": name, "error": errors[name], "note": note})
            continue
        over = [a / b for a, b in zip(walls[name], raw) if a is not None and b]
        rows.append({"contender": name, "note": note, "wall_s": benchlib.over_rounds(walls[name]),
                     "over_raw_x": benchlib.over_rounds(over),
                     "import_s": benchlib.over_rounds(imports[name]) if any(imports[name]) else None})
    return {"steps": steps, "rounds": rounds, "rounds_run": rounds_run, "rows": rows, "skipped": skipped,
            "stack": stack.as_dict(), "targets": []}


def report(result: dict[str, Any]) -> str:
    """The printed table of this script."""
    lines = [f"whole fit of {result['steps']} steps, tiny MLP, start-up and close included (modules "
             f"imported); median [min..max] over {result['rounds_run']} rounds; import s: fresh process "
             "after torch"]
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["contender"], "failed: " + r["error"][:60], None, None, None, None])
            continue
        imp = r.get("import_s") or {}
        rows.append([r["contender"], r["wall_s"]["median"], benchlib.rng(r["wall_s"]),
                     r["over_raw_x"]["median"], imp.get("median"), benchlib.rng(imp)])
    for name, why in result["skipped"].items():
        rows.append([name, "skipped: " + why[:60], None, None, None, None])
    lines.append(format_table(rows, ["contender", "wall s", "[min..max]", "x raw", "import s", "[min..max]"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    return benchlib.plugin_script_main(argv, __doc__ or "", "wholefit.json", run, report)


if __name__ == "__main__":
    raise SystemExit(main())
