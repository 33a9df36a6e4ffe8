"""Checkpoint folders that differ between ranks (node-local disks):
``torchrun ... worker_folders.py OUT``.

Rank ``r`` uses ``OUT/node<r>`` as its checkpoint folder. A first fit saves (rank 0
alone writes, so only ``node0`` holds a checkpoint); a second loop asks for
``resume="latest"``: rank 0 finds the checkpoint, rank 1 finds none. Each rank dumps
the error its fit raised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _worker_common import dump, global_batches, init, model, out_dir, run, shard

from hookloop import Loop

RANK, WORLD = init()


def fit(resume: str | None) -> str | None:
    net = model()
    plugins = [("checkpoint", {"dirpath": str(out_dir() / f"node{RANK}"), "every_n_steps": 2,
                               "every_n_epochs": None, "filename": "{step}", "resume": resume})]
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), shard(global_batches(4, 8), RANK, WORLD),
                loss_fn=F.mse_loss, autoload=False, plugins=plugins)
    try:
        loop.fit(max_epochs=1)
    except Exception as exc:  # judged by the test
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    first = fit(None)
    second = fit("latest")
    folder = out_dir() / f"node{RANK}"
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    dump("folders", {"first": first, "second": second, "files": files})


if __name__ == "__main__":
    run(main)
