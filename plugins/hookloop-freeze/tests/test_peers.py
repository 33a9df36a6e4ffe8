"""The behaviours of Lightning's BackboneFinetuning/BaseFinetuning tests
(``tests/tests_pytorch/callbacks/test_finetuning_callback.py``) on hookloop's freezing
plugins. Each test names the peer test it ports; where hookloop differs on purpose the
test checks hookloop's behaviour and says so (README "Differences from Lightning,
Ignite and Keras", tests/PEER_TESTS.md)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hookloop_freeze import Freeze, GradualUnfreeze, freeze_modules
from torch import nn

from hookloop.plugins import hookimpl
from hookloop.testing import tiny_loop


class BackboneNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        self.layer = nn.Linear(8, 3)
        self.backbone_used = False

    def forward(self, x):
        self.backbone_used = True
        return self.layer(self.backbone(x))


class LRs:
    """Per epoch start: (head learning rate, last param group's learning rate)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[float, float]] = {}

    @hookimpl
    def on_train_batch_start(self, loop, batch, batch_idx):
        groups = loop.optimizers[0].param_groups
        if batch_idx == 0 and len(groups) > 1:
            self.seen[loop.state.epoch] = (groups[0]["lr"], groups[-1]["lr"])


def test_backbone_learning_rate_grows_up_to_the_head():
    # Lightning test_finetuning_callback (BackboneFinetuning: initial ratio 0.1, growth
    # 2.0 per epoch, should_align=True, StepLR(gamma=0.7) on the head)
    model = BackboneNet()
    opt = torch.optim.SGD(model.layer.parameters(), lr=0.1)
    lrs = LRs()
    plugin = Freeze("backbone", unfreeze_at_epoch=3, lr_scale=0.1, lr_growth=2.0, align_with_head=True)
    loop = tiny_loop([plugin, lrs], model=model, optimizer=opt,
                     scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7))
    loop.fit(max_epochs=8)
    assert model.backbone_used and sorted(lrs.seen) == [3, 4, 5, 6, 7]
    for epoch, (head, backbone) in lrs.seen.items():
        if epoch < 6:
            assert backbone < head
        else:
            assert backbone == head
    assert lrs.seen[3][1] == pytest.approx(0.1 * 0.7**3 * 0.1)
    assert lrs.seen[4][1] == pytest.approx(2 * lrs.seen[3][1])


def test_parameters_already_in_the_optimizer_keep_their_group_and_resume():
    # Lightning test_finetuning_callback_warning: differs on purpose: Lightning warns
    # ("Did you init your optimizer in ...?") and adds nothing; hookloop logs it at INFO,
    # adds nothing, and the run resumes from its checkpoint
    model = BackboneNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = tiny_loop([Freeze("backbone", unfreeze_at_epoch=1)], model=model, optimizer=opt)
    loop.fit(max_epochs=2)
    assert len(opt.param_groups) == 1
    state = loop.state_dict()
    model2 = BackboneNet()
    again = tiny_loop([Freeze("backbone", unfreeze_at_epoch=1)], model=model2,
                      optimizer=torch.optim.SGD(model2.parameters(), lr=0.1))
    again.fit(max_epochs=3, resume=state)
    assert again.state.epoch == 3 and len(again.optimizers[0].param_groups) == 1


def test_freeze_modules_with_and_without_train_bn():
    # Lightning test_freeze_unfreeze_function. Differs on purpose: a frozen BatchNorm is
    # put in eval mode (its running statistics stay, and normalise with them) where
    # Lightning sets track_running_stats=False; make_trainable does not apply (the
    # schedule unfreezes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    freeze_modules(model, [model], train_bn=True)
    assert not model[0].weight.requires_grad and not model[3].weight.requires_grad
    assert model[1].weight.requires_grad and model[1].training and model[1].track_running_stats
    freeze_modules(model, [model], train_bn=False)
    assert not model[1].weight.requires_grad and not model[1].training
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_modules(model, [model[0]])
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    freeze_modules(model, [model[1], model[3]], train_bn=True)
    assert model[1].weight.requires_grad and not model[3].weight.requires_grad


class FiveLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(*(nn.Linear(4, 4, bias=False) for _ in range(5)), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_unfrozen_parameters_join_the_optimizer_with_their_learning_rate():
    # Lightning test_unfreeze_and_add_param_group_function: the new group's rate is a
    # tenth of the first group's by default (initial_denom_lr=10 there, lr_scale=0.1
    # here), or an absolute one (lr=100); parameters the optimizer holds are not added
    model = FiveLayers()
    opt = torch.optim.SGD(model.backbone[0].parameters(), lr=0.01)
    loop = tiny_loop([Freeze(["backbone.0", "backbone.1"], unfreeze_at_epoch=1)], model=model, optimizer=opt)
    loop.fit(max_epochs=2)
    assert len(opt.param_groups) == 2 and opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[1]["lr"] == pytest.approx(0.001)
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(model.backbone[1].weight)]

    model = FiveLayers()
    opt = torch.optim.SGD(model.backbone[0].parameters(), lr=0.01)
    loop = tiny_loop([Freeze("backbone", unfreeze_at_epoch=1, lr=100)], model=model, optimizer=opt)
    loop.fit(max_epochs=2)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 100
    # differs on purpose: with train_bn=False Lightning leaves the BatchNorm out when it
    # unfreezes; hookloop unfreezes the whole group, its BatchNorm included
    bn = model.backbone[5]
    want = [*(model.backbone[i].weight for i in range(1, 5)), bn.weight, bn.bias]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in want]


class SixLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Sequential(*(nn.Linear(4, 4, bias=i % 2 == 1) for i in range(5)), nn.Linear(4, 3))

    def forward(self, x):
        return self.layer(x)


def test_added_param_groups_are_recorded_by_name_and_a_different_schedule_refuses_them():
    # Lightning test_base_finetuning_internal_optimizer_metadata
    model = SixLayers()
    opt = torch.optim.SGD(model.layer[0].parameters(), lr=0.1)
    gu = GradualUnfreeze([f"layer.{i}" for i in range(1, 6)], every_n_epochs=1, start_epoch=0)
    loop = tiny_loop([gu], model=model, optimizer=opt)
    loop.fit(max_epochs=5)
    added = gu.state_dict()["added"]
    assert [a["params"] for a in added] == [["layer.1.weight", "layer.1.bias"], ["layer.2.weight"],
                                            ["layer.3.weight", "layer.3.bias"], ["layer.4.weight"],
                                            ["layer.5.weight", "layer.5.bias"]]
    assert len(opt.param_groups) == 6
    model2 = SixLayers()
    other = GradualUnfreeze([f"layer.{i}" for i in range(1, 5)], every_n_epochs=1)
    again = tiny_loop([("gradual_unfreeze", other)], model=model2,
                      optimizer=torch.optim.SGD(model2.layer[0].parameters(), lr=0.1))
    with pytest.raises(Exception, match="checkpoint has 5 groups; this plugin has 4"):
        again.fit(max_epochs=6, resume=loop.state_dict())


class ConvBlockParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module_dict = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "act": nn.ReLU()})
        self.parent_param = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm2d(4)


def test_parameters_of_parent_modules_are_frozen_too():
    # Lightning test_complex_nested_model (flatten_modules/filter_params are Lightning
    # helpers without a counterpart: does not apply)
    model = nn.Sequential(OrderedDict([("encoder", nn.Sequential(ConvBlockParam())),
                                       ("decoder", nn.Conv2d(4, 2, 3))]))
    frozen = freeze_modules(model, ["encoder"], train_bn=True)
    assert frozen == 4 * 3 * 9 + 4 + 1  # conv weight and bias, parent_param; not the BatchNorm
    assert not model.encoder[0].module_dict["conv"].weight.requires_grad
    assert not model.encoder[0].parent_param.requires_grad
    assert model.encoder[0].bn.weight.requires_grad and model.decoder.weight.requires_grad


class FourLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3))

    def forward(self, x):
        return self.layer(x)


def test_resume_recreates_param_groups_before_the_optimizer_state_loads():
    # Lightning test_callbacks_restore: the optimizer is built from the trainable
    # parameters after freezing (freeze_modules here, freeze_before_training there)
    def build():
        model = FourLayers()
        freeze_modules(model, ["layer.0", "layer.1", "layer.2"])
        opt = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=0.1)
        gu = GradualUnfreeze(["layer.0", "layer.1", "layer.2"], every_n_epochs=1)
        return tiny_loop([gu], model=model, optimizer=opt)

    loop = build()
    loop.fit(max_epochs=2)
    names = {id(p): n for n, p in loop.module.named_parameters()}
    groups = [([names[id(p)] for p in g["params"]], g["lr"], g["momentum"])
              for g in loop.optimizers[0].param_groups]
    assert groups == [(["layer.3.weight", "layer.3.bias"], 0.1, 0),
                      (["layer.0.weight", "layer.0.bias"], pytest.approx(0.01), 0)]
    again = build()
    again.fit(max_epochs=3, resume=loop.state_dict())
    assert len(again.optimizers[0].param_groups) == 3


def test_resume_a_backbone_schedule():
    # Lightning test_callbacks_restore_backbone
    def build():
        model = BackboneNet()
        return tiny_loop([Freeze("backbone", unfreeze_at_epoch=1)], model=model,
                         optimizer=torch.optim.SGD(model.layer.parameters(), lr=0.1))

    loop = build()
    loop.fit(max_epochs=2)
    again = build()
    again.fit(max_epochs=3, resume=loop.state_dict())
    assert again.state.epoch == 3 and len(again.optimizers[0].param_groups) == 2


def test_unsupported_sharding_is_refused():
    # Lightning test_unsupported_strategies (DeepSpeed there; FSDP-sharded models here)
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    model = BackboneNet()
    model.__class__ = type("FSDPBackboneNet", (fsdp.FSDPModule, BackboneNet), {})

    class FakeLoop:
        module = model
        optimizers = ()

    with pytest.raises(NotImplementedError, match="sharded with FSDP"):
        Freeze("backbone").on_fit_start(FakeLoop())
