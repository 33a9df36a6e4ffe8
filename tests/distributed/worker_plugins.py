"""The checkpoint, early-stopping, tensorboard and progress plugins under DDP:
``torchrun --nproc_per_node=2 worker_plugins.py OUT``.

Plugins are loaded by their entry-point names, as users do. Each scenario writes
``OUT/<scenario>.rank<r>.json``.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from _worker_common import Recorder, dump, flat, global_batches, init, model, out_dir, params, run, shard
from _worker_common import same_on_all_ranks as same
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hookloop import Loop
from hookloop.plugins import hookimpl

RANK, WORLD = init()


class Saved:
    """Records ``on_checkpoint_saved`` on this rank and saves through the plugin's
    public ``save`` on every rank at ``save_at``."""

    def __init__(self, save_at: int | None = None) -> None:
        self.save_at = save_at
        self.saved: list[list] = []
        self.explicit: str | None = None

    @hookimpl
    def on_checkpoint_saved(self, loop, path, is_best):
        self.saved.append([loop.state.global_step, str(path), bool(is_best)])

    @hookimpl
    def on_train_batch_end(self, loop):
        if self.save_at is not None and loop.state.global_step == self.save_at and loop.state.stepped:
            path = loop.get_plugin("checkpoint").save(loop)
            self.explicit = str(path)


def scenario_writes() -> None:
    """Per-rank output folders: whatever rank 1 writes would appear under *_rank1."""
    out = out_dir()
    progress_file = (out / f"progress_rank{RANK}.txt").open("w")
    rec, saved = Recorder(), Saved(save_at=3)
    opt_module = model()
    loop = Loop(
        opt_module, torch.optim.SGD(opt_module.parameters(), lr=0.05),
        shard(global_batches(6, 8), RANK, WORLD), val_data=shard(global_batches(2, 8, seed=9), RANK, WORLD),
        loss_fn=F.mse_loss, log_every_n_steps=2, autoload=False,
        plugins=[
            ("checkpoint", {"dirpath": str(out / f"ckpt_rank{RANK}"), "monitor": "val/loss",
                            "top_k": 2, "every_n_steps": 4, "filename": "{epoch}-{step}"}),
            ("early_stopping", {"monitor": "val/loss", "min_delta": 100.0, "patience": 2}),
            ("tensorboard", {"log_dir": str(out / f"tb_rank{RANK}"), "flush_secs": 1}),
            ("progress", {"file": progress_file, "mode": "lines"}),
            rec, saved,
        ],
    )
    state = loop.fit(max_epochs=20)
    progress_file.close()
    dump("writes", {
        "global_step": state.global_step, "epoch": state.epoch, "stop_reason": state.stop_reason,
        "epoch_ends": rec.epoch_ends, "logs": rec.logs, "saved": saved.saved,
        "explicit": saved.explicit, "same_params": same(params(loop.module)),
        "plugins": sorted(n for n, _ in loop.pm.plugin_items()),
    })


class CrashAt:
    """Raises on every rank at the same step (a crash of the whole job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_train_batch_end(self, loop):
        if loop.state.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def _noisy_step(loop, batch):
    loss = F.mse_loss(loop.model(F.dropout(batch[0], 0.3)), batch[1])  # per-rank torch RNG
    loop.log("train/loss", loss)
    return loss


def _resume_loop(plugins):
    g = torch.Generator().manual_seed(7)
    ds = TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))
    data = DataLoader(ds, batch_size=4,
                      sampler=DistributedSampler(ds, num_replicas=WORLD, rank=RANK, shuffle=True, seed=3))
    module = model()
    torch.manual_seed(200 + RANK)
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    return Loop(module, opt, data, step_fn=_noisy_step, log_every_n_steps=3, autoload=False,
                plugins=plugins)


def scenario_resume() -> None:
    shared = out_dir() / "shared_ckpt"
    full = _resume_loop([])
    full.fit(max_epochs=3)  # 5 batches per rank and epoch: 15 steps
    want = flat(full.module)
    crashed = _resume_loop([("checkpoint", {"dirpath": str(shared), "every_n_steps": 7,
                                            "every_n_epochs": None, "filename": "{step}"}),
                            CrashAt(9)])
    try:
        crashed.fit(max_epochs=3)
    except RuntimeError as exc:
        crash = str(exc)
    tdist.barrier()
    torch.manual_seed(999)  # a new process would start from other RNG states
    saved = Saved()
    resumed = _resume_loop([("checkpoint", {"dirpath": str(shared), "resume": "latest",
                                            "every_n_steps": 7, "every_n_epochs": None,
                                            "filename": "{step}"}), saved])
    resumed.fit(max_epochs=3)
    got = flat(resumed.module)
    dump("resume", {
        "crash": crash, "bit_exact": torch.equal(got, want), "max_diff": float((got - want).abs().max()),
        "global_step": resumed.state.global_step, "same_params": same(params(resumed.module)),
        "saved_after_resume": saved.saved,
    })


def scenario_async() -> None:
    """Async saves: rank 0 writes in the background; every rank announces each save once
    it is durable (after the barrier at the next save or at fit end)."""
    out = out_dir()
    saved = Saved()
    opt_module = model()
    loop = Loop(
        opt_module, torch.optim.SGD(opt_module.parameters(), lr=0.05),
        shard(global_batches(6, 8), RANK, WORLD), loss_fn=F.mse_loss, log_every_n_steps=2,
        autoload=False,
        plugins=[("checkpoint", {"dirpath": str(out / "ckpt_async"), "every_n_steps": 2,
                                 "every_n_epochs": None, "top_k": -1, "async_save": True,
                                 "filename": "{step}"}), saved],
    )
    loop.fit(max_epochs=2)
    dump("async", {"saved": saved.saved, "files": sorted(p.name for p in (out / "ckpt_async").glob("*.pt"))})


if __name__ == "__main__":
    run(scenario_writes, scenario_resume, scenario_async)
