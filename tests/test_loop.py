"""Loop behaviour: optimisation features, control, metrics without syncs, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hookloop import Loop, hookimpl
from hookloop.testing import HookRecorder, SyncGuard, tiny_data, tiny_loop, tiny_model


def _weights(loop: Loop) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loop.module.parameters()]


def test_default_step_learns() -> None:
    loop = tiny_loop(lr=0.05)
    first = loop.validate()["val/loss"]
    loop.fit(max_epochs=5)
    assert loop.state.metrics["val/loss"] < first
    assert loop.state.stop_reason == "max_epochs"
    assert loop.state.global_step == 40 and loop.state.epoch == 5


def test_max_steps_stops_mid_epoch() -> None:
    rec = HookRecorder(["on_train_epoch_end", "on_validation_end"])
    loop = tiny_loop([rec])
    loop.fit(max_steps=11)
    assert loop.state.global_step == 11 and loop.state.stop_reason == "max_steps"
    assert len(rec.of("on_train_epoch_end")) == 2  # the partial epoch is closed normally
    assert len(rec.of("on_validation_end")) == 2


def test_grad_accumulation_equals_large_batch() -> None:
    data = tiny_data(64, 8)
    big = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(data[::2], data[1::2])]
    a = tiny_loop(train_data=data, grad_accum=2, optimizer=None, lr=0.1)
    b = tiny_loop(train_data=big, lr=0.1)
    a.fit(max_epochs=2)
    b.fit(max_epochs=2)
    assert a.state.global_step == b.state.global_step == 8
    for x, y in zip(_weights(a), _weights(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_schedulers_step_per_interval() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loop = tiny_loop(model=model, optimizer=opt, scheduler=sched)
    loop.fit(max_epochs=3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loop = tiny_loop(model=model, optimizer=opt, scheduler=sched, scheduler_interval="step")
    loop.fit(max_steps=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 16)

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    with pytest.raises(ValueError, match=r"scheduler_monitor.*available: \['train/loss_epoch', 'val/acc'"):
        tiny_loop(model=model, optimizer=opt, scheduler=plateau).fit(max_epochs=1)


def test_gradient_clipping_bounds_the_update() -> None:
    seen = []

    class Norm:
        def on_before_optimizer_step(self, loop, optimizer):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    tiny_loop([Norm()], grad_clip_norm=0.01, lr=10.0).fit(max_steps=3)
    assert all(n <= 0.01 + 1e-6 for n in seen)
    seen.clear()
    tiny_loop([Norm()], grad_clip_value=1e-4).fit(max_steps=2)
    assert seen and all(n <= 1e-4 * math.sqrt(200) for n in seen)


def test_bf16_autocast_on_cpu() -> None:
    dtypes = []

    class Probe:
        def on_train_batch_end(self, loop, batch):
            with loop.autocast():
                dtypes.append(loop.module(batch[0]).dtype)

    loop = tiny_loop([Probe()], precision="bf16-mixed")
    loop.fit(max_steps=2)
    assert dtypes == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in loop.module.parameters())
    with pytest.raises(ValueError, match="'16-mixed' needs a CUDA device"):
        tiny_loop(precision="16-mixed")


def test_control_stop_stop_epoch_skip_step() -> None:
    class Stopper:
        def on_train_batch_end(self, loop, batch_idx):
            if loop.state.global_step == 5:
                loop.request_stop("enough")

    rec = HookRecorder(["on_fit_end"])
    loop = tiny_loop([Stopper(), rec])
    loop.fit(max_epochs=10)
    assert loop.state.stop_reason == "enough" and loop.state.global_step == 5
    assert rec.names() == ["on_fit_end"]

    class Halves:
        def on_train_batch_start(self, loop, batch_idx):
            if batch_idx == 4:
                loop.stop_epoch()

    loop = tiny_loop([Halves()])
    loop.fit(max_epochs=3)
    assert loop.state.global_step == 12  # 4 batches per epoch

    class SkipOdd:
        def on_before_optimizer_step(self, loop):
            if loop.state.batch_idx % 2:
                loop.skip_optimizer_step()

    before = _weights(tiny_loop())
    loop = tiny_loop([SkipOdd()])
    loop.fit(max_epochs=1)
    assert loop.state.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(loop)))


def test_nan_loss_reaches_plugins() -> None:
    losses = []

    class Watch:
        def on_train_batch_end(self, outputs):
            losses.append(outputs["loss"])

    def nan_loss(out, y):
        return nn.functional.cross_entropy(out, y) * float("nan")

    loop = tiny_loop([Watch()], loss_fn=nan_loss, val_data=None)
    loop.fit(max_steps=4)
    assert len(losses) == 4 and all(torch.isnan(t) for t in losses)
    assert math.isnan(loop.state.metrics["train/loss"])


def test_custom_step_fn_and_manual_optimization() -> None:
    def step(loop, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(loop.model(x), y)
        loop.log("train/custom", loss)
        return {"loss": loss, "n": len(x)}

    rec = HookRecorder(["on_train_batch_end"])
    loop = tiny_loop([rec], step_fn=step)
    loop.fit(max_steps=4)
    assert rec.calls[0].kwargs["outputs"]["n"] == 8
    assert "train/custom" in loop.state.metrics

    # GAN-like: two optimizers driven by the step function
    gen, disc = tiny_model(1), tiny_model(2)
    model = nn.ModuleDict({"g": gen, "d": disc})
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)

    def gan_step(loop, batch):
        x, y = batch
        d_loss = nn.functional.cross_entropy(loop.model["d"](x), y)
        loop.backward(d_loss)
        loop.optimizer_step(opt_d)
        g_loss = -nn.functional.cross_entropy(loop.model["d"](loop.model["g"](x)[:, :1].expand(-1, 4)), y)
        loop.backward(g_loss)
        loop.optimizer_step(opt_g)
        loop.log("d_loss", d_loss)
        return {"d_loss": d_loss.detach()}

    before = [p.clone() for p in model.parameters()]
    gan = Loop(model, [opt_g, opt_d], tiny_data(), step_fn=gan_step, manual_optimization=True,
               autoload=False)
    gan.fit(max_epochs=1)
    assert gan.state.global_step == 8
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(gan.state_dict()["optimizers"]) == 2


def test_step_fn_returning_none_skips_optimisation() -> None:
    loop = tiny_loop(step_fn=lambda loop, batch: None)
    before = _weights(loop)
    loop.fit(max_epochs=1)
    assert loop.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(loop)))


# ------------------------------------------------------------ metrics and syncs


def test_no_host_device_sync_on_steps_that_do_not_log() -> None:
    rec = HookRecorder()
    loop = tiny_loop([rec], log_every_n_steps=4, grad_clip_norm=1.0)
    with SyncGuard(loop) as guard:
        loop.fit(max_epochs=2)
    train_syncs = [e for e in guard.events if e.stage == "train"]
    # one reduction per log interval (steps 4, 8, ..., 16) plus one per epoch end
    assert {e.step for e in train_syncs} <= {4, 8, 12, 16}
    assert all(e.op == "tolist" for e in train_syncs)
    assert len(train_syncs) == 4 + 2
    assert [s for s, m in rec.logged() if "train/loss" in m] == [4, 8, 12, 16]


def test_sync_guard_sees_a_sync() -> None:
    class Syncing:
        def on_train_batch_end(self, outputs):
            outputs["loss"].item()

    loop = tiny_loop([Syncing()], log_every_n_steps=1000)
    with SyncGuard(loop) as guard:
        loop.fit(max_steps=3)
    assert [(e.op, e.step) for e in guard.events if e.stage == "train"][:3] == [
        ("item", 1), ("item", 2), ("item", 3)]
    with SyncGuard() as guard:
        t = torch.ones(2)
        bool(t.sum())
        float(t[0])
        t.tolist()
        t.numpy()
        t.to("cpu")
        t.to(device="cpu")
        t.to(t.device)  # device-agnostic code moving a tensor where it already is
    assert [e.op for e in guard.events] == ["__bool__", "__float__", "tolist", "numpy", "to", "to"]


def test_log_reduces_means_per_interval_and_epoch() -> None:
    class Counter:
        def on_train_batch_end(self, loop, batch_idx):
            loop.log("idx", torch.tensor(float(batch_idx)))
            loop.log("const", 2)

    rec = HookRecorder(["on_log"])
    loop = tiny_loop([Counter(), rec], val_data=None, log_every_n_steps=4)
    loop.fit(max_epochs=1)
    logs = rec.logged()
    assert logs[0] == (4, {"const": 2.0, "idx": 1.5, "train/loss": logs[0][1]["train/loss"]})
    assert logs[1][1]["idx"] == 5.5
    assert logs[2][1]["idx_epoch"] == 3.5 and logs[2][1]["const_epoch"] == 2.0


def test_log_rejects_bad_values() -> None:
    loop = tiny_loop()
    with pytest.raises(ValueError, match=r"loop.log\('x'\): expected a scalar, got a tensor of shape \(3,\)"):
        loop.log("x", torch.ones(3))
    with pytest.raises(TypeError, match=r"loop.log\('y'\): expected a tensor or a number; got 'abc'"):
        loop.log("y", "abc")


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_epochs": 0}, r"max_epochs must be a positive int; got 0"),
        ({"max_epochs": -2}, r"max_epochs must be a positive int; got -2"),
        ({}, r"exactly one of max_epochs or max_steps; got max_epochs=None, max_steps=None"),
        ({"max_epochs": 1, "max_steps": 3}, r"exactly one of max_epochs or max_steps; got max_epochs=1"),
        ({"max_steps": 0}, r"max_steps must be a positive int; got 0"),
    ],
)
def test_fit_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_loop().fit(**kwargs)


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_log_every_n_steps_must_be_positive(value) -> None:
    with pytest.raises(ValueError, match=f"log_every_n_steps must be a positive int; got {value}"):
        tiny_loop(log_every_n_steps=value)


def test_non_scalar_loss_is_rejected() -> None:
    loop = tiny_loop(loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match=r"scalar loss tensor; got \(8,\)"):
        loop.fit(max_epochs=1)


def test_optimizer_without_model_params_is_rejected() -> None:
    model = tiny_model()
    other = torch.optim.SGD(tiny_model(1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer\[0\] \(SGD\) holds none of the model's parameters"):
        Loop(model, other, tiny_data(), loss_fn=nn.functional.cross_entropy, autoload=False)


def test_other_bad_input() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module; got str"):
        Loop("model", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give loss_fn"):
        Loop(tiny_model(), None, tiny_data(), autoload=False)
    with pytest.raises(ValueError, match="precision='fp8'"):
        tiny_loop(precision="fp8")
    with pytest.raises(TypeError, match=r"expects batches \(input, target, ...\); got Tensor"):
        tiny_loop(train_data=[torch.ones(2, 4)]).fit(max_epochs=1)


def test_validate_standalone() -> None:
    rec = HookRecorder(["on_validation_start", "on_validation_end", "on_log"])
    loop = tiny_loop([rec])
    metrics = loop.validate()
    assert set(metrics) == {"val/loss", "val/acc"}
    assert rec.names() == ["on_validation_start", "on_validation_end", "on_log"]
    assert loop.module.training


def test_hookimpl_marked_and_plain_methods_both_work() -> None:
    seen = []

    class Marked:
        @hookimpl(trylast=True)
        def on_fit_start(self):
            seen.append("marked")

    class Plain:
        def on_fit_start(self):
            seen.append("plain")

    tiny_loop([Marked(), Plain()]).fit(max_steps=1)
    assert seen == ["plain", "marked"]


def test_plateau_scheduler_with_validation_every_other_epoch() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    loop = tiny_loop(model=model, optimizer=opt, scheduler=plateau, scheduler_monitor="val/loss",
                     val_every_n_epochs=2)
    loop.fit(max_epochs=4)  # epochs 0 and 2 have no validation: the scheduler waits
    assert plateau.last_epoch == 2


def test_unfinished_accumulation_window_is_dropped_at_epoch_end(caplog: pytest.LogCaptureFixture) -> None:
    grads_at_epoch_end = []

    class Probe:
        def on_train_epoch_end(self, loop):
            grads_at_epoch_end.append([p.grad for p in loop.module.parameters()])

    data = tiny_data(64, 8)
    loop = tiny_loop([Probe()], train_data=OncePerEpoch(data), grad_accum=3)
    loop.fit(max_epochs=2)  # 8 batches, no len: windows of 3, 3 and an unfinished 2
    assert loop.state.global_step == 4
    assert all(g is None for grads in grads_at_epoch_end for g in grads)
    assert "2 micro-batch(es) of an unfinished accumulation window dropped" in caplog.text


class OncePerEpoch:
    """An iterable without len(), like a streaming dataset."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_validation_hooks_see_no_grad_and_a_failed_validation_restores_the_loop() -> None:
    seen = []

    class Probe:
        def on_validation_start(self):
            seen.append(torch.is_grad_enabled())

    def bad_val_step(loop, batch):
        loop.log("val/x", 1.0)
        raise RuntimeError("val broke")

    loop = tiny_loop([Probe()], val_step_fn=bad_val_step)
    with pytest.raises(RuntimeError, match="val broke"):
        loop.validate()
    assert seen == [False]
    assert loop.module.training and loop.state.stage == "idle"
    loop.log("train/y", 1.0)
    assert "train/y" in loop.metrics.pending and not loop.metrics.val_pending


def test_on_exception_wrappers_run_and_a_plugin_exit_does_not_replace_the_crash() -> None:
    calls = []

    class Wrap:
        @hookimpl(wrapper=True)
        def on_exception(self, exception):
            calls.append(("before", str(exception)))
            yield
            calls.append("after")

    class Exits:
        def on_exception(self):
            raise SystemExit(3)

    class Crash:
        def on_train_batch_start(self):
            raise RuntimeError("original")

    with pytest.raises(RuntimeError, match="original"):
        tiny_loop([Wrap(), Exits(), Crash()]).fit(max_epochs=1)
    assert calls == [("before", "original"), "after"]
