"""Tests of the model summary: figures, printing, trackers, no side effects,
multi-input and dict forwards, and the parameter-count fallback."""

from __future__ import annotations

import pytest
import torch
from hookloop_summary import Summary, side_effect_free, summarize
from torch import nn

from hookloop.plugins import available_plugins, hookimpl
from hookloop.testing import HookRecorder, tiny_data, tiny_loop


class Noisy(nn.Module):
    """Draws random numbers and bumps a buffer in every forward, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x + 0.0 * torch.rand_like(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                                      Noisy())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_figures_of_the_summary():
    model = Net()
    model.backbone[0].weight.requires_grad_(False)
    s = summarize(model, torch.randn(8, 4))
    assert s.note is None
    assert s.total_params == sum(p.numel() for p in model.parameters()) == 4 * 16 + 16 + 32 + 16 * 3 + 3
    assert s.non_trainable_params == 64 and s.trainable_params == s.total_params - 64
    assert s.input_shapes == [[8, 4]]
    assert s.input_size_mb >= 8 * 4 * 4 / 1e6
    assert s.params_size_mb == pytest.approx(s.total_params * 4 / 1e6)
    assert s.forward_backward_size_mb > 0
    assert s.total_size_mb == pytest.approx(s.input_size_mb + s.forward_backward_size_mb + s.params_size_mb)
    assert s.mult_adds >= 8 * (4 * 16 + 16 * 3)  # at least the two linear layers
    assert s.mult_adds == sum(r.mult_adds or 0 for r in s.layers)
    rows = {r.name: r for r in s.layers}
    assert rows["backbone.0"].type == "Linear" and rows["backbone.0"].output_shape == [8, 16]
    assert rows["head"].num_params == 51 and rows["head"].depth == 1
    assert rows["backbone"].mult_adds is None and rows["backbone.1"].depth == 2
    for label in ("Total params", "Trainable params", "Non-trainable params", "Input size (MB)",
                  "Forward/backward pass size (MB)", "Params size (MB)", "Estimated Total Size (MB)",
                  "Total mult-adds (M)", "Output Shape", "Mult-Adds", "Linear"):
        assert label in s.text
    assert summarize(model, torch.randn(8, 4), depth=1, mult_adds=False).layers[-1].name == "head"
    assert "Mult-Adds" not in summarize(model, torch.randn(8, 4), mult_adds=False).text
    assert s.as_dict()["total_params"] == s.total_params


def test_summarize_leaves_no_trace():
    model = Net()
    model.train()
    model.head.eval()
    before = _weights(model)
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()
    summarize(model, x)
    summarize(model, input_size=(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and model.backbone[1].training and not model.head.training


def test_side_effect_free_restores_grads():
    model = Net()
    model(torch.randn(8, 4)).sum().backward()
    grad = model.head.weight.grad.clone()
    mean = model.backbone[1].running_mean.clone()
    with side_effect_free(model):
        model.head.weight.grad = None
        model.backbone[1].running_mean.add_(1)
    assert torch.equal(model.head.weight.grad, grad)
    assert torch.equal(model.backbone[1].running_mean, mean)


def test_plugin_prints_returns_and_logs_at_fit_start(capsys):
    rec = HookRecorder(["on_log_text", "on_train_batch_start"])
    plugin = Summary()
    loop = tiny_loop([plugin, rec], model=Net())
    loop.fit(max_epochs=1)
    s = plugin.summary
    assert s is not None and s.note is None and s.input_shapes == [[8, 4]]
    names = rec.names()
    assert names[0] == "on_log_text" and names.count("on_log_text") == 1
    assert rec.calls[0].kwargs["name"] == "model/summary" and rec.calls[0].kwargs["text"] == s.text
    assert s.text in capsys.readouterr().out
    loop.fit(max_epochs=2)  # a later fit does not summarise again
    assert rec.names().count("on_log_text") == 1


def test_given_input_size_summarises_before_the_first_batch():
    rec = HookRecorder(["on_log_text", "on_fit_start", "on_train_batch_start"])
    plugin = Summary(input_size=(1, 4), print_fn=None)
    tiny_loop([plugin, rec], model=Net()).fit(max_epochs=1)
    assert rec.names()[:3] == ["on_log_text", "on_fit_start", "on_train_batch_start"]
    assert plugin.summary.input_shapes == [[1, 4]]


def test_run_with_summary_is_bit_identical_to_run_without():
    def run(plugins):
        loop = tiny_loop(plugins, model=Net())
        loop.fit(max_epochs=2)
        return _weights(loop.module), torch.get_rng_state()

    with_summary = run([Summary(print_fn=None)])
    without = run([])
    assert with_summary[0].keys() == without[0].keys()
    assert all(torch.equal(with_summary[0][k], without[0][k]) for k in without[0])
    assert int(without[0]["backbone.4.calls"]) == 2 * 8 + 2 * 4  # train + val batches
    assert torch.equal(with_summary[1], without[1])


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(2, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x, z):
        return self.out(self.a(x) + self.b(z))


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, batch):
        return self.a(batch["x"])


class Kwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, *, features, scale=1.0):
        return self.a(features) * scale


def test_multi_input_dict_and_keyword_forwards():
    s = summarize(TwoInputs(), (torch.randn(5, 4), torch.randn(5, 2)))
    assert s.note is None and s.input_shapes == [[5, 4], [5, 2]] and s.total_params == 40 + 24 + 27
    s = summarize(DictInput(), ({"x": torch.randn(5, 4)},))
    assert s.note is None and s.layers[0].output_shape == [5, 3]
    s = summarize(Kwargs(), {"features": torch.randn(5, 4), "scale": 2.0})
    assert s.note is None and s.layers[0].output_shape == [5, 3]


def test_plugin_with_multi_input_and_dict_batches():
    data = [((x, x[:, :2]), y) for x, y in tiny_data()]

    def step(loop, batch):
        (x, z), y = batch
        return nn.functional.cross_entropy(loop.model(x, z), y)

    plugin = Summary(input_fn=lambda b: tuple(b[0]), print_fn=None)
    model = TwoInputs()
    tiny_loop([plugin], model=model, train_data=data, step_fn=step, val_data=None).fit(max_epochs=1)
    assert plugin.summary.note is None and plugin.summary.input_shapes == [[8, 4], [8, 2]]

    data = [{"x": x, "y": y} for x, y in tiny_data()]

    def dstep(loop, batch):
        return nn.functional.cross_entropy(loop.model(batch), batch["y"])

    plugin = Summary(print_fn=None)
    tiny_loop([plugin], model=DictInput(), train_data=data, step_fn=dstep, val_data=None).fit(max_epochs=1)
    assert plugin.summary.note is None and plugin.summary.layers[0].output_shape == [8, 3]


def test_fallback_to_parameter_counts_with_a_note():
    model = Net()
    s = summarize(model)
    assert "no input given" in s.note and s.total_params == 163 and s.input_size_mb is None
    s = summarize(model, torch.randn(8, 7))
    assert s.note.startswith("forward pass failed: RuntimeError") and s.total_params == 163
    assert "Total params: 163" in s.text and "parameter counts only" in s.text
    assert [r.name for r in s.layers][:2] == ["backbone", "backbone.0"]

    rec = HookRecorder(["on_log_text"])
    plugin = Summary(input_size=(2, 9), print_fn=None)
    loop = tiny_loop([plugin, rec], model=Net())
    loop.fit(max_epochs=1)  # training itself is unaffected
    assert "Note: forward pass failed" in rec.calls[0].kwargs["text"]


def test_rank_zero_only_and_entry_point():
    assert Summary.hookloop_rank_zero_only is True
    assert available_plugins(refresh=True)["summary"].obj is Summary
    loop = tiny_loop([("summary", {"print_fn": None})])
    loop.fit(max_epochs=1)
    assert loop.get_plugin("summary").summary.total_params == 4 * 16 + 16 + 16 * 3 + 3


def test_summary_counts_frozen_parameters_after_freezing():
    class Freezer:
        hookloop_name = "freeze"

        @hookimpl
        def on_fit_start(self, loop):
            for p in loop.module.backbone.parameters():
                p.requires_grad_(False)

    plugin = Summary(input_size=(2, 4), print_fn=None)
    tiny_loop([plugin, Freezer()], model=Net()).fit(max_epochs=1)
    assert plugin.summary.trainable_params == 51
