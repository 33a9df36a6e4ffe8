"""Tests of the freezing schedules: frozen phase, unfreezing points, param groups,
schedulers, BatchNorm statistics and bit-identical resume."""

from __future__ import annotations

import io

import pytest
import torch
from hookloop_freeze import Freeze, GradualUnfreeze, freeze_modules, resolve_modules
from torch import nn

from hookloop.plugins import available_plugins, hookimpl
from hookloop.testing import tiny_data, tiny_loop


class Net(nn.Module):
    """A backbone with a BatchNorm layer and a head, seeded."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Probe:
    """Records, before each batch, whether the first backbone weight is trainable."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool, int]] = []

    @hookimpl
    def on_train_batch_start(self, loop, batch, batch_idx):
        p = loop.module.backbone[0].weight
        self.seen.append((loop.state.epoch, loop.state.global_step, p.requires_grad,
                          len(loop.optimizers[0].param_groups)))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_loop(plugins, *, opt="head", sched=None, seed=0, **kwargs):
    model = Net(seed)
    if opt == "head":
        optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9)
    elif opt == "sgd_all":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    elif opt == "adamw_all":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    else:
        optimizer = torch.optim.Adam(model.head.parameters(), lr=0.01)
    scheduler = sched(optimizer) if sched else None
    return tiny_loop(plugins, model=model, optimizer=optimizer, scheduler=scheduler, seed=seed,
                     **kwargs)


@pytest.mark.parametrize("opt", ["head", "sgd_all", "adamw_all"])
def test_frozen_phase_keeps_backbone_bit_identical(opt):
    loop = make_loop([Freeze(["backbone"])], opt=opt)
    before = snapshot(loop.module.backbone)
    head_before = snapshot(loop.module.head)
    loop.fit(max_epochs=3)
    assert same(before, snapshot(loop.module.backbone))  # weights and BN running stats
    assert not same(head_before, snapshot(loop.module.head))
    assert all(not p.requires_grad for p in loop.module.backbone.parameters())
    assert all(p.requires_grad for p in loop.module.head.parameters())


def test_head_learns():
    loop = make_loop([Freeze("backbone")], opt="adam")
    losses = []

    class Watch:
        @hookimpl
        def on_train_epoch_end(self, loop, epoch, metrics):
            losses.append(metrics["train/loss_epoch"])

    loop.add_plugins([Watch()])
    loop.fit(max_epochs=6)
    assert losses[-1] < losses[0]


def test_batchnorm_of_frozen_layers_stays_in_eval_and_train_bn_keeps_it_training():
    loop = make_loop([Freeze("backbone")])
    bn = loop.module.backbone[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    modes = []

    class Mode:
        @hookimpl
        def on_train_batch_end(self, loop, outputs, batch, batch_idx):
            modes.append(loop.module.backbone[1].training)

    loop.add_plugins([Mode()])
    loop.fit(max_epochs=2)
    assert not any(modes)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])

    loop = make_loop([Freeze("backbone", train_bn=True)], opt="sgd_all")
    bn = loop.module.backbone[1]
    mean = bn.running_mean.clone()
    weight = bn.weight.detach().clone()
    loop.fit(max_epochs=1)
    assert bn.training and bn.weight.requires_grad
    assert not torch.equal(bn.running_mean, mean) and not torch.equal(bn.weight, weight)
    assert not loop.module.backbone[0].weight.requires_grad


def test_unfreeze_at_epoch_exact_and_param_group_added():
    probe = Probe()
    loop = make_loop([Freeze("backbone", unfreeze_at_epoch=2, lr_scale=0.1), probe])
    before = snapshot(loop.module.backbone)
    loop.fit(max_epochs=4)
    for epoch, _step, trainable, groups in probe.seen:
        assert trainable == (epoch >= 2)
        assert groups == (2 if epoch >= 2 else 1)
    opt = loop.optimizers[0]
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"])
    assert opt.param_groups[1]["momentum"] == 0.9  # optimizer defaults fill the new group
    assert {id(p) for p in opt.param_groups[1]["params"]} == {
        id(p) for p in loop.module.backbone.parameters()
    }
    assert not same(before, snapshot(loop.module.backbone))
    assert loop.module.backbone[1].training  # BN back to train mode once unfrozen


