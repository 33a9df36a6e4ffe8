"""Worker processes for the kill and signal tests (run as a script, never imported by
pytest).

``kill-harness OUT N`` forks N children that save checkpoints continuously and kills
each with SIGKILL, from this (another) process: at a random moment, and every 10th
child once it reported that it is in the middle of writing a checkpoint.
``train DIR MAX_EPOCHS STEP`` trains with a Checkpoint plugin, prints each step, and at
``STEP`` waits until the test has sent SIGTERM from outside (a handshake, no timing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _block_in_a_later_save(fd: int, saved: list[int]) -> None:
    """Once a save completed (``saved`` not empty), make the next file write stop after
    its first bytes reached the temporary file: ``w`` goes to the parent and this process
    waits for its SIGKILL."""
    from hookloop_checkpoint import _io

    write = _io.HashingWriter.write

    def blocking_write(self: _io.HashingWriter, data: object) -> int:
        n = write(self, data)
        if saved:
            self.flush()
            os.write(fd, b"w")
            while True:  # until the parent's SIGKILL
                time.sleep(1)
        return n

    _io.HashingWriter.write = blocking_write  # type: ignore[method-assign]


def _child_saves(dirpath: str, fd: int, mid_write: bool) -> None:
    """Save a checkpoint after every step, forever; ``r`` to ``fd`` when ready, ``s``
    after every save; with ``mid_write``, block inside the write of the second save."""
    import torch

    torch.set_num_threads(1)
    from ckpt_testlib import make_loop
    from hookloop_checkpoint import Checkpoint

    from hookloop.plugins import hookimpl

    saved: list[int] = []

    class Ready:
        @hookimpl
        def on_checkpoint_saved(self) -> None:
            saved.append(1)
            os.write(fd, b"s")

    if mid_write:
        _block_in_a_later_save(fd, saved)
    ckpt = Checkpoint(dirpath, every_n_epochs=None, every_n_steps=1, top_k=2, filename="{step}",
                      signals=(), verbose=False)
    loop = make_loop([ckpt, Ready()], width=512)  # ~1 MB of weights + AdamW state per file
    os.write(fd, b"r")
    loop.fit(max_epochs=10**6)


MID_WRITE_EVERY = 10  # every 10th run is killed inside a write for certain (handshake)


def kill_harness(out: str, n: int) -> None:
    """Fork ``n`` saving children and SIGKILL each at a random moment; every
    ``MID_WRITE_EVERY``-th one once it reports that it is inside a write."""
    import hookloop_checkpoint  # noqa: F401
    import torch  # imported once here; the forked children inherit it
    from ckpt_testlib import make_loop

    torch.set_num_threads(1)
    make_loop([], width=512).fit(max_steps=1)  # pay the lazy imports once, before forking
    rnd = random.Random(int(os.environ.get("KILL_SEED", "0")))
    results = []
    for i in range(n):
        d = os.path.join(out, f"run{i:03d}")
        os.makedirs(d)
        mid_write = i % MID_WRITE_EVERY == 0
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                _child_saves(d, w, mid_write)
            finally:
                os._exit(1)
        os.close(w)
        assert os.read(r, 1) == b"r"
        if mid_write:
            while (got := os.read(r, 1)) != b"w":
                assert got, f"run {i}: the child ended before it blocked in a write"
        else:
            # at least one save done for most runs, then a random moment within a few saves
            if rnd.random() < 0.85:
                os.read(r, 1)
            time.sleep(rnd.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
        results.append({"dir": d, "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9,
                         "mid_write": mid_write})
    print(json.dumps(results))


def train(dirpath: str, max_epochs: int, signal_at: int) -> None:
    """Train with checkpoints at epoch end and print every step. At step ``signal_at``
    print ``waiting for a signal at step N`` and wait until a SIGTERM arrived (the test
    sends it after reading that line): the signal is then known to be delivered before
    this step's checkpoint hook runs, however slow the machine."""
    from ckpt_testlib import make_loop
    from hookloop_checkpoint import Checkpoint

    from hookloop.plugins import hookimpl

    previous: list[int] = []

    class Steps:
        @hookimpl
        def on_train_batch_end(self, loop) -> None:
            step = loop.state.global_step
            print(f"step {step}", flush=True)
            if step == signal_at:
                print(f"waiting for a signal at step {step}", flush=True)
                # the handler installed below runs (chained by the plugin's) once the
                # signal is delivered; no deadline here: the test bounds the wait
                while not previous:
                    time.sleep(0.01)
                print(f"signal received at step {step}", flush=True)

    signal.signal(signal.SIGTERM, lambda s, f: previous.append(s))  # a handler to chain
    ckpt = Checkpoint(dirpath, every_n_epochs=1)
    loop = make_loop([ckpt, Steps()])
    try:
        loop.fit(max_epochs=max_epochs)
    except SystemExit as exc:
        # the handler installed before was chained, and restored afterwards
        chained = previous == [signal.SIGTERM]
        restored = signal.getsignal(signal.SIGTERM) is not ckpt._handler
        print(f"stopped {loop.state.stop_reason} chained={chained} restored={restored}", flush=True)
        raise SystemExit(exc.code) from None
    print("finished", flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "kill-harness":
        kill_harness(sys.argv[2], int(sys.argv[3]))
    elif cmd == "train":
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd}")
