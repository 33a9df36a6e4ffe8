"""Resume: an interrupted run continued from its checkpoint is bit-identical to an
uninterrupted one (epoch end and mid-epoch; dropout, shuffling, scheduler, RNGs), the
plugins' state comes back, and a real SIGTERM checkpoints and exits with 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hookloop_checkpoint import MANIFEST_NAME, Checkpoint, load_checkpoint

from hookloop.plugins import hookimpl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_testlib import WORKER, assert_same_run, make_loop, rng_now, scramble_rng


class Crash:
    """Raise at a given global step: the interruption."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_batch_end(self, loop) -> None:
        if loop.state.global_step == self.step:
            raise KeyboardInterrupt("interrupted")


class Counting:
    """A plugin with its own state (restored on resume)."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_end(self) -> None:
        self.seen += 1

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


EPOCHS = 3  # 10 batches per epoch


@pytest.mark.parametrize(
    ("crash_at", "options", "how"),
    [
        (24, {"every_n_epochs": 1}, "plugin"),  # resumes from the end of epoch 1
        (17, {"every_n_epochs": None, "every_n_steps": 4}, "fit"),  # mid-epoch, step 16
        (17, {"every_n_steps": 4, "async_save": True}, "plugin"),
        (7, {"every_n_steps": 3, "format": "safetensors"}, "fit"),
    ],
)
def test_resume_is_bit_exact(tmp_path: Path, crash_at: int, options: dict, how: str) -> None:
    ref_count = Counting()
    ref = make_loop([Checkpoint(tmp_path / "ref", **options), ref_count])
    ref.fit(max_epochs=EPOCHS)
    ref_rng = rng_now()

    first = make_loop([Checkpoint(tmp_path / "run", **options), Counting(), Crash(crash_at)])
    with pytest.raises(KeyboardInterrupt):
        first.fit(max_epochs=EPOCHS)
    saved = load_checkpoint(tmp_path / "run")
    assert saved["loop"]["global_step"] < crash_at

    scramble_rng()
    count = Counting()
    if how == "plugin":
        resumed = make_loop([Checkpoint(tmp_path / "run", resume="latest", **options), count])
        scramble_rng()
        resumed.fit(max_epochs=EPOCHS)
    else:
        resumed = make_loop([Checkpoint(tmp_path / "run", **options), count])
        scramble_rng()
        resumed.fit(max_epochs=EPOCHS, resume=load_checkpoint(tmp_path / "run"))
    assert_same_run(ref, resumed)
    got = rng_now()
    assert torch.equal(got[0], ref_rng[0]) and got[1:] == ref_rng[1:]
    assert count.seen == ref_count.seen == 30


def test_best_k_state_continues_after_resume(tmp_path: Path) -> None:
    values = [3.0, 1.0, 2.0, 5.0, 0.5]

    def val_step(loop, batch):
        loop.log("val/score", values[loop.state.epoch])

    opts = {"monitor": "val/score", "top_k": 2, "save_last": False, "filename": "e{epoch}"}
    first = make_loop([Checkpoint(tmp_path, **opts), Crash(31)], val_step_fn=val_step)
    with pytest.raises(KeyboardInterrupt):
        first.fit(max_epochs=5)
    ckpt = Checkpoint(tmp_path, resume="latest", **opts)
    make_loop([ckpt], val_step_fn=val_step).fit(max_epochs=5)
    kept = sorted(e["name"] for e in json.loads((tmp_path / MANIFEST_NAME).read_text())["checkpoints"])
    assert kept == ["e1", "e4"]  # the best two of all five epochs, across the interruption
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["e1.pt", "e4.pt"]
    assert ckpt.best_score == 0.5


def test_resume_latest_in_an_empty_directory_starts_fresh(tmp_path: Path) -> None:
    loop = make_loop([Checkpoint(tmp_path / "new", resume="latest")])
    loop.fit(max_epochs=1)
    assert loop.state.global_step == 10


SIGNAL_AT = 13  # mid-epoch 1


def test_sigterm_checkpoints_at_a_step_and_exits_143(tmp_path: Path) -> None:
    """A real SIGTERM from this process to a training process. The worker stops at step
    13 and waits until the signal has arrived, so the checkpoint is at exactly that step
    boundary on any machine, however slow or loaded."""
    d = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, str(WORKER), "train", str(d), str(EPOCHS), str(SIGNAL_AT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == f"waiting for a signal at step {SIGNAL_AT}":
                os.kill(proc.pid, signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)  # a liveness bound, not a window
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += out.splitlines()
    assert proc.returncode == 143, err[-3000:]
    assert f"signal received at step {SIGNAL_AT}" in lines, lines[-5:]
    assert "stopped preempted by SIGTERM chained=True restored=True" in lines, lines[-5:]
    ck = load_checkpoint(d)
    # the checkpoint is at the step the signal was delivered in, mid-epoch
    assert ck["loop"]["global_step"] == SIGNAL_AT and not ck["loop"]["epoch_done"]
    assert ck["loop"]["epoch"] == 1
    steps = [int(x.split()[1]) for x in lines if x.startswith("step ")]
    assert steps == list(range(1, SIGNAL_AT + 1))  # no step ran after the checkpoint

    ref = make_loop([])
    ref.fit(max_epochs=EPOCHS)
    scramble_rng()
    resumed = make_loop([Checkpoint(d, resume="latest")])
    resumed.fit(max_epochs=EPOCHS)
    assert_same_run(ref, resumed)


def test_signal_without_exit_returns_and_restores_handler(tmp_path: Path) -> None:
    """SIGUSR1 sent to this process at step 5: the hook waits until the handler ran
    (the plugin chains the one installed here), so the save is at exactly step 5."""
    received: list[int] = []

    class SelfSignal:
        @hookimpl
        def on_train_batch_end(self, loop) -> None:
            if loop.state.global_step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)
                while not received:  # delivered and handled before the plugin's hook runs
                    time.sleep(0.001)

    original = signal.signal(signal.SIGUSR1, lambda s, f: received.append(s))
    try:
        before = signal.getsignal(signal.SIGUSR1)
        loop = make_loop([Checkpoint(tmp_path, exit_on_signal=False), SelfSignal()])
        state = loop.fit(max_epochs=3)
        assert signal.getsignal(signal.SIGUSR1) == before
    finally:
        signal.signal(signal.SIGUSR1, original)
    assert received == [signal.SIGUSR1]  # chained, once
    assert state.stop_reason == "preempted by SIGUSR1"
    assert state.global_step == 5
    ck = load_checkpoint(tmp_path)
    assert ck["loop"]["global_step"] == 5 and not ck["loop"]["epoch_done"]
