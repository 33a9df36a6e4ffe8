"""``hookloop demo``: transfer learning on scikit-learn's bundled digits, end to end.

This distribution adds the ``demo`` subcommand to the ``hookloop`` command through the
``hookloop.commands`` entry-point group; ``python -m hookloop_demo`` runs it too.

The demo tells one story with every bundled plugin, on 1,797 real 8x8 handwritten digits
that ship with scikit-learn (nothing is downloaded), in about a minute on a laptop CPU:

1. **Pretrain** a small CNN on digits 0-4: checkpoints (best 2 by validation accuracy,
   plus the last), early stopping, the model summary at the start, the progress bar,
   and the trackers (TensorBoard, MLflow in an embedded SQLite store, W&B offline).
2. **Transfer** to digits 5-9 with only a few labelled examples per class: a new model
   with a fresh head gets the backbone of the best pretraining checkpoint through the
   checkpoint plugin's :func:`hookloop_checkpoint.load`; the backbone is frozen, the
   head trains alone, then :class:`hookloop_freeze.GradualUnfreeze` unfreezes the
   backbone block by block, each with a ten times lower learning rate.
3. **Resume**: the transfer run is interrupted partway. The :class:`Interrupt` plugin
   below sends the process a real ``SIGINT`` at a chosen optimizer step, exactly what
   Ctrl-C does. The checkpoint plugin, listening for ``SIGINT``, saves at that step
   boundary and stops the fit cleanly (no half-done step). A new loop, built as a new
   process would build it, resumes from the last checkpoint and continues at that step.
4. **Report**: held-out accuracy of each stage, the transfer model against the same
   model trained from scratch on the same data for the same number of epochs, where
   the checkpoints and logs are, and the commands to look at them.

Everything is composed in code from plugin objects, the way a user script would do it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hookloop.cli import positive_int
from hookloop.loop import Loop
from hookloop.plugins import hookimpl

__all__ = [
    "DemoOptions",
    "DemoResult",
    "DigitNet",
    "Interrupt",
    "StepProbe",
    "TRACKERS",
    "main",
    "parse_args",
    "run",
]

TRACKERS = ("tensorboard", "mlflow", "wandb")
"""The trackers the demo can log to (``--trackers``)."""

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)
BATCH_SIZE = 16
PRETRAIN_LR = 3e-3
TRANSFER_LR = 1e-2
"""Learning rate of the new head, and of every parameter of the from-scratch baseline;
the backbone blocks get a tenth of it when they are unfrozen."""


# ---------------------------------------------------------------------- options


@dataclass
class DemoOptions:
    """What ``hookloop demo`` runs; see ``hookloop demo --help``.

    :ivar run_dir: parent folder; each demo run writes a new ``run-<time>`` folder in it.
    :ivar epochs: maximum pretraining epochs (early stopping may end sooner).
    :ivar transfer_epochs: epochs of the transfer run and of the from-scratch baseline.
    :ivar shots: labelled training examples per class of digits 5-9.
    :ivar interrupt_at: optimizer step of the transfer run at which it is interrupted
        (default: in the middle of the run, mid-epoch).
    :ivar trackers: tracker names to log to (a subset of :data:`TRACKERS`).
    :ivar seed: seed of the data split, the model initialisations and the shuffling.
    :ivar quiet: hide the model summary and the per-epoch progress lines.
    """

    run_dir: Path = Path("demo_runs")
    epochs: int = 15
    transfer_epochs: int = 8
    shots: int = 10
    interrupt_at: int | None = None
    trackers: tuple[str, ...] = TRACKERS
    seed: int = 0
    quiet: bool = False


@dataclass
class StageResult:
    """The outcome of one training run of the demo.

    :ivar name: ``pretrain``, ``transfer`` or ``scratch``.
    :ivar test_acc: accuracy on the stage's held-out test digits.
    :ivar epochs: epochs completed.
    :ivar steps: optimizer steps done.
    :ivar stop_reason: why the (last) fit of the stage ended.
    :ivar checkpoint_dir: where the stage's checkpoints are (``None`` for ``scratch``).
    """

    name: str
    test_acc: float
    epochs: int
    steps: int
    stop_reason: str | None
    checkpoint_dir: Path | None = None


@dataclass
class DemoResult:
    """Everything the demo did, for the report and for tests.

    :ivar root: the run folder of this demo run.
    :ivar stages: the results by stage name (``pretrain``, ``transfer``, ``scratch``).
    :ivar best_checkpoint: the pretraining checkpoint the backbone was loaded from.
    :ivar interrupted_at: global step at which the transfer run was interrupted.
    :ivar saved_at: global step of the checkpoint written at the interruption.
    :ivar resumed_at: global step of the first batch trained after resuming.
    :ivar resumed_epoch: epoch of that batch (zero-based).
    :ivar resumed_batch: index of that batch within its epoch.
    :ivar trackers: the trackers used.
    :ivar tracker_dirs: tracker name to the folder (or file) it wrote.
    :ivar wandb_runs: the W&B offline run folders written.
    :ivar seconds: wall-clock duration of the demo.
    """

    root: Path
    stages: dict[str, StageResult] = field(default_factory=dict)
    best_checkpoint: Path | None = None
    interrupted_at: int | None = None
    saved_at: int | None = None
    resumed_at: int | None = None
    resumed_epoch: int | None = None
    resumed_batch: int | None = None
    trackers: tuple[str, ...] = ()
    tracker_dirs: dict[str, Path] = field(default_factory=dict)
    wandb_runs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------- data


Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DigitSplits:
    """Train, validation and held-out test tensors of one group of digit classes;
    labels are renumbered ``0..len(classes)-1``."""

    train: Split
    val: Split
    test: Split


def _load_digits() -> Split:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - a dependency of this distribution
        raise SystemExit("the demo needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def split_digits(
    x: torch.Tensor, y: torch.Tensor, classes: Sequence[int], *, seed: int,
    train_per_class: int | None = None, val_frac: float = 0.2, test_frac: float = 0.3,
) -> DigitSplits:
    """Split the examples of ``classes`` per class into test, validation and training
    parts (stratified, seeded). ``train_per_class`` keeps only that many training
    examples per class (few-shot); the test part never changes with it."""
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in classes:
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        n_test, n_val = round(test_frac * len(idx)), round(val_frac * len(idx))
        parts["test"] += idx[:n_test]
        parts["val"] += idx[n_test:n_test + n_val]
        train = idx[n_test + n_val:]
        parts["train"] += train if train_per_class is None else train[:train_per_class]
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    out = {}
    for name, idx in parts.items():
        order = torch.tensor(sorted(idx))
        out[name] = (x[order], remap[y[order]])
    return DigitSplits(out["train"], out["val"], out["test"])


def _loader(split: Split, *, shuffle: bool, seed: int) -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*split), batch_size=BATCH_SIZE if shuffle else 256,
                      shuffle=shuffle, generator=gen)


# ---------------------------------------------------------------------- model


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())


class DigitNet(nn.Module):
    """A small CNN for 8x8 digits: ``backbone`` (three conv blocks, ``block1`` nearest
    the input, ending in 64 channels pooled to 2x2) and a linear ``head`` with
    ``num_classes`` outputs."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module("block1", _block(1, 32))
        self.backbone.add_module("block2", nn.Sequential(_block(32, 64), nn.MaxPool2d(2)))
        self.backbone.add_module("block3", nn.Sequential(_block(64, 64), nn.AdaptiveAvgPool2d(2),
                                                         nn.Flatten()))
        self.head = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch ``(N, 1, 8, 8)``."""
        return self.head(self.backbone(x))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of correct arg-max predictions (a validation metric of the loop)."""
    return (output.argmax(1) == target).float().mean()


