"""Mid-epoch resume on another world size or batch size
(``torchrun ... worker_position.py OUT save|resume BATCH CKPT``).

Sample ``i`` carries ``i`` as its first feature; every rank records the ids it trains.
``save``: one epoch over 40 samples through a ``DistributedSampler(shuffle=True,
seed=3)`` with ``BATCH`` samples per rank; the loop's state at step 2 is written to
``CKPT`` (by rank 0; ``state_dict`` is collective). ``resume``: the same epoch resumed
from ``CKPT``, with this launch's world size and ``BATCH``. Each rank dumps the ids it
trained, and (``save``) those trained up to the checkpoint.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from _worker_common import dump, init, run
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hookloop import Loop
from hookloop.plugins import hookimpl

RANK, WORLD = init()
MODE, BATCH, CKPT = sys.argv[2], int(sys.argv[3]), sys.argv[4]
N, SAVE_STEP = 40, 2


class Ids:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.before_save: list[int] = []

    @hookimpl
    def on_train_batch_start(self, loop: Loop, batch: Any) -> None:
        self.ids.extend(int(v) for v in batch[0][:, 0])

    @hookimpl
    def on_train_batch_end(self, loop: Loop) -> None:
        if MODE == "save" and loop.state.global_step == SAVE_STEP:
            state = loop.state_dict()
            self.before_save = list(self.ids)
            if RANK == 0:
                torch.save(state, CKPT)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    x[:, 0] = torch.arange(N, dtype=torch.float32)
    data = DataLoader(TensorDataset(x, torch.randn(N, 1, generator=g)), batch_size=BATCH,
                      sampler=DistributedSampler(TensorDataset(x), shuffle=True, seed=3))
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    ids = Ids()
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.01), data, loss_fn=F.mse_loss,
                plugins=[ids], autoload=False)
    resume = torch.load(CKPT, weights_only=True) if MODE == "resume" else None
    error = None
    try:
        loop.fit(max_epochs=1, resume=resume)
    except Exception as exc:  # judged by the test
        error = f"{type(exc).__name__}: {exc}"
    dump(MODE, {"ids": ids.ids, "before_save": ids.before_save, "error": error,
                "position": resume.get("position") if resume else None})


if __name__ == "__main__":
    run(main)