def test_unfreeze_at_step_exact():
    probe = Probe()
    loop = make_loop([Freeze(["backbone"], unfreeze_at_step=11), probe])
    loop.fit(max_epochs=3)
    for _epoch, step, trainable, _groups in probe.seen:
        assert trainable == (step >= 11)
    assert any(s == 11 and t for _, s, t, _ in probe.seen)


def test_params_held_by_the_optimizer_keep_their_group():
    loop = make_loop([Freeze("backbone", unfreeze_at_epoch=1)], opt="sgd_all")
    before = snapshot(loop.module.backbone)
    loop.fit(max_epochs=2)
    assert len(loop.optimizers[0].param_groups) == 1
    assert not same(before, snapshot(loop.module.backbone))


def test_gradual_unfreeze_from_the_head_down():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                        nn.Linear(8, 8), nn.ReLU())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layers(x))

    model = Deep()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    gu = GradualUnfreeze(["layers.4", "layers.2", "layers.0"], every_n_epochs=1,
                         lr_scale=[0.5, 0.25, 0.125])
    seen = []

    class Watch:
        @hookimpl
        def on_train_batch_start(self, loop, batch, batch_idx):
            if batch_idx == 0:
                seen.append([loop.module.layers[i].weight.requires_grad for i in (0, 2, 4)])

    loop = tiny_loop([gu, Watch()], model=model, optimizer=opt)
    loop.fit(max_epochs=5)
    assert seen == [[False, False, False], [False, False, True], [False, True, True],
                    [True, True, True], [True, True, True]]
    groups = loop.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert gu.unfreeze_points() == [("epoch", 1), ("epoch", 2), ("epoch", 3)]


def test_gradual_unfreeze_by_steps():
    model = Net()
    gu = GradualUnfreeze(["backbone.3", "backbone.0"], every_n_steps=5)
    probe = Probe()
    loop = tiny_loop([gu, probe], model=model,
                     optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1))
    loop.fit(max_epochs=2)
    for _e, step, trainable, groups in probe.seen:
        assert trainable == (step >= 10)
        assert groups == 1 + (step >= 5) + (step >= 10)


@pytest.mark.parametrize("kind", ["step", "cosine", "lambda", "onecycle", "plateau", "sequential"])
def test_schedulers_drive_the_new_group(kind):
    interval = "epoch"
    monitor = None
    if kind == "step":
        def sched(o):
            return torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5)
    elif kind == "cosine":
        def sched(o):
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
    elif kind == "lambda":
        def sched(o):
            return torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e)
    elif kind == "onecycle":
        interval = "step"

        def sched(o):
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=40)
    elif kind == "plateau":
        monitor = "val/loss"

        def sched(o):
            return torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5)
    else:
        def sched(o):
            return torch.optim.lr_scheduler.SequentialLR(
                o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2),
                    torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[2])
    loop = make_loop([Freeze("backbone", unfreeze_at_epoch=1, lr_scale=0.1)], sched=sched,
                     scheduler_interval=interval, scheduler_monitor=monitor)
    loop.fit(max_epochs=4)
    groups = loop.optimizers[0].param_groups
    assert len(groups) == 2
    assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"], rel=1e-6)
    if kind != "plateau":
        assert loop.schedulers[0].get_last_lr()[1] == pytest.approx(groups[1]["lr"])


def test_module_selection_by_path_glob_and_object():
    model = Net()
    assert resolve_modules(model, ["backbone.0"]) == ["backbone.0"]
    assert resolve_modules(model, ["backbone.[03]"]) == ["backbone.0", "backbone.3"]
    assert resolve_modules(model, [model.head]) == ["head"]
    with pytest.raises(ValueError, match=r"backbone\.0"):
        resolve_modules(model, ["trunk"])
    assert freeze_modules(model, ["head"]) == 16 * 3 + 3
    assert not model.head.weight.requires_grad