@torch.no_grad()
def test_accuracy(model: nn.Module, split: Split) -> float:
    """Accuracy of ``model`` on a held-out split, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return float(accuracy(model(split[0]), split[1]))
    finally:
        model.train(was_training)


def _epochs_done(state: Any) -> int:
    """Epochs completed by a finished fit (``state.epoch`` already counts the next one
    after ``max_epochs``, not after a requested stop)."""
    return int(state.epoch) + (1 if state.epoch_done else 0)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- demo plugins


class Interrupt:
    """Interrupt a fit at optimizer step ``at_step`` as Ctrl-C would: send the process
    a real ``SIGINT``.

    With ``Checkpoint(signals=["SIGINT"], exit_on_signal=False)`` the checkpoint plugin
    catches it, saves at this step boundary and stops the fit; list this plugin
    *before* the checkpoint plugin so that the save happens at ``at_step`` itself.
    Signal handlers exist only in the main thread: elsewhere the plugin falls back to
    ``loop.request_stop``, and the checkpoint plugin's final save (``save_last``)
    writes the same step.
    """

    hookloop_name = "interrupt"

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.fired_at: int | None = None

    @hookimpl
    def on_train_batch_end(self, loop: Loop) -> None:
        """Send ``SIGINT`` once the fit reaches ``at_step`` optimizer steps."""
        if self.fired_at is None and loop.state.stepped and loop.state.global_step >= self.at_step:
            self.fired_at = loop.state.global_step
            if threading.current_thread() is threading.main_thread():
                signal.raise_signal(signal.SIGINT)
            else:
                loop.request_stop(f"interrupted at step {self.fired_at}")


class StepProbe:
    """Record where a fit starts training: the epoch, batch index and global step of
    its first batch (after a resume: the first batch after the restored state)."""

    hookloop_name = "step_probe"

    def __init__(self) -> None:
        self.first: tuple[int, int, int] | None = None

    @hookimpl
    def on_fit_start(self) -> None:
        """Forget the previous fit's first batch."""
        self.first = None

    @hookimpl
    def on_train_batch_start(self, loop: Loop, batch_idx: int) -> None:
        """Remember the first batch of this fit."""
        if self.first is None:
            self.first = (loop.state.epoch, batch_idx, loop.state.global_step)


