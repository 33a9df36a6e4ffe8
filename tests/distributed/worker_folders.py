"""Checkpoint folders that differ between ranks (node-local disks):
``torchrun ... worker_folders.py OUT``.

Rank ``r`` uses ``OUT/node<r>`` as its checkpoint folder. A first fit saves (rank 0
alone writes, so only ``node0`` holds a checkpoint); a second loop asks for
``resume="latest"``: rank 0 finds the checkpoint, rank 1 finds none. A third fit is
given ``resume=`` by hand: rank 0 the newest checkpoint, rank 1 the oldest. Each rank
dumps the error each fit raised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _worker_common import dump, global_batches, init, model, out_dir, run, shard
from hookloop_checkpoint import list_checkpoints, load_checkpoint

from hookloop import Loop

RANK, WORLD = init()


def fit(resume: str | None, given: dict | None = None) -> str | None:
    net = model()
    options = {"dirpath": str(out_dir() / f"node{RANK}"), "every_n_steps": 2, "every_n_epochs": None,
               "filename": "{step}", "top_k": -1, "resume": resume}
    plugins = [] if given is not None else [("checkpoint", options)]
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), shard(global_batches(4, 8), RANK, WORLD),
                loss_fn=F.mse_loss, autoload=False, plugins=plugins)
    try:
        loop.fit(max_epochs=1, resume=given)
    except Exception as exc:  # judged by the test
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    first = fit(None)
    second = fit("latest")
    saved = list_checkpoints(out_dir() / "node0")
    third = fit(None, load_checkpoint(out_dir() / "node0" / saved[0 if RANK == 0 else -1]["primary"]))
    folder = out_dir() / f"node{RANK}"
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    dump("folders", {"first": first, "second": second, "third": third, "files": files})


if __name__ == "__main__":
    run(main)
