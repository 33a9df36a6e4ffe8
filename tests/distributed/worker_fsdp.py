"""A model sharded with FSDP2 (``fully_shard``) in the loop, with sharded checkpoints
through torch.distributed.checkpoint: ``torchrun ... worker_fsdp.py OUT MODE``.

MODE ``train`` (two ranks) trains and saves; ``resume`` (two ranks, a new job) resumes
from what ``train`` saved; ``single`` (one rank) loads the two-rank checkpoint on a
world of one and checks the errors of checkpoints that do not fit. Each scenario writes
``OUT/<scenario>.rank<r>.json``; full parameters are written by rank 0 as
``OUT/full_<name>.pt``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _worker_common import IN, OUT_F, dump, global_batches, init, out_dir, run, shard
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hookloop import Loop
from hookloop.plugins import hookimpl

RANK, WORLD = init()
MODE = sys.argv[2]
STEPS_PER_EPOCH = 3  # 5 micro-batches per rank and epoch, grad_accum=2: steps after 2, 4, 5
EPOCHS = 3


def mlp(sharded: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, OUT_F))
    if sharded:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (collective: every rank calls it); rank 0 gets them."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_full(model: nn.Module, name: str) -> None:
    state = full_params(model)
    if RANK == 0:
        torch.save(state, out_dir() / f"full_{name}.pt")


def _noisy_step(loop: Loop, batch: Any) -> torch.Tensor:
    loss = F.mse_loss(loop.model(F.dropout(batch[0], 0.3)), batch[1])  # per-rank torch RNG
    loop.log("train/loss", loss)
    return loss


def training_loop(plugins: list[Any], sharded: bool = True) -> Loop:
    """Shuffled per-rank data, dropout, AdamW, a scheduler, accumulation and clipping:
    every piece of state a bit-exact resume needs."""
    g = torch.Generator().manual_seed(7)
    ds = TensorDataset(torch.randn(40, IN, generator=g), torch.randn(40, OUT_F, generator=g))
    data = DataLoader(ds, batch_size=4,
                      sampler=DistributedSampler(ds, num_replicas=WORLD, rank=RANK, shuffle=True, seed=3))
    module = mlp(sharded)
    torch.manual_seed(200 + RANK)
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return Loop(module, opt, data, step_fn=_noisy_step, scheduler=sched, grad_accum=2, grad_clip_norm=0.5,
                log_every_n_steps=3, autoload=False, plugins=plugins)


class Saved:
    """Records ``on_checkpoint_saved`` and gathers the full parameters at ``at_step``."""

    def __init__(self, at_step: int | None = None, name: str = "") -> None:
        self.at_step, self.name = at_step, name
        self.saved: list[list[Any]] = []

    @hookimpl
    def on_checkpoint_saved(self, loop: Loop, path: str, is_best: bool) -> None:
        self.saved.append([loop.state.global_step, str(path)])

    @hookimpl
    def on_train_batch_end(self, loop: Loop) -> None:
        if loop.state.stepped and loop.state.global_step == self.at_step:
            save_full(loop.module, self.name)


def ckpt_options(dirpath: str, **extra: Any) -> dict[str, Any]:
    return {"dirpath": str(out_dir() / dirpath), "every_n_steps": 4, "every_n_epochs": None,
            "filename": "step{step}", "monitor": None, **extra}


def listing(dirpath: str) -> dict[str, Any]:
    root = out_dir() / dirpath
    return {p.name: sorted(q.name for q in p.iterdir()) if p.is_dir() else "file"
            for p in sorted(root.iterdir())}


# ---------------------------------------------------------------------- train


def scenario_sync() -> None:
    """Sync sharded saves at steps 4 and 8 and at the end (9); the full parameters at
    step 4 and at the end for the other jobs to compare with."""
    saved = Saved(at_step=4, name="step4")
    loop = training_loop([("checkpoint", ckpt_options("ckpt_sync", top_k=-1)), saved])
    seen = {"sharded": loop.sharded, "same_object": loop.model is loop.module}
    loop.fit(max_epochs=EPOCHS)
    save_full(loop.module, "end")
    dump("sync", {**seen, "global_step": loop.state.global_step, "saved": saved.saved,
                  "listing": listing("ckpt_sync")})


def scenario_async() -> None:
    """The same training with async sharded saves at 4 and 8, keeping the newest only."""
    saved = Saved()
    loop = training_loop([("checkpoint", ckpt_options("ckpt_async", async_save=True, top_k=1,
                                                      save_last=False)), saved])
    loop.fit(max_epochs=EPOCHS)
    save_full(loop.module, "async_end")
    dump("async", {"saved": saved.saved, "listing": listing("ckpt_async")})


class IterOnly:
    """Batches without ``len``: the loop cannot tell the epoch's last micro-batch, so an
    odd count leaves an accumulation window unfinished (dropped at the epoch's end)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


def scenario_match() -> None:
    """Accumulation (gradient sync off on non-stepping micro-batches) and clipping of
    DTensor gradients match one process on the global batch; with data of unknown
    length the unfinished window's unsynchronised gradients are dropped."""
    calls: list[bool] = []
    original = FSDPModule.set_requires_gradient_sync

    def spy(self: FSDPModule, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        if self is root:
            calls.append(requires_gradient_sync)
        original(self, requires_gradient_sync, recurse=recurse)

    results: dict[str, Any] = {}
    for kind in ("sized", "iterable"):
        batches = global_batches(5, 8, seed=11)
        wrap = IterOnly if kind == "iterable" else list
        ref_module = mlp(sharded=False)
        ref = Loop(ref_module, torch.optim.AdamW(ref_module.parameters(), lr=0.01), wrap(batches),
                   loss_fn=F.mse_loss, grad_accum=2, grad_clip_norm=0.05, distributed=False,
                   autoload=False)
        ref.fit(max_epochs=2)
        root = mlp()
        FSDPModule.set_requires_gradient_sync = spy  # type: ignore[method-assign]
        try:
            calls.clear()
            data = wrap(shard(batches, RANK, WORLD))
            loop = Loop(root, torch.optim.AdamW(root.parameters(), lr=0.01), data, loss_fn=F.mse_loss,
                        grad_accum=2, grad_clip_norm=0.05, autoload=False)
            loop.fit(max_epochs=2)
        finally:
            FSDPModule.set_requires_gradient_sync = original  # type: ignore[method-assign]
        got = full_params(root)
        want = {k: v.detach() for k, v in ref_module.state_dict().items()}
        results[kind] = {
            "steps": loop.state.global_step, "ref_steps": ref.state.global_step, "sync_calls": list(calls),
            "max_diff": max(float((got[k] - want[k]).abs().max()) for k in want) if RANK == 0 else None,
        }
    dump("match", results)


# ---------------------------------------------------------------------- resume


def scenario_resume_sync() -> None:
    """A new job resumes from the step-4 checkpoint (a path) and runs to the end."""
    saved = Saved()
    loop = training_loop([("checkpoint", ckpt_options("ckpt_resumed", top_k=-1,
                                                      resume=str(out_dir() / "ckpt_sync" / "step4"))),
                          saved])
    loop.fit(max_epochs=EPOCHS)
    save_full(loop.module, "resumed")
    dump("resume_sync", {"global_step": loop.state.global_step, "saved": saved.saved})


def scenario_resume_async() -> None:
    """``resume="latest"`` finds the newest sharded checkpoint of the async run (step 8)."""
    saved = Saved()
    loop = training_loop([("checkpoint", ckpt_options("ckpt_async", async_save=True, top_k=1,
                                                      save_last=False, resume="latest")), saved])
    resumed_at: list[int] = []

    class At:
        @hookimpl
        def on_fit_start(self, loop: Loop) -> None:
            resumed_at.append(loop.state.global_step)

    loop.add_plugins([At()])
    loop.fit(max_epochs=EPOCHS)
    save_full(loop.module, "async_resumed")
    dump("resume_async", {"resumed_at": resumed_at, "global_step": loop.state.global_step})


def scenario_resume_disagreement() -> None:
    """Node-local folders: rank 0 finds a sharded checkpoint, rank 1 none. The ranks
    compare what they found before the (collective) shard load, so both raise instead of
    rank 0 waiting in DCP's load for a rank that never comes."""
    import shutil

    local = out_dir() / f"local_rank{RANK}"
    if RANK == 0:
        shutil.copytree(out_dir() / "ckpt_sync", local)
    loop = training_loop([("checkpoint", ckpt_options(f"local_rank{RANK}", resume="latest"))])
    dump("resume_disagreement", {"error": _error(lambda: loop.fit(max_epochs=EPOCHS))})


# ---------------------------------------------------------------------- single


def _error(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def scenario_single() -> None:
    """World size 2 to 1: DCP reshards the two-rank checkpoint into a model sharded on
    one rank; then the errors of checkpoints that do not fit."""
    from hookloop_checkpoint import load_checkpoint

    step4 = out_dir() / "ckpt_sync" / "step4"
    saved = Saved()  # async saves under one fixed name: each replaces the directory before it
    loop = training_loop([("checkpoint", ckpt_options("ckpt_world1", async_save=True, filename="fixed",
                                                      enable_version_counter=False)), saved])
    loop.load_state_dict(load_checkpoint(step4, loop=loop))
    got = full_params(loop.module)
    want = torch.load(out_dir() / "full_step4.pt", weights_only=True)
    equal = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    resumed_step = loop.state.global_step
    loop.fit(max_epochs=EPOCHS)  # trains on from there (not bit-exact: another world size)

    errors = {
        "no_loop": _error(lambda: load_checkpoint(step4)),
        "sharded_into_plain": _error(
            lambda: training_loop([("checkpoint", ckpt_options("plain_resume", resume=str(step4)))],
                                  sharded=False).fit(max_epochs=EPOCHS)),
        "safetensors": _error(lambda: training_loop(
            [("checkpoint", ckpt_options("st", format="safetensors"))]).fit(max_epochs=1)),
    }
    plain = training_loop([("checkpoint", ckpt_options("plain", top_k=-1))], sharded=False)
    plain.fit(max_epochs=2)
    plain_file = out_dir() / "plain" / "step4.pt"
    errors["plain_into_sharded"] = _error(
        lambda: training_loop([("checkpoint", ckpt_options("sharded_resume", resume=str(plain_file)))]
                              ).fit(max_epochs=EPOCHS))
    other = mlp()  # another optimizer: state that DCP's index does not hold
    sgd = Loop(other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), None, step_fn=_noisy_step,
               autoload=False)
    before = full_params(other)
    errors["other_optimizer"] = _error(lambda: load_checkpoint(step4, loop=sgd))
    after = full_params(other)
    dump("single", {"equal": equal, "resumed_step": resumed_step, "global_step": loop.state.global_step,
                    "listing": listing("ckpt_world1"), "saved": saved.saved, "errors": errors,
                    # the refused load changed nothing: no weight, no optimizer state
                    "untouched": all(torch.equal(before[k], after[k]) for k in before)
                    and not sgd.optimizers[0].state})


if __name__ == "__main__":
    scenarios = {
        "train": (scenario_sync, scenario_async, scenario_match),
        "resume": (scenario_resume_sync, scenario_resume_async, scenario_resume_disagreement),
        "single": (scenario_single,),
    }[MODE]
    run(*scenarios)
    (out_dir() / f"done.{MODE}.rank{RANK}").write_text(json.dumps(True))
