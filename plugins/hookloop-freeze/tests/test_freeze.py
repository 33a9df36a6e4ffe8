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


# ---------------------------------------------------------------------- defects and options


def test_train_bn_adds_the_norm_parameters_the_optimizer_lacks():
    loop = make_loop([Freeze("backbone", train_bn=True, lr_scale=0.5)])  # optimizer: the head only
    bn = loop.module.backbone[1]
    weight = bn.weight.detach().clone()
    loop.fit(max_epochs=1)
    groups = loop.optimizers[0].param_groups
    assert len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {id(bn.weight), id(bn.bias)}
    assert groups[1]["lr"] == pytest.approx(0.05)
    assert not torch.equal(bn.weight, weight)  # trained, not only requires_grad
    assert not loop.module.backbone[0].weight.requires_grad


def test_train_bn_resume_recreates_the_norm_group():
    def plugin():
        return Freeze("backbone", train_bn=True, unfreeze_at_epoch=2)

    snap = Snap(12)
    full = make_loop([plugin(), snap], opt="adam")
    full.fit(max_epochs=3)
    fresh = make_loop([plugin()], opt="adam")
    fresh.fit(max_epochs=3, resume=snap.load())
    assert len(full.optimizers[0].param_groups) == len(fresh.optimizers[0].param_groups) == 3
    assert same(snapshot(full.module), snapshot(fresh.module))


def test_absolute_learning_rate_for_the_unfrozen_group():
    loop = make_loop([Freeze("backbone", unfreeze_at_epoch=1, lr=0.003)])
    loop.fit(max_epochs=2)
    assert [g["lr"] for g in loop.optimizers[0].param_groups] == pytest.approx([0.1, 0.003])
    model = Net()
    gu = GradualUnfreeze(["backbone.3", "backbone.0"], lr=[0.02, 0.01])
    loop = tiny_loop([gu], model=model, optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1))
    loop.fit(max_epochs=3)
    assert [g["lr"] for g in loop.optimizers[0].param_groups] == pytest.approx([0.1, 0.02, 0.01])
    with pytest.raises(ValueError, match="lr must be a positive number; got -1"):
        Freeze("backbone", lr=-1)
    with pytest.raises(ValueError, match="lr has 1 entries for 2 groups"):
        GradualUnfreeze(["a", "b"], lr=[0.1])


class LRs:
    """The learning rate of every param group at each epoch's first batch."""

    def __init__(self) -> None:
        self.by_epoch: list[list[float]] = []

    @hookimpl
    def on_train_batch_start(self, loop, batch, batch_idx):
        if batch_idx == 0:
            self.by_epoch.append([g["lr"] for g in loop.optimizers[0].param_groups])


def test_lr_growth_factor_and_function_and_alignment():
    lrs = LRs()
    make_loop([Freeze("backbone", unfreeze_at_epoch=1, lr=0.01, lr_growth=3.0), lrs]).fit(max_epochs=4)
    assert [e[1:] for e in lrs.by_epoch] == [[], [pytest.approx(0.01)], [pytest.approx(0.03)],
                                            [pytest.approx(0.09)]]
    lrs = LRs()
    make_loop([Freeze("backbone", unfreeze_at_epoch=1, lr=0.01, lr_growth=3.0, align_with_head=True),
               lrs]).fit(max_epochs=4)
    assert [e[1:] for e in lrs.by_epoch][3] == [pytest.approx(0.09)]  # below the head's 0.1
    lrs = LRs()
    make_loop([Freeze("backbone", unfreeze_at_epoch=1, lr=0.04, lr_growth=lambda epoch: epoch,
                      align_with_head=True), lrs]).fit(max_epochs=4)
    # epoch 2: 0.04 * 2 = 0.08; epoch 3: 0.08 * 3 = 0.24, capped at the head's 0.1
    assert [e[1] for e in lrs.by_epoch[1:]] == pytest.approx([0.04, 0.08, 0.1])
    with pytest.raises(ValueError, match="lr_growth must be a positive number; got 0"):
        Freeze("backbone", lr_growth=0)


@pytest.mark.parametrize("at", [10, 12, 20])
def test_lr_growth_resumes_without_growing_twice(at):
    def plugin():
        return Freeze("backbone", unfreeze_at_epoch=1, lr_growth=2.0, lr_scale=0.1)

    snap = Snap(at)  # mid-epoch 1 (the unfreezing epoch), at the end of epoch 1, mid-epoch 2
    full = make_loop([plugin(), snap], opt="adam")
    full.fit(max_epochs=4)
    fresh = make_loop([plugin()], opt="adam")
    fresh.fit(max_epochs=4, resume=snap.load())
    a, b = _final(full), _final(fresh)
    assert a[1] == b[1] and same(a[0], b[0])


def test_compiled_model_names_resolve_through_orig_mod():
    model = Net()
    compiled = torch.compile(model, backend="eager")
    assert resolve_modules(compiled, ["backbone.0", "_orig_mod.head"]) == ["backbone.0", "head"]
    assert resolve_modules(nn.Sequential(compiled), ["0.backbone.[03]"]) == ["0.backbone.0", "0.backbone.3"]
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    probe = Probe()
    loop = tiny_loop([Freeze("backbone", unfreeze_at_epoch=1), probe], model=compiled, optimizer=opt)
    before = snapshot(model.backbone)
    loop.fit(max_epochs=1)
    assert same(before, snapshot(model.backbone))
    loop.fit(max_epochs=2)
    assert not same(before, snapshot(model.backbone))
    assert [t for _, _, t, _ in probe.seen] == [False] * 8 + [True] * 8
    assert loop.get_plugin("freeze").state_dict()["added"][0]["params"][0] == "backbone.0.weight"


@pytest.mark.slow
def test_compiled_model_with_inductor():
    model = Net()
    compiled = torch.compile(model)  # inductor: compiles C++ on the CPU (about 30 s here)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    loop = tiny_loop([Freeze("backbone", unfreeze_at_epoch=1)], model=compiled, optimizer=opt)
    before = snapshot(model.backbone)
    loop.fit(max_epochs=2)
    assert not same(before, snapshot(model.backbone))
    assert len(opt.param_groups) == 2


def test_fsdp_models_are_refused_clearly():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    model = Net()
    # what fully_shard does to a module's class, without a process group
    model.backbone.__class__ = type("FSDPSequential", (fsdp.FSDPModule, nn.Sequential), {})
    plugin = Freeze("backbone")

    class FakeLoop:
        module = model
        optimizers = ()

    with pytest.raises(NotImplementedError, match="module 'backbone' of the model is sharded with FSDP"):
        plugin.on_fit_start(FakeLoop())
