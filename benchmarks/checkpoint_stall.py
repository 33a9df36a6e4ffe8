"""How long the loop is blocked per checkpoint save, synchronous vs async, with the
``checkpoint`` plugin (hookloop-checkpoint) on about 100 MB of state, against the
floor of a plain memory copy of the same bytes.

Each epoch is one batch whose step sleeps (simulated work that gives an async writer
time to finish), and the plugin saves at every epoch end. The stall of one save is
the gap between the end of an epoch's batches and the first batch of the next epoch,
minus the same gap measured without the plugin. The async save's time to drain at the
end of fit is reported too.

The floor: copying every tensor of the model's state into a preallocated, already
touched CPU buffer (no allocation, no page faults; from the GPU on CUDA). An async
save must at least take that copy on the training thread; the target is an async
stall of at most twice the floor. The machine's memory bandwidth moves between
seconds (on the shared VM this was measured on, the same copy took 13 to 80 ms within
one run), so each async save is paired with a floor copy made in the same step, just
before it: the step sleeps, copies the state into the floor's buffer (timed), idles
``PAUSE_S``, and the save follows at the epoch's end. The target is the median over
the saves after the first of stall / that floor, with its spread; the first save,
which allocates the staging buffer and faults its pages in, is reported apart, and so
is the floor timed back to back before the runs. Every figure is the median with its
spread (min..max over saves or repetitions).

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


class Floor:
    """A preallocated, already touched CPU buffer for every tensor of ``state`` (the
    same bytes, tensor by tensor); :meth:`copy` copies the state into it once and
    returns the seconds taken."""

    def __init__(self, state: dict[str, Any], device: torch.device) -> None:
        tensors = [t.detach() for t in state.values() if isinstance(t, torch.Tensor)]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.device = device
        dst = torch.empty(self.nbytes, dtype=torch.uint8)
        dst.fill_(1)  # touch every page
        self.pairs, off = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            self.pairs.append((dst[off:off + n], t.contiguous().reshape(-1).view(torch.uint8)))
            off += n
        self.copy()  # warm-up

    def copy(self) -> float:
        """Copy the state into the buffer once; seconds."""
        benchlib.sync(self.device)
        t0 = time.perf_counter()
        for d, src in self.pairs:
            d.copy_(src)
        benchlib.sync(self.device)
        return time.perf_counter() - t0


def memcpy_floor(state: dict[str, Any], repeats: int, device: torch.device) -> dict[str, Any]:
    """Seconds to copy every tensor of ``state`` into one preallocated, already touched
    CPU buffer, over ``repeats`` timed repetitions back to back after one untimed
    warm-up copy. Returns the stats in ms and the byte count."""
    floor = Floor(state, device)
    times = [floor.copy() for _ in range(repeats)]
    return {"ms": summarize(times, 1e3), "bytes": floor.nbytes, "repeats": repeats}


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


PAUSE_S = 0.05  # idle between the paired floor copy and the save
ASYNC_ROUNDS = 5  # fits with async saves (one with sync saves)


def _measure(model: nn.Module, batch: Any, plugins: list[Any], saves: int, work_s: float,
             device: torch.device, floor: Floor | None = None) -> dict[str, Any]:
    """One fit of ``saves + 1`` one-batch epochs whose step sleeps ``work_s``; with
    ``floor``, each step ends with one floor copy, then ``PAUSE_S`` of idle, so that
    each save at the epoch's end has a floor measured just before it."""
    clock = GapClock(batch, device)
    floors: list[float] = []

    def step(loop: Any, b: Any) -> None:
        time.sleep(work_s)
        if floor is not None:
            floors.append(floor.copy())
            time.sleep(PAUSE_S)

    loop = benchlib.hookloop_loop(model, clock, plugins=plugins, step_fn=step)
    t0 = time.perf_counter()
    loop.fit(max_epochs=saves + 1)
    total = time.perf_counter() - t0
    return {"gaps": clock.gaps(), "fit_end_s": t0 + total - clock.ends[-1], "floors": floors}