def test_bad_options():
    with pytest.raises(ValueError):
        Freeze("backbone", unfreeze_at_epoch=1, unfreeze_at_step=3)
    with pytest.raises(ValueError):
        Freeze("backbone", lr_scale=0)
    with pytest.raises(ValueError):
        GradualUnfreeze(["a", "b"], lr_scale=[0.1])
    loop = make_loop([Freeze("trunk")])
    with pytest.raises(ValueError, match="no module"):
        loop.fit(max_epochs=1)


def test_enabled_by_entry_point_name():
    found = available_plugins(refresh=True)
    assert found["freeze"].obj is Freeze
    loop = make_loop([("freeze", {"modules": ["backbone"], "unfreeze_at_epoch": 1})])
    assert isinstance(loop.get_plugin("freeze"), Freeze)
    loop.fit(max_epochs=2)
    assert len(loop.optimizers[0].param_groups) == 2


class Snap:
    """Saves ``loop.state_dict()`` in memory at one global step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.blob: bytes | None = None

    @hookimpl
    def on_train_batch_end(self, loop, outputs, batch, batch_idx):
        if loop.state.global_step == self.step and self.blob is None:
            buf = io.BytesIO()
            torch.save(loop.state_dict(), buf)
            self.blob = buf.getvalue()

    def load(self):
        return torch.load(io.BytesIO(self.blob), weights_only=True)


def _final(loop):
    opt = loop.optimizers[0]
    names = {id(p): n for n, p in loop.module.named_parameters()}
    groups = [([names[id(p)] for p in g["params"]], g["lr"]) for g in opt.param_groups]
    return snapshot(loop.module), groups, [n for n, p in loop.module.named_parameters()
                                           if p.requires_grad]


def _make_plugin(kind):
    if kind == "epoch":
        return Freeze("backbone", unfreeze_at_epoch=2, lr_scale=0.3)
    if kind == "step":
        return Freeze("backbone", unfreeze_at_step=13, lr_scale=0.3)
    return GradualUnfreeze(["backbone.3", "backbone.0"], every_n_epochs=1, lr_scale=[0.5, 0.2])


@pytest.mark.parametrize("kind", ["epoch", "step", "gradual"])
@pytest.mark.parametrize("at", [6, 12, 20])
def test_resume_mid_schedule_is_bit_identical(kind, at):
    def sched(o):
        return torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.7)

    snap = Snap(at)  # 8 steps per epoch: 6 and 20 are mid-epoch, 12 too
    full = make_loop([_make_plugin(kind), snap], opt="adam", sched=sched)
    full.fit(max_epochs=4)
    assert snap.blob is not None

    fresh = make_loop([_make_plugin(kind)], opt="adam", sched=sched)
    assert len(fresh.optimizers[0].param_groups) == 1
    fresh.fit(max_epochs=4, resume=snap.load())
    a, b = _final(full), _final(fresh)
    assert same(a[0], b[0])
    assert a[1] == b[1]
    assert a[2] == b[2]


def test_resume_at_epoch_end_restores_frozen_set_and_groups():
    first = make_loop([Freeze("backbone", unfreeze_at_epoch=3)], opt="adam")
    first.fit(max_epochs=2)
    state = first.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    fresh = make_loop([Freeze("backbone", unfreeze_at_epoch=3)], opt="adam")
    probe = Probe()
    fresh.add_plugins([probe])
    fresh.fit(max_epochs=5, resume=torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert [t for e, _, t, _ in probe.seen if e == 2] == [False] * len(tiny_data())
    assert all(t for e, _, t, _ in probe.seen if e >= 3)
    assert len(fresh.optimizers[0].param_groups) == 2