class Visuals:
    """What the trackers show beside the scalars: the model graph and a grid of
    validation digits at fit start, and histograms of every weight at each epoch end
    (TensorBoard's Graphs, Images, Histograms and Distributions; W&B and MLflow record
    the images and histograms). The calls cost nothing when no tracker listens."""

    hookloop_name = "visuals"

    def __init__(self, examples: torch.Tensor) -> None:
        self.examples = examples[:16]

    @hookimpl
    def on_fit_start(self, loop: Loop) -> None:
        """Log the graph (traced once with a few examples) and an image grid of them."""
        loop.log_graph(self.examples)
        rows = [torch.cat(list(self.examples[i:i + 4, 0]), dim=1) for i in range(0, 16, 4)]
        loop.log_image("samples/validation", torch.cat(rows, dim=0).unsqueeze(0).clamp(0, 1))

    @hookimpl
    def on_train_epoch_end(self, loop: Loop) -> None:
        """Log a histogram of every weight."""
        for name, param in loop.module.named_parameters():
            loop.log_histogram(f"weights/{name}", param)


# ---------------------------------------------------------------------- trackers


@contextlib.contextmanager
def _demo_env() -> Iterator[None]:
    """For the duration of the demo: W&B offline and quiet (nothing reaches the
    network), MLflow's logging at WARNING, and one torch thread (the model is far too
    small to gain from intra-op threads, which only contend for the cores). The previous
    environment and thread count are restored afterwards."""
    wanted = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
              "WANDB_DISABLE_CODE": "true", "GIT_PYTHON_REFRESH": "quiet",
              "MLFLOW_LOGGING_LEVEL": "WARNING"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def available_trackers(wanted: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """The trackers of ``wanted`` whose plugin and SDK are installed, and a note for
    each one that is not."""
    needs = {"tensorboard": ("hookloop_tensorboard", "tensorboard"),
             "mlflow": ("hookloop_mlflow", "mlflow"), "wandb": ("hookloop_wandb", "wandb")}
    found, notes = [], []
    for name in wanted:
        missing = [m for m in needs[name] if importlib.util.find_spec(m) is None]
        if missing:
            notes.append(f"{name}: skipped ({', '.join(missing)} not installed; "
                         f"pip install -e plugins/hookloop-{name})")
        else:
            found.append(name)
    return tuple(found), notes


def make_trackers(trackers: Sequence[str], root: Path, stage: str) -> list[Any]:
    """Tracker plugin objects for one stage: TensorBoard events in
    ``root/tensorboard/<stage>``, an MLflow run in ``root/mlflow/mlflow.db``, a W&B
    offline run in ``root/wandb``. The best checkpoint of each stage is also stored as
    an artifact in MLflow (``root/mlflow/artifacts``) and in the W&B run."""
    plugins: list[Any] = []
    if "tensorboard" in trackers:
        from hookloop_tensorboard import TensorBoard

        plugins.append(TensorBoard(root / "tensorboard" / stage))
    if "mlflow" in trackers:
        from hookloop_mlflow import MLflow

        plugins.append(MLflow(f"sqlite:///{(root / 'mlflow' / 'mlflow.db').as_posix()}",
                              experiment="hookloop-demo", run_name=stage,
                              save_dir=root / "mlflow"))
    if "wandb" in trackers:
        from hookloop_wandb import WandB

        plugins.append(WandB(project="hookloop-demo", name=stage, mode="offline", dir=root,
                             settings={"console": "off", "silent": True}))
    return plugins


# ---------------------------------------------------------------------- stages


def _progress(quiet: bool) -> list[Any]:
    if quiet:
        return []
    from hookloop_progress import Progress

    return [Progress(mode="lines", metrics=["train/loss_epoch", "val/loss", "val/acc"])]


def _summary(quiet: bool) -> list[Any]:
    if quiet:
        return []
    from hookloop_summary import Summary

    return [Summary(input_size=(1, 1, 8, 8), depth=2)]


def _header(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 74 - len(text)), flush=True)


