"""A failure on rank 1 mid-run: ``torchrun ... worker_fail.py OUT MODE [STEP]``.

MODE ``exception``: rank 1 raises from a hook; ``sigterm``: rank 1 receives SIGTERM
(without a handler the process dies at once, no Python cleanup). Rank 0 would train
for a long time on its own; it must end too. Each rank writes ``training`` when
training runs and ``finished`` only if ``fit`` returned. With a fourth argument
``ckpt`` the checkpoint plugin saves every 10 steps to ``OUT/ckpt`` (and handles
SIGTERM as a preemption: save, stop); a fifth, ``K``, sets its ``agree_every_n_steps``
and logs only every 1000 steps.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.nn.functional as F
from _worker_common import dump, global_batches, init, model, out_dir, run, shard

from hookloop import Loop
from hookloop.plugins import hookimpl

RANK, WORLD = init()
MODE = sys.argv[2]
AT_STEP = int(sys.argv[3]) if len(sys.argv) > 3 else 5
CKPT = len(sys.argv) > 4 and sys.argv[4] == "ckpt"
AGREE = int(sys.argv[5]) if len(sys.argv) > 5 else None  # agree_every_n_steps; logs every 1000


class FailOnRank1:
    @hookimpl
    def on_train_batch_end(self, loop):
        step = loop.state.global_step
        if step == 1:
            dump("training", {"pid": os.getpid()})
        if loop.state.rank == 1 and step == AT_STEP:
            if MODE == "exception":
                raise RuntimeError(f"injected failure on rank 1 at step {step}")
            os.kill(os.getpid(), signal.SIGTERM)


def train() -> None:
    """Train for far longer than any test timeout; rank 1 fails at ``AT_STEP``."""
    module = model()
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    data = shard(global_batches(50, 8), RANK, WORLD)
    plugins: list = [FailOnRank1()]
    if CKPT:
        plugins.append(("checkpoint", {"dirpath": str(out_dir() / "ckpt"), "every_n_steps": 10,
                                       "every_n_epochs": None, "filename": "{step}",
                                       **({"agree_every_n_steps": AGREE} if AGREE else {})}))
    loop = Loop(module, opt, data, loss_fn=F.mse_loss, log_every_n_steps=1000 if AGREE else 10,
                autoload=False,
                plugins=plugins)
    try:
        loop.fit(max_epochs=1000)
    except SystemExit as exc:  # the checkpoint plugin's exit after a preemption
        dump("preempted", {"step": loop.state.global_step, "code": exc.code,
                           "reason": loop.state.stop_reason})
        raise
    dump("finished", {"step": loop.state.global_step})


if __name__ == "__main__":
    run(train, barrier=False)
