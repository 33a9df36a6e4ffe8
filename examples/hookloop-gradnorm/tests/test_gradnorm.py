"""Tests of the GradNorm plugin, written with hookloop.testing."""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hookloop_gradnorm import GradNorm, total_norm

from hookloop import hookimpl
from hookloop.testing import HookRecorder, SyncGuard, run_plugin, tiny_loop, tiny_model

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


class GradsSeen:
    """Records, before every optimizer step, the reference gradient norm (computed by
    torch's own clip_grad_norm_ with an infinite limit) at the current global step."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    @hookimpl(trylast=True)
    def on_before_optimizer_step(self, loop: Any, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=math.inf)
        self.norms[loop.state.global_step] = float(norm)


def test_norm_arrives_at_each_log_interval_with_the_measured_value() -> None:
    seen = GradsSeen()
    loop, rec = run_plugin(GradNorm(every_n_steps=4), max_epochs=2, log_every_n_steps=4,
                           plugins=[seen])
    logged = {step: m["grad/norm"] for step, m in rec.logged() if "grad/norm" in m}
    # measured before the steps with global_step 0, 4, 8, 12; each value is reduced at the
    # next log interval, 4 steps later
    assert sorted(logged) == [4, 8, 12, 16]
    for step, value in logged.items():
        assert value == pytest.approx(seen.norms[step - 4], rel=1e-5)
    epoch_means = [m["grad/norm_epoch"] for _, m in rec.logged() if "grad/norm_epoch" in m]
    assert len(epoch_means) == 2
    assert epoch_means[0] == pytest.approx((seen.norms[0] + seen.norms[4]) / 2, rel=1e-5)
    assert loop.state.metrics["grad/norm"] == pytest.approx(logged[16])


def test_compiled_filter_skips_the_plugin_on_other_steps() -> None:
    calls: list[int] = []

    class Counting(GradNorm):
        def measure(self, loop: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
            calls.append(loop.state.global_step)
            return super().measure(loop, optimizer)

    loop, rec = run_plugin(Counting(every_n_steps=3), max_steps=16, log_every_n_steps=4)
    assert calls == [0, 3, 6, 9, 12, 15]
    assert len(rec.of("on_before_optimizer_step")) == 16
    assert "gradnorm  [every 3 steps, on_error=warn]" in loop.pm.format_plan()


def test_the_class_declares_the_hook_for_plugin_listings() -> None:
    # `hookloop plugins` inspects the entry point's class, not an instance
    assert [n for n in dir(GradNorm) if n.startswith("on_")] == ["on_before_optimizer_step"]
    plugin = GradNorm(every_n_steps=7)
    assert plugin.on_before_optimizer_step is not GradNorm.on_before_optimizer_step


def _sync_events(plugins: list[Any]) -> list[tuple[str, int | None, str | None]]:
    loop = tiny_loop(plugins, log_every_n_steps=8)
    with SyncGuard(loop) as guard:
        loop.fit(max_steps=16)
    return [(e.op, e.step, e.stage) for e in guard.events]


def test_adds_no_host_device_sync_even_when_measuring_every_step() -> None:
    baseline = _sync_events([])
    with_plugin = _sync_events([GradNorm(every_n_steps=1)])
    # the norm rides along in the loop's own reductions: the same sync points, no others
    assert with_plugin == baseline
    assert {step for _, step, stage in baseline if stage == "train"} <= {8, 16}


def test_the_recorder_sees_the_metric_on_log_only() -> None:
    _, rec = run_plugin(GradNorm(every_n_steps=2), max_steps=8, log_every_n_steps=8)
    names = [set(c.kwargs["metrics"]) for c in rec.of("on_log")]
    assert {"grad/norm", "train/loss"} in names
    assert isinstance(rec, HookRecorder)


def test_several_optimizers_get_one_metric_each() -> None:
    model = tiny_model()
    first, second = model[0], model[2]
    opts = [torch.optim.SGD(first.parameters(), lr=0.1), torch.optim.SGD(second.parameters(), lr=0.1)]
    _, rec = run_plugin(GradNorm(every_n_steps=1), max_steps=4, log_every_n_steps=4, model=model,
                        optimizer=opts)
    (step, metrics), *_ = rec.logged()
    assert step == 4
    assert {"grad/norm/0", "grad/norm/1"} <= set(metrics)


def test_total_norm_matches_torch() -> None:
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(5))
    c = torch.nn.Parameter(torch.randn(2))  # no gradient: skipped
    a.grad, b.grad = torch.randn(3, 4), torch.randn(5)
    for norm_type in (1.0, 2.0, math.inf):
        expected = torch.nn.utils.clip_grad_norm_([a, b], max_norm=math.inf, norm_type=norm_type)
        assert torch.allclose(total_norm([a, b, c], norm_type), expected)
    assert total_norm([c]) is None


@pytest.mark.parametrize(
    "options",
    [{"every_n_steps": 0}, {"every_n_steps": True}, {"every_n_steps": 2.5}, {"norm_type": 0},
     {"norm_type": -1.0}, {"name": ""}],
)
def test_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GradNorm(**options)


def test_a_failure_warns_and_training_continues(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    plugin = GradNorm(every_n_steps=1)
    monkeypatch.setattr(plugin, "measure", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop, _ = run_plugin(plugin, max_steps=4)
    assert loop.state.global_step == 4
    assert any("gradnorm" in str(w.message) and "boom" in str(w.message) for w in caught)
    assert loop.plugin_failures and loop.plugin_failures[0].startswith("gradnorm: 4 failure(s)")


def test_entry_point_names_the_plugin_class() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    value = meta["project"]["entry-points"]["hookloop"]["gradnorm"]
    module, _, attr = value.partition(":")
    assert getattr(importlib.import_module(module), attr) is GradNorm