def pretrain(opts: DemoOptions, data: DigitSplits, root: Path, trackers: Sequence[str]) -> StageResult:
    """Stage 1: train ``DigitNet`` on digits 0-4 with checkpoints, early stopping, the
    summary, the progress bar and the trackers."""
    from hookloop_checkpoint import Checkpoint
    from hookloop_earlystopping import EarlyStopping

    _seed_everything(opts.seed)
    model = DigitNet(len(PRETRAIN_CLASSES))
    ckpt_dir = root / "pretrain" / "checkpoints"
    checkpoint = Checkpoint(ckpt_dir, monitor="val/acc", mode="max", top_k=2, save_last=True,
                            filename="epoch{epoch:02d}-step{step}-acc{val/acc:.4f}", verbose=False)
    stopper = EarlyStopping("val/acc", mode="max", patience=3, restore_best_weights=True)
    loop = Loop(
        model, torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR),
        _loader(data.train, shuffle=True, seed=opts.seed),
        val_data=_loader(data.val, shuffle=False, seed=opts.seed),
        loss_fn=nn.functional.cross_entropy, val_metrics={"acc": accuracy},
        log_every_n_steps=10, hparams={"stage": "pretrain", "classes": "0-4"},
        plugins=[*_summary(opts.quiet), checkpoint, stopper, *_progress(opts.quiet),
                 Visuals(data.val[0]), *make_trackers(trackers, root, "pretrain")],
    )
    state = loop.fit(max_epochs=opts.epochs)
    return StageResult("pretrain", test_accuracy(model, data.test), _epochs_done(state),
                       state.global_step, state.stop_reason, ckpt_dir)


def _transfer_loop(opts: DemoOptions, model: DigitNet, data: DigitSplits, root: Path,
                   trackers: Sequence[str], extra: Sequence[Any], *, resume: bool = False) -> Loop:
    """The loop of the transfer run: the optimizer holds the head only; the
    GradualUnfreeze plugin freezes the backbone and adds its blocks to the optimizer,
    nearest the head first, one per epoch from epoch 2, at a tenth of the head's LR."""
    from hookloop_checkpoint import Checkpoint
    from hookloop_freeze import GradualUnfreeze

    unfreeze = GradualUnfreeze(["backbone.block3", "backbone.block2", "backbone.block1"],
                               start_epoch=2, every_n_epochs=1, lr_scale=0.1)
    checkpoint = Checkpoint(root / "transfer" / "checkpoints", monitor="val/acc", mode="max", top_k=2,
                            filename="epoch{epoch:02d}-step{step}-acc{val/acc:.4f}",
                            resume="latest" if resume else None,
                            signals=["SIGINT", "SIGTERM"], exit_on_signal=False, verbose=False)
    return Loop(
        model, torch.optim.Adam(model.head.parameters(), lr=TRANSFER_LR),
        _loader(data.train, shuffle=True, seed=opts.seed + 1),
        val_data=_loader(data.val, shuffle=False, seed=opts.seed),
        loss_fn=nn.functional.cross_entropy, val_metrics={"acc": accuracy},
        log_every_n_steps=5, hparams={"stage": "transfer", "classes": "5-9", "shots": opts.shots},
        # plugins listed first are called first: Interrupt before Checkpoint
        plugins=[*extra, unfreeze, checkpoint, *_progress(opts.quiet),
                 *make_trackers(trackers, root, "transfer")],
    )


