"""How long the loop is blocked per checkpoint save, synchronous vs async, with the
``checkpoint`` plugin (hookloop-checkpoint) on a model of at least 100 MB.

Each epoch is one batch whose step sleeps (simulated work that gives an async writer
time to finish), and the plugin saves at every epoch end. The stall of one save is
the gap between the end of an epoch's batches and the first batch of the next epoch,
minus the same gap measured without the plugin. The async save's time to drain at the
end of fit is reported too.

Run alone: ``python benchmarks/checkpoint_stall.py [--device cpu|cuda] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import Target, log, summarize
from torch import nn


class GapClock:
    """One batch per pass; records when each pass starts and when its batch is done."""

    def __init__(self, batch: Any, device: torch.device) -> None:
        self.batch = batch
        self.device = device
        self.starts: list[float] = []
        self.ends: list[float] = []

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Any]:
        self.starts.append(time.perf_counter())
        yield self.batch
        benchlib.sync(self.device)
        self.ends.append(time.perf_counter())

    def gaps(self) -> list[float]:
        """Seconds between the end of each pass and the start of the next."""
        return [s - e for e, s in zip(self.ends, self.starts[1:])]


def big_model(mb: float, device: torch.device) -> nn.Module:
    """A stack of square Linear layers holding about ``mb`` MB of float32 weights."""
    width = 2048 if mb >= 16 else 256
    per_layer = (width * width + width) * 4 / 2**20
    layers = max(1, round(mb / per_layer))
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i == 0:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(device)


def _measure(model: nn.Module, batch: Any, plugins: list[Any], saves: int, work_s: float,
             device: torch.device) -> dict[str, Any]:
    clock = GapClock(batch, device)

    def step(loop: Any, b: Any) -> None:
        time.sleep(work_s)

    loop = benchlib.hookloop_loop(model, clock, plugins=plugins, step_fn=step)
    t0 = time.perf_counter()
    loop.fit(max_epochs=saves + 1)
    total = time.perf_counter() - t0
    return {"gaps": clock.gaps(), "fit_end_s": t0 + total - clock.ends[-1]}


def run(device: torch.device, quick: bool, root: Path) -> dict[str, Any]:
    """Baseline, sync and async runs; returns the JSON-ready result with its target."""
    from hookloop.plugins import available_plugins

    entry = available_plugins().get("checkpoint")
    reason = None
    if entry is None:
        reason = "the checkpoint plugin (hookloop-checkpoint) is not installed"
    elif entry.error:
        reason = f"the checkpoint plugin failed to import: {entry.error}"
    target_mb = 4.0 if quick else 110.0
    saves = 2 if quick else 6
    out: dict[str, Any] = {"model_mb": target_mb, "saves": saves, "modes": {}}
    if reason is not None:
        out["skipped"] = reason
        out["targets"] = [Target("async checkpoint stall vs sync", None, 20.0, "% of sync stall", reason)
                          .as_dict()]
        return out
    model = big_model(target_mb, device)
    out["model_mb"] = benchlib.param_bytes(model) / 2**20
    batch = torch.zeros(1, model[0].in_features, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh() -> nn.Module:
        model.load_state_dict(state)
        return model

    log(f"checkpoint: {out['model_mb']:.0f} MB model, {saves} saves per mode")
    base = _measure(fresh(), batch, [], saves, 0.0, device)
    base_gap = statistics.median(base["gaps"])
    out["baseline_gap_ms"] = base_gap * 1e3
    work = 0.01
    errors = {}
    for mode, flag in (("sync", False), ("async", True)):
        plugin = ("checkpoint", {"dirpath": str(benchlib.fresh_dir(root, f"ckpt-{mode}")),
                                 "every_n_epochs": 1, "async_save": flag})
        try:
            m = _measure(fresh(), batch, [plugin], saves, work, device)
        except Exception as exc:
            errors[mode] = f"{type(exc).__name__}: {exc}"
            log(f"checkpoint: {mode} failed: {errors[mode]}")
            continue
        stalls = [g - base_gap for g in m["gaps"]]
        out["modes"][mode] = {"stall_ms": summarize(stalls, 1e3), "fit_end_ms": m["fit_end_s"] * 1e3,
                              "work_per_epoch_ms": work * 1e3}
        if mode == "sync":
            # let the async writer finish between saves: twice a synchronous save
            work = max(0.02, 2 * statistics.median(stalls))
    if errors:
        out["errors"] = errors
    sync_ms = out["modes"].get("sync", {}).get("stall_ms", {}).get("median")
    async_ms = out["modes"].get("async", {}).get("stall_ms", {}).get("median")
    ratio = 100.0 * async_ms / sync_ms if sync_ms and async_ms is not None else None
    out["ratio_pct"] = ratio
    note = f"{out['model_mb']:.0f} MB model"
    if out["model_mb"] < 100:
        note += "; below 100 MB (smoke size)"
    if errors:
        note += "; " + "; ".join(f"{k}: {v[:80]}" for k, v in errors.items())
    target = Target("async checkpoint stall vs sync", ratio, 20.0, "% of sync stall", note)
    out["targets"] = [target.as_dict()]
    return out


def report(result: dict[str, Any]) -> str:
    """Printed figures of this script, target last."""
    lines = [f"checkpoint stall per save ({result['model_mb']:.0f} MB model, {result['saves']} saves)"]
    if result.get("skipped"):
        lines.append(f"  skipped: {result['skipped']}")
    for mode, m in result["modes"].items():
        s = m["stall_ms"]
        lines.append(f"  {mode:>5}: median {s['median']:.1f} ms (p25 {s['p25']:.1f}, p75 {s['p75']:.1f}); "
                     f"fit end wait {m['fit_end_ms']:.1f} ms")
    if result.get("ratio_pct") is not None:
        lines.append(f"  async / sync: {result['ratio_pct']:.1f} %")
    lines.append("targets:")
    lines += [Target(**{k: t[k] for k in ("name", "value", "limit", "unit", "note")}).line()
              for t in result["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--out", type=Path, help="folder for checkpoint.json and the plot")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = args.out.resolve() if args.out else None
    with benchlib.sandbox() as root:
        result = run(device, args.quick, root)
    result["machine"] = benchlib.machine_info(device)
    if out is not None:
        benchlib.write_json(out / "checkpoint.json", result)
        import plots

        plots.plot_checkpoint(result, out)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
