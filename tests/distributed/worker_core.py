"""Core DDP checks, several per launch: ``torchrun --nproc_per_node=2 worker_core.py OUT``.

Each scenario writes ``OUT/<scenario>.rank<r>.json``; the tests assert on them.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from _worker_common import (
    Recorder,
    dump,
    flat,
    global_batches,
    init,
    model,
    out_dir,
    params,
    run,
    same_on_all_ranks,
    shard,
)
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hookloop import Loop
from hookloop.plugins import hookimpl

RANK, WORLD = init()


def _loop(module, data, **kw):
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    kw.setdefault("loss_fn", F.mse_loss)
    kw.setdefault("autoload", False)
    return Loop(module, opt, data, **kw)


# ---------------------------------------------------------------- match a single process


class RankMetric:
    """Logs the rank as a metric every batch: the reduced mean must be the mean rank."""

    @hookimpl
    def on_train_batch_end(self, loop):
        loop.log("test/rank", torch.tensor(float(loop.state.rank)))
        if loop.state.rank == 1:  # a second value on rank 1: the mean is weighted by count
            loop.log("test/rank", 1.0)


def scenario_match() -> None:
    batches = global_batches(6, 8)
    val = global_batches(2, 8, seed=2)
    rec = Recorder()
    ddp = _loop(model(), shard(batches, RANK, WORLD), val_data=shard(val, RANK, WORLD),
                log_every_n_steps=2, plugins=[rec, RankMetric()])
    ddp.fit(max_epochs=2)
    ref_rec = Recorder()
    ref = _loop(model(), batches, val_data=val, log_every_n_steps=2, distributed=False, plugins=[ref_rec])
    ref.fit(max_epochs=2)
    dump("match", {
        "seen": rec.seen, "logs": rec.logs, "ref_logs": ref_rec.logs,
        "params": params(ddp.module), "ref_params": params(ref.module),
        "ref_seen": ref_rec.seen, "same_params": same_on_all_ranks(params(ddp.module)),
        "final_step": ddp.state.global_step,
    })


def scenario_accepts_ddp() -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = global_batches(4, 8, seed=8)
    user_ddp = DDP(model())
    loop = _loop(user_ddp, shard(batches, RANK, WORLD), log_every_n_steps=2)
    loop.fit(max_epochs=2)
    ref = _loop(model(), batches, log_every_n_steps=2, distributed=False)
    ref.fit(max_epochs=2)
    keys = sorted(loop.state_dict()["model"])
    dump("accepts_ddp", {
        "same_wrapper": loop.model is user_ddp, "inner": loop.module is user_ddp.module,
        "keys": keys, "ref_keys": sorted(ref.state_dict()["model"]),
        "params": params(loop.module), "ref_params": params(ref.module),
    })


# ---------------------------------------------------------------- accumulation with no_sync


def scenario_accum() -> None:
    batches = global_batches(5, 8, seed=3)  # odd: the epoch's last micro-batch steps alone
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp = _loop(model(), shard(batches, RANK, WORLD), grad_accum=2, log_every_n_steps=1)
    ddp.model.register_comm_hook(None, counting_hook)
    ddp.fit(max_epochs=2)
    ref = _loop(model(), batches, grad_accum=2, log_every_n_steps=1, distributed=False)
    ref.fit(max_epochs=2)
    dump("accum", {
        "grad_allreduces": len(calls), "steps": ddp.state.global_step,
        "params": params(ddp.module), "ref_params": params(ref.module), "ref_steps": ref.state.global_step,
        "same_params": same_on_all_ranks(params(ddp.module)),
    })


# ---------------------------------------------------------------- a stop on one rank


class StopOnRank:
    def __init__(self, rank, step, epoch_only=False):
        self.rank, self.step, self.epoch_only = rank, step, epoch_only
        self.stepped_after: list[int] = []

    @hookimpl
    def on_train_batch_end(self, loop):
        s = loop.state
        if s.rank == self.rank and s.global_step == self.step:
            if self.epoch_only:
                loop.stop_epoch()
            else:
                loop.request_stop(f"asked on rank {s.rank}")


def scenario_stop() -> None:
    out = {}
    val = global_batches(2, 8, seed=5)
    # mid-interval (agreed at the next log interval), after the epoch's last interval
    # (agreed at epoch end), on rank 0 and on rank 1, and an epoch-only stop
    cases = {"mid_interval_r1": (1, 5, False), "mid_interval_r0": (0, 6, False),
             "after_last_interval_r1": (1, 9, False), "stop_epoch_r1": (1, 3, True)}
    for name, (rank, step, epoch_only) in cases.items():
        rec = Recorder()
        loop = _loop(model(), shard(global_batches(10, 8, seed=4), RANK, WORLD),
                     val_data=shard(val, RANK, WORLD), log_every_n_steps=4,
                     plugins=[StopOnRank(rank, step, epoch_only), rec])
        state = loop.fit(max_epochs=3)
        out[name] = {"global_step": state.global_step, "epoch": state.epoch,
                     "epoch_ends": rec.epoch_ends, "stop_reason": state.stop_reason,
                     "should_stop": state.should_stop, "logs": rec.logs,
                     "same_params": same_on_all_ranks(params(loop.module))}
    dump("stop", out)


# ---------------------------------------------------------------- resume with per-rank RNG


def _noisy_step(loop, batch):
    x, y = batch[0], batch[1]
    x = F.dropout(x, 0.3)  # the global torch RNG, different on every rank
    loss = F.mse_loss(loop.model(x), y)
    loop.log("train/loss", loss)
    return loss


class SaveAt:
    """The checkpoint protocol in miniature: every rank builds the state (RNG states
    are gathered), rank 0 writes, every rank waits at a barrier."""

    def __init__(self, step: int, epoch: int) -> None:
        self.step, self.epoch = step, epoch
        self.paths = {"mid_epoch": out_dir() / "mid.pt", "epoch_end": out_dir() / "end.pt"}

    def _save(self, loop, name):
        state = loop.state_dict()
        if loop.state.is_global_zero:
            torch.save(state, self.paths[name])
        loop.barrier()

    @hookimpl
    def on_train_batch_end(self, loop):
        if loop.state.global_step == self.step:
            self._save(loop, "mid_epoch")

    @hookimpl
    def on_train_epoch_end(self, loop, epoch):
        if epoch == self.epoch:
            self._save(loop, "epoch_end")


def _resume_loop(plugins=()):
    g = torch.Generator().manual_seed(7)
    n = 40
    ds = TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g), torch.arange(n))
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=RANK, shuffle=True, seed=11)
    data = DataLoader(ds, batch_size=4, sampler=sampler)
    module = model()
    torch.manual_seed(100 + RANK)  # a different RNG stream per rank
    return _loop(module, data, step_fn=_noisy_step, log_every_n_steps=3, plugins=list(plugins))


def scenario_resume() -> None:
    rec, saver = Recorder(), SaveAt(step=7, epoch=0)
    full = _resume_loop([rec, saver])
    full.fit(max_epochs=3)  # 5 batches per rank and epoch
    want = flat(full.module)
    out = {"batches": rec.batches, "sampler_epoch": full.train_data.sampler.epoch}
    for name, path in saver.paths.items():
        loaded = torch.load(path, weights_only=True)
        step0 = loaded["loop"]["global_step"]
        torch.manual_seed(12345)  # garbage in the RNG: the resume must restore this rank's
        again_rec = Recorder()
        again = _resume_loop([again_rec])
        again.load_state_dict(loaded)
        rng_restored = torch.equal(torch.get_rng_state(), loaded["rng"][RANK]["now"]["torch"])
        again.fit(max_epochs=3, resume=loaded)
        got = flat(again.module)
        out[name] = {
            "step0": step0,
            "rng_entries": len(loaded["rng"]),
            "rng_restored": rng_restored,
            "rng_differs_between_ranks": not torch.equal(loaded["rng"][0]["now"]["torch"],
                                                         loaded["rng"][1]["now"]["torch"]),
            "bit_exact": torch.equal(got, want),
            "max_diff": float((got - want).abs().max()),
            "same_params": same_on_all_ranks(params(again.module)),
            "global_step": again.state.global_step,
            "full_step": full.state.global_step,
            "logs_after": again_rec.logs,
            "ref_logs_after": [x for x in rec.logs if x[0] > step0],
            "batches_after": again_rec.batches,
            "ref_batches": rec.batches,
        }
        tdist.barrier()
    dump("resume", out)


if __name__ == "__main__":
    run(scenario_match, scenario_accepts_ddp, scenario_accum, scenario_stop, scenario_resume)