def transfer_and_resume(opts: DemoOptions, data: DigitSplits, root: Path, trackers: Sequence[str],
                        result: DemoResult) -> StageResult:
    """Stages 2 and 3: load the pretrained backbone into a new model, train with
    freezing and gradual unfreezing, get interrupted, and resume from the last
    checkpoint in a new loop."""
    from hookloop_checkpoint import best_checkpoint, load

    pre_dir = root / "pretrain" / "checkpoints"
    _seed_everything(opts.seed + 1)
    model = DigitNet(len(TRANSFER_CLASSES))
    loaded = load(pre_dir, model.backbone, which="best", prefix="backbone.")
    result.best_checkpoint = best_checkpoint(pre_dir) or Path(loaded.path)
    print(f"loaded the backbone from {_show(Path(loaded.path))} "
          f"(val/acc {loaded.metrics.get('val/acc', float('nan')):.4f}); new head for digits 5-9",
          flush=True)

    steps_per_epoch = len(_loader(data.train, shuffle=True, seed=0))
    total = steps_per_epoch * opts.transfer_epochs
    at = opts.interrupt_at
    if at is None:
        at = total // 2
        if at % steps_per_epoch == 0:
            at += steps_per_epoch // 2  # mid-epoch: the harder resume
    at = max(1, min(at, total - 1))
    interrupt = Interrupt(at)
    loop = _transfer_loop(opts, model, data, root, trackers, [*_summary(opts.quiet), interrupt])
    state = loop.fit(max_epochs=opts.transfer_epochs)
    result.interrupted_at = interrupt.fired_at
    ckpt = loop.get_plugin("checkpoint")
    last = ckpt.last_path
    from hookloop_checkpoint import load_checkpoint

    saved = load_checkpoint(root / "transfer" / "checkpoints")
    result.saved_at = int(saved["loop"]["global_step"])
    print(f"interrupted at step {interrupt.fired_at} of {total} (SIGINT, as Ctrl-C): "
          f"{state.stop_reason}; last checkpoint {_show(last) if last else '-'} "
          f"at step {result.saved_at}", flush=True)

    _header("3. resume the transfer run from its last checkpoint (a new loop, as a new process)")
    _seed_everything(12345)  # a different RNG state: the checkpoint restores the right one
    model = DigitNet(len(TRANSFER_CLASSES))
    probe = StepProbe()
    loop = _transfer_loop(opts, model, data, root, trackers, [probe], resume=True)
    state = loop.fit(max_epochs=opts.transfer_epochs)
    if probe.first is not None:
        result.resumed_epoch, result.resumed_batch, result.resumed_at = probe.first
    print(f"resumed at step {result.resumed_at} (epoch {result.resumed_epoch}, batch "
          f"{result.resumed_batch}) and trained to step {state.global_step}", flush=True)
    return StageResult("transfer", test_accuracy(model, data.test), _epochs_done(state), state.global_step,
                       state.stop_reason, root / "transfer" / "checkpoints")