def run(device: torch.device, quick: bool, root: Path) -> dict[str, Any]:
    """Baseline, sync and async runs; returns the JSON-ready result with its target."""
    from hookloop.plugins import available_plugins

    entry = available_plugins().get("checkpoint")
    reason = None
    if entry is None:
        reason = "the checkpoint plugin (hookloop-checkpoint) is not installed"
    elif entry.error:
        reason = f"the checkpoint plugin failed to import: {entry.error}"
    target_mb = 4.0 if quick else 100.0
    saves = 2 if quick else 8
    out: dict[str, Any] = {"model_mb": target_mb, "saves": saves, "modes": {}}
    if reason is None and benchlib.out_of_time(20.0):
        reason = "not run: time budget"
    if reason is not None:
        out["skipped"] = reason
        out["targets"] = [Target(TARGET, None, LIMIT, "x memcpy", reason).as_dict()]
        return out
    model = big_model(target_mb, device)
    out["model_mb"] = benchlib.param_bytes(model) / 2**20
    batch = torch.zeros(1, model[0].in_features, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    floor = memcpy_floor(model.state_dict(), 3 if quick else 9, device)
    paired_floor = Floor(model.state_dict(), device)
    out["memcpy"] = floor
    log(f"checkpoint: memcpy floor {floor['ms']['median']:.1f} ms for {floor['bytes'] / 2**20:.0f} MB")

    def fresh() -> nn.Module:
        model.load_state_dict(state)
        return model

    log(f"checkpoint: {out['model_mb']:.0f} MB model, {saves} saves per mode")
    base = _measure(fresh(), batch, [], saves, 0.0, device)
    base_gap = statistics.median(base["gaps"])
    out["baseline_gap_ms"] = base_gap * 1e3
    work = 0.01
    errors = {}
    rounds = 1 if quick else ASYNC_ROUNDS
    for mode, flag in (("sync", False), ("async", True)):
        stalls: list[float] = []
        round_x: list[float] = []  # per round: median over its later saves of stall / floor
        firsts: list[float] = []
        floors: list[float] = []
        fit_end = []
        try:
            for r in range(rounds if flag else 1):
                plugin = ("checkpoint", {"dirpath": str(benchlib.fresh_dir(root, f"ckpt-{mode}-{r}")),
                                         "every_n_epochs": 1, "async_save": flag,
                                         "filename": "{epoch:03d}-{step}"})
                m = _measure(fresh(), batch, [plugin], saves, work, device, paired_floor if flag else None)
                st = [g - base_gap for g in m["gaps"]]
                stalls += st
                fit_end.append(m["fit_end_s"])
                if flag:  # each save over the floor copy made just before it
                    ratios = [a / f for a, f in zip(st, m["floors"], strict=False)]
                    firsts.append(ratios[0])
                    round_x.append(statistics.median(ratios[1:]) if len(ratios) > 1 else ratios[0])
                    floors += m["floors"][1:len(ratios)]
        except Exception as exc:
            errors[mode] = f"{type(exc).__name__}: {exc}"
            log(f"checkpoint: {mode} failed: {errors[mode]}")
            continue
        out["modes"][mode] = {"stall_ms": summarize(stalls, 1e3),
                              "fit_end_ms": statistics.median(fit_end) * 1e3, "work_per_epoch_ms": work * 1e3}
        if flag:
            out["paired"] = {"rounds": len(round_x), "later_x": benchlib.over_rounds(round_x),
                             "first_x": benchlib.over_rounds(firsts), "floor_ms": summarize(floors, 1e3),
                             "pause_ms": PAUSE_S * 1e3}
        if mode == "sync":
            # let the async writer finish between saves: twice a synchronous save
            work = max(0.02, 2 * statistics.median(stalls))
    if errors:
        out["errors"] = errors
    sync_ms = out["modes"].get("sync", {}).get("stall_ms", {}).get("median")
    async_ms = out["modes"].get("async", {}).get("stall_ms", {}).get("median")
    out["ratio_pct"] = 100.0 * async_ms / sync_ms if sync_ms and async_ms is not None else None
    # the target: each save after the first over the floor copied just before it (the
    # first save allocates the staging buffer and faults its pages in: reported apart),
    # the median of each round, then the median over rounds with their spread
    paired = out.get("paired")
    later = paired["later_x"] if paired else {}
    ratio = later.get("median")
    out["async_over_memcpy"] = ratio
    spread = (later["min"], later["max"]) if ratio is not None else None
    note = (f"{floor['bytes'] / 2**20:.0f} MiB of state; each save after the first over a memcpy just "
            f"before it; spread over {later.get('n', 0)} rounds of {saves} saves")
    if paired:
        note += f"; the first save (allocates the staging buffer) {paired['first_x']['median']:.1f}x"
    if quick:
        note += "; smoke size"
    if errors:
        note += "; " + "; ".join(f"{k}: {v[:80]}" for k, v in errors.items())
    out["targets"] = [Target(TARGET, ratio, LIMIT, "x memcpy", note, spread).as_dict()]
    return out


TARGET = "async checkpoint stall, 100 MB of state, over a memcpy of the same bytes"
LIMIT = 2.0


def report(result: dict[str, Any]) -> str:
    """Printed figures of this script, target last."""
    lines = [f"checkpoint stall per save ({result['model_mb']:.0f} MB model, {result['saves']} saves; "
             "median [min..max])"]
    if result.get("skipped"):
        lines.append(f"  NOT RUN: {result['skipped']}")
    if result.get("memcpy"):
        f = result["memcpy"]["ms"]
        lines.append(f"  memcpy floor: {f['median']:.1f} ms [{f['min']:.1f}..{f['max']:.1f}] for "
                     f"{result['memcpy']['bytes'] / 2**20:.0f} MB into a preallocated, touched buffer")
    for mode, m in result["modes"].items():
        s = m["stall_ms"]
        lines.append(f"  {mode:>5}: stall {s['median']:.1f} ms [{s['min']:.1f}..{s['max']:.1f}]; "
                     f"fit end wait {m['fit_end_ms']:.1f} ms")
    if result.get("ratio_pct") is not None:
        lines.append(f"  async / sync: {result['ratio_pct']:.1f} %")
    if result.get("paired"):
        p = result["paired"]
        later, first, fl = p["later_x"], p["first_x"], p["floor_ms"]
        lines.append(f"  async save over the memcpy made just before it ({p['pause_ms']:.0f} ms idle "
                     f"between), {p['rounds']} rounds: saves after the first {later['median']:.2f} x "
                     f"[{later['min']:.2f}..{later['max']:.2f}]; first saves {first['median']:.2f} x "
                     f"[{first['min']:.2f}..{first['max']:.2f}]; those memcpys {fl['median']:.1f} ms "
                     f"[{fl['min']:.1f}..{fl['max']:.1f}]")
    return benchlib.report_text(lines, result["targets"])


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
