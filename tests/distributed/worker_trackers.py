"""The MLflow tracker under DDP, killed and resumed:
``torchrun --nproc_per_node=2 worker_trackers.py OUT PHASE URI EXPERIMENT``.

PHASE ``crash``: rank 0 is SIGKILLed at step 11, past the checkpoint of step 8 (step
10 was logged after it); torchrun then ends rank 1. PHASE ``resume``: a new launch
resumes from the latest checkpoint (the checkpoint plugin's ``resume="latest"``) and
runs to the end; each rank writes ``OUT/resume.rank<r>.json`` with what it logged and,
on rank 0, the tracker's run id and summary.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.nn.functional as F
from _worker_common import Recorder, dump, global_batches, init, model, out_dir, run, shard

from hookloop import Loop
from hookloop.plugins import hookimpl

RANK, WORLD = init()
PHASE, URI, EXPERIMENT = sys.argv[2:5]


class KillRank0:
    """SIGKILLs rank 0 at ``step``, once everything the tracker was given was sent."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_batch_end(self, loop):
        if RANK == 0 and loop.state.global_step == self.step:
            loop.get_plugin("mlflow").wait(60)
            os.kill(os.getpid(), signal.SIGKILL)


def scenario() -> None:
    rec = Recorder()
    net = model()
    plugins = [
        ("checkpoint", {"dirpath": str(out_dir() / "ckpt"), "every_n_epochs": 1, "resume": "latest",
                        "verbose": False}),
        ("mlflow", {"tracking_uri": URI, "experiment": EXPERIMENT}),
        rec,
    ]
    if PHASE == "crash":
        plugins.append(KillRank0(11))
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.05), shard(global_batches(4, 8), RANK, WORLD),
                val_data=shard(global_batches(1, 8, seed=9), RANK, WORLD), loss_fn=F.mse_loss,
                log_every_n_steps=2, autoload=False, plugins=plugins)
    loop.fit(max_epochs=3)
    tracker = loop.get_plugin("mlflow")
    dump(PHASE, {"logs": rec.logs, "run_id": tracker.run_id if RANK == 0 else None,
                 "report": tracker.report if RANK == 0 else None})


run(scenario)