def scratch(opts: DemoOptions, data: DigitSplits, root: Path, trackers: Sequence[str]) -> StageResult:
    """The baseline: the same model and data, every parameter trained from a random
    initialisation for the same number of epochs."""
    _seed_everything(opts.seed + 1)
    model = DigitNet(len(TRANSFER_CLASSES))
    loop = Loop(
        model, torch.optim.Adam(model.parameters(), lr=TRANSFER_LR),
        _loader(data.train, shuffle=True, seed=opts.seed + 1),
        val_data=_loader(data.val, shuffle=False, seed=opts.seed),
        loss_fn=nn.functional.cross_entropy, val_metrics={"acc": accuracy},
        log_every_n_steps=5, hparams={"stage": "scratch", "classes": "5-9", "shots": opts.shots},
        plugins=[*_progress(opts.quiet), *make_trackers(trackers, root, "scratch")],
    )
    state = loop.fit(max_epochs=opts.transfer_epochs)
    return StageResult("scratch", test_accuracy(model, data.test), _epochs_done(state), state.global_step,
                       state.stop_reason)


# ---------------------------------------------------------------------- report


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def report(result: DemoResult, opts: DemoOptions, data: dict[str, DigitSplits]) -> str:
    """The end-of-demo report: accuracies, the resume, where everything is, and the
    commands to look at it."""
    pre, tra, scr = (result.stages[k] for k in ("pretrain", "transfer", "scratch"))
    n_pre, n_tr = len(data["pretrain"].test[1]), len(data["transfer"].test[1])
    lines = [
        "held-out test accuracy",
        f"  1. pretrain  digits 0-4  {pre.test_acc:7.2%}  ({n_pre} test digits; {pre.epochs} epochs, "
        f"stopped: {pre.stop_reason})",
        f"  2. transfer  digits 5-9  {tra.test_acc:7.2%}  ({n_tr} test digits; {opts.shots} training "
        f"examples per class, {tra.epochs} epochs)",
        f"     scratch   digits 5-9  {scr.test_acc:7.2%}  (same model, data and epochs, no pretraining)",
        f"     transfer - scratch    {tra.test_acc - scr.test_acc:+7.2%}",
        "",
        f"resume: interrupted at step {result.interrupted_at}, checkpoint saved at step "
        f"{result.saved_at}, resumed at step {result.resumed_at} (epoch {result.resumed_epoch}, "
        f"batch {result.resumed_batch}), finished at step {tra.steps}",
        "",
        f"run folder        {_show(result.root)}",
        f"  checkpoints     {_show(pre.checkpoint_dir or result.root)}  (best: "
        f"{result.best_checkpoint.name if result.best_checkpoint else '-'})",
        f"                  {_show(tra.checkpoint_dir or result.root)}",
    ]
    commands = []
    if "tensorboard" in result.trackers:
        tb = result.tracker_dirs["tensorboard"]
        lines.append(f"  TensorBoard     {_show(tb)}  (pretrain, transfer, scratch)")
        commands.append(f"tensorboard --logdir {_show(tb)}")
    if "mlflow" in result.trackers:
        db = result.tracker_dirs["mlflow"]
        lines.append(f"  MLflow          {_show(db)}  (experiment hookloop-demo)")
        commands.append(f"mlflow ui --backend-store-uri sqlite:///{_show(db)}")
    if "wandb" in result.trackers:
        lines.append(f"  W&B (offline)   {_show(result.tracker_dirs['wandb'])}  "
                     f"({len(result.wandb_runs)} runs)")
        commands.append(f"wandb sync {_show(result.tracker_dirs['wandb'])}/offline-run-*   "
                        "# uploads them: needs a W&B account and the network")
    if commands:
        lines += ["", "look at them:", *(f"  {c}" for c in commands)]
    lines += ["", f"demo took {result.seconds:.1f} s"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- entry points


def _new_root(run_dir: Path) -> Path:
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    root = run_dir / stamp
    n = 1
    while root.exists():
        n += 1
        root = run_dir / f"{stamp}-{n}"
    root.mkdir(parents=True)
    return root


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep the output to the story: silence the INFO chatter of MLflow's database
    set-up and the warnings third-party libraries raise about themselves."""
    names = ["alembic", "mlflow", "hookloop.checkpoint", "hookloop.freeze", "hookloop.mlflow",
             "hookloop.wandb"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def run(opts: DemoOptions) -> DemoResult:
    """Run the whole demo (stages 1-4) and print the report; returns what it did."""
    start = time.perf_counter()
    trackers, notes = available_trackers(opts.trackers)
    root = _new_root(opts.run_dir)
    result = DemoResult(root=root, trackers=trackers)
    for note in notes:
        print(note)
    x, y = _load_digits()
    data = {
        "pretrain": split_digits(x, y, PRETRAIN_CLASSES, seed=opts.seed),
        "transfer": split_digits(x, y, TRANSFER_CLASSES, seed=opts.seed, train_per_class=opts.shots),
    }
    print(f"hookloop demo: {len(x)} digits from scikit-learn; run folder {_show(root)}; "
          f"trackers: {', '.join(trackers) or 'none'}")
    with _demo_env(), _quiet_libraries():
        _header(f"1. pretrain on digits 0-4 ({len(data['pretrain'].train[1])} training digits)")
        result.stages["pretrain"] = pretrain(opts, data["pretrain"], root, trackers)
        _header(f"2. transfer to digits 5-9 ({opts.shots} training digits per class), "
                "backbone frozen, then unfrozen")
        result.stages["transfer"] = transfer_and_resume(opts, data["transfer"], root, trackers, result)
        _header("baseline: the same model on digits 5-9 from scratch")
        result.stages["scratch"] = scratch(opts, data["transfer"], root, trackers)
    if "tensorboard" in trackers:
        result.tracker_dirs["tensorboard"] = root / "tensorboard"
    if "mlflow" in trackers:
        result.tracker_dirs["mlflow"] = root / "mlflow" / "mlflow.db"
    if "wandb" in trackers:
        result.tracker_dirs["wandb"] = root / "wandb"
        result.wandb_runs = sorted((root / "wandb").glob("offline-run-*"))
    result.seconds = time.perf_counter() - start
    _header("4. report")
    print(report(result, opts, data), flush=True)
    return result


def _trackers_arg(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tracker(s) {unknown}; choose from {list(TRACKERS)} "
                                         "or 'none'")
    return names


def parse_args(argv: Sequence[str] | None = None) -> DemoOptions:
    """Parse ``hookloop demo`` options into :class:`DemoOptions`."""
    d = DemoOptions()
    parser = argparse.ArgumentParser(
        prog="hookloop demo",
        description="Pretrain a small CNN on digits 0-4, transfer it to digits 5-9, interrupt "
                    "and resume the transfer run, and compare it with training from scratch.")
    parser.add_argument("--run-dir", type=Path, default=d.run_dir,
                        help="parent folder of the run folders (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=d.epochs,
                        help="maximum pretraining epochs; early stopping may stop sooner "
                             "(default: %(default)s)")
    parser.add_argument("--transfer-epochs", type=positive_int, default=d.transfer_epochs,
                        help="epochs of the transfer run and of the from-scratch baseline "
                             "(default: %(default)s)")
    parser.add_argument("--shots", type=positive_int, default=d.shots,
                        help="training examples per class of digits 5-9 (default: %(default)s)")
    parser.add_argument("--interrupt-at", type=positive_int, default=None,
                        help="optimizer step at which the transfer run is interrupted "
                             "(default: midway)")
    parser.add_argument("--trackers", type=_trackers_arg, default=d.trackers,
                        help="comma-separated subset of tensorboard,mlflow,wandb, or none "
                             "(default: all that are installed)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run (at most 5 pretraining epochs), for tests")
    parser.add_argument("--quiet", action="store_true",
                        help="no model summary and no per-epoch progress lines")
    args = parser.parse_args(argv)
    epochs, transfer_epochs = args.epochs, args.transfer_epochs
    if args.quick:
        epochs = min(epochs, 5)
    if transfer_epochs < 2:
        parser.error("--transfer-epochs must be at least 2 (the run is interrupted and resumed)")
    return DemoOptions(run_dir=args.run_dir, epochs=epochs, transfer_epochs=transfer_epochs,
                       shots=args.shots, interrupt_at=args.interrupt_at, trackers=args.trackers,
                       seed=args.seed, quiet=args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hookloop demo`` with the arguments after ``demo``; returns the exit status.

    This is the ``demo`` entry point of the ``hookloop.commands`` group.
    """
    opts = parse_args(argv)
    run(opts)
    sys.stdout.flush()
    return 0
