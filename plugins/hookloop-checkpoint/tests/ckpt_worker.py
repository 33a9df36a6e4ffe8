"""Worker processes for the kill and signal tests (run as a script, never imported by
pytest).

``kill-harness OUT N`` forks N children that save checkpoints continuously and kills
each with SIGKILL at a random moment, from this (another) process.
``train DIR MAX_EPOCHS`` trains with a Checkpoint plugin and prints each step, so the
test can send SIGTERM from outside.
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


def _child_saves(dirpath: str, fd: int) -> None:
    import torch

    torch.set_num_threads(1)
    from ckpt_testlib import make_loop
    from hookloop_checkpoint import Checkpoint

    from hookloop.plugins import hookimpl

    class Ready:
        @hookimpl
        def on_checkpoint_saved(self) -> None:
            os.write(fd, b"s")

    ckpt = Checkpoint(dirpath, every_n_epochs=None, every_n_steps=1, top_k=2, filename="{step}",
                      signals=(), verbose=False)
    loop = make_loop([ckpt, Ready()], width=512)  # ~1 MB of weights + AdamW state per file
    os.write(fd, b"r")
    loop.fit(max_epochs=10**6)


def kill_harness(out: str, n: int) -> None:
    """Fork ``n`` saving children and SIGKILL each at a random moment."""
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
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                _child_saves(d, w)
            finally:
                os._exit(1)
        os.close(w)
        assert os.read(r, 1) == b"r"
        # at least one save done for most runs, then a random moment within a few saves
        if rnd.random() < 0.85:
            os.read(r, 1)
        time.sleep(rnd.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(r)
        results.append({"dir": d, "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9})
    print(json.dumps(results))


def train(dirpath: str, max_epochs: int) -> None:
    """Train with checkpoints at epoch end; print every step (the test sends SIGTERM)."""
    from ckpt_testlib import make_loop
    from hookloop_checkpoint import Checkpoint

    from hookloop.plugins import hookimpl

    class Steps:
        @hookimpl
        def on_train_batch_end(self, loop) -> None:
            print(f"step {loop.state.global_step}", flush=True)
            time.sleep(0.02)  # give the sender time to act between steps

    previous = []
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
        train(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")
