"""What the three trackers (TensorBoard, MLflow, W&B offline, logging every 50 steps)
cost a tiny MLP from the first step: the first 2 s of a fit, start-up included, and
the steady state after it, against hookloop with no plugins.

Each round runs one fit per contender (interleaved, order alternating) over a cycling
iterable that stamps the time every batch is handed out. The clock starts at the call
of ``fit`` (the trackers open their runs in ``on_fit_start``; nothing waits for them),
so their start-up work, on the training thread or competing with it, counts.

- first 2 s: the time to hand out batch K, where K is the number of steps the no-plugin
  fit of the same round reached in 2 s; trackers over no plugins, in %;
- steady state: time per step from batch K to the last one, trackers over no plugins,
  in %.

Both are paired by round and quoted as the median with the spread across rounds. The
trackers that are not installed are left out and named; with none of them installed
the rows are printed as NOT RUN.

Run alone: ``python benchmarks/trackers.py [--device cpu|cuda] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import TRACKERS, Target, format_table, log
from torch.nn import functional as F

TARGET_LIMIT = 10.0
SIZES = {  # (first window s, total s, rounds)
    False: (2.0, 4.0, 5),
    True: (0.2, 0.4, 1),
}


class StampClock:
    """``steps`` batches cycled from ``batches``; records when each is handed out."""

    def __init__(self, batches: list[Any], steps: int) -> None:
        self.batches = batches
        self.steps = steps
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        batches, n, stamp = self.batches, len(self.batches), self.stamps.append
        clock = time.perf_counter
        for i in range(self.steps):
            stamp(clock())
            yield batches[i % n]


def _fit(make_plugins: Any, batches: list[Any], steps: int, device: torch.device
         ) -> tuple[float, list[float]]:
    """One fit of ``steps`` steps of a fresh tiny MLP; returns the time ``fit`` was called
    and the stamps. The loop is closed afterwards, outside the stamps."""
    from workloads import quiet, tiny_mlp

    torch.manual_seed(0)
    clock = StampClock(batches, steps)
    with quiet():
        loop = benchlib.hookloop_loop(tiny_mlp().to(device), clock, plugins=make_plugins(),
                                      loss_fn=F.mse_loss)
        t0 = time.perf_counter()
        try:
            loop.fit(max_steps=steps)
            benchlib.sync(device)
        finally:
            loop.close()
    return t0, clock.stamps


def run(device: torch.device, quick: bool, root: Path, stack: benchlib.FullStack | None = None
        ) -> dict[str, Any]:
    """Both contenders over rounds; returns the JSON-ready result with its targets."""
    from workloads import _batches

    first_s, total_s, rounds = SIZES[quick]
    chosen = {n: o for n, o in (stack.chosen.items() if stack else []) if n in TRACKERS}
    missing = {n: (stack.missing.get(n, "not resolved") if stack else "not resolved")
               for n in TRACKERS if n not in chosen}
    out: dict[str, Any] = {"trackers": list(chosen), "missing": missing, "first_s": first_s,
                           "total_s": total_s, "rounds": rounds, "rows": []}
    names = ("first 2 s, fit start included", "steady state after the first 2 s")
    reason = None
    if not chosen:
        reason = "no tracker plugin installed: " + "; ".join(f"{k}: {v[:60]}" for k, v in missing.items())
    elif benchlib.out_of_time(2 * total_s + 10):
        reason = "not run: time budget"
    if reason is not None:
        out["skipped"] = reason
        out["targets"] = [Target(f"tiny MLP, trackers over no plugins, {n}", None, TARGET_LIMIT, "%", reason)
                          .as_dict() for n in names]
        return out
    batches = _batches(256, (32, 32), 0, device)
    folder = benchlib.fresh_dir(root, "trackers")

    def trackers() -> list[Any]:
        return [(n, benchlib._fill(o, benchlib.fresh_dir(folder, n))) for n, o in chosen.items()]

    # how many steps fill total_s without plugins (one short calibration fit)
    t0, stamps = _fit(list, batches, 200, device)
    per_step = max((stamps[-1] - t0) / len(stamps), 1e-6)
    steps = max(50, int(total_s / per_step))
    out["steps"] = steps
    log(f"trackers: {', '.join(chosen)}; {steps} steps per fit, {rounds} rounds")
    first, steady, base_steps, windows = [], [], [], []
    for r in range(rounds):
        if r > 0 and benchlib.out_of_time(2.5 * total_s + 5):
            log(f"trackers: time budget: stopping after {r} of {rounds} rounds")
            break
        order = [("none", list), ("trackers", trackers)]
        if r % 2:
            order.reverse()
        runs = {}
        for name, make in order:
            runs[name] = _fit(make, batches, steps, device)
        (b0, bs), (k0, ks) = runs["none"], runs["trackers"]
        k = next((i for i, s in enumerate(bs) if s - b0 > first_s), len(bs) - 1)
        k = min(max(k, 1), len(bs) - 2)
        base_first, trk_first = bs[k] - b0, ks[k] - k0
        base_rest = (bs[-1] - bs[k]) / (len(bs) - 1 - k)
        trk_rest = (ks[-1] - ks[k]) / (len(ks) - 1 - k)
        first.append(100.0 * (trk_first - base_first) / base_first)
        steady.append(100.0 * (trk_rest - base_rest) / base_rest)
        base_steps.append(k)
        windows.append({"k": k, "none_first_s": base_first, "trackers_first_s": trk_first,
                        "none_steady_us": base_rest * 1e6, "trackers_steady_us": trk_rest * 1e6})
        log(f"trackers: round {r + 1}/{rounds}: first {first[-1]:+.1f} %, steady {steady[-1]:+.1f} %")
    out["windows"] = windows
    out["first_pct"] = benchlib.over_rounds(first)
    out["steady_pct"] = benchlib.over_rounds(steady)
    out["steps_in_first_window"] = statistics.median(base_steps) if base_steps else None
    note = ", ".join(chosen) + (f"; missing: {', '.join(missing)}" if missing else "")
    if quick:
        note += f"; smoke size: first {first_s:g} s"
    out["targets"] = [benchlib.target_from_rounds(f"tiny MLP, trackers over no plugins, {names[0]}",
                                                  out["first_pct"], TARGET_LIMIT, "%", note).as_dict(),
                      benchlib.target_from_rounds(f"tiny MLP, trackers over no plugins, {names[1]}",
                                                  out["steady_pct"], TARGET_LIMIT, "%", note).as_dict()]
    return out


def report(result: dict[str, Any]) -> str:
    """The printed figures of this script, targets last."""
    lines = [f"tiny MLP with the trackers logging every {benchlib.LOG_EVERY} steps vs no plugins, from the "
             f"call of fit ({result.get('steps', '-')} steps per fit; median [min..max] over rounds)"]
    if result.get("skipped"):
        lines.append(f"  NOT RUN: {result['skipped']}")
    else:
        rows = [[f"first {result['first_s']:g} s (fit start included)", result["first_pct"]["median"],
                 benchlib.rng(result["first_pct"])],
                ["steady state after it", result["steady_pct"]["median"], benchlib.rng(result["steady_pct"])]]
        lines.append(format_table(rows, ["window", "trackers over none %", "[min..max]"]))
        lines.append("  trackers: " + ", ".join(result["trackers"])
                     + ("; missing: " + "; ".join(f"{k} ({v[:60]})" for k, v in result["missing"].items())
                        if result["missing"] else ""))
    lines.append("targets:")
    lines += [Target.from_dict(t).line() for t in result["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    return benchlib.plugin_script_main(argv, __doc__ or "", "trackers.json", run, report)


if __name__ == "__main__":
    raise SystemExit(main())
