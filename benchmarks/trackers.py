"""What the three trackers (TensorBoard, MLflow, W&B offline, logging every 50 steps)
cost a tiny MLP from the first step: the first 2 s of a fit, start-up included, and
the steady state after it, against hookloop with no plugins.

Each round runs one fit per contender (interleaved, order rotating) over a cycling
iterable that stamps the time every batch is handed out. The clock starts at the call
of ``fit`` (the trackers open their runs in ``on_fit_start``; nothing waits for them),
so their start-up work, on the training thread or competing with it, counts.

Contenders: no plugins; the trackers as configured by default (their backend calls in
the trackers' backend process, started afresh for every fit: after each fit it is told
to exit and waited for, outside the clock); and the same trackers with
``backend="thread"`` (their backend calls on worker threads of the training process,
as before the backend process existed). The target is judged on the default.

- first 2 s: the time to hand out batch K, where K is the number of steps the no-plugin
  fit of the same round reached in 2 s; trackers over no plugins, in %;
- steady state: time per step from batch K to the last one, trackers over no plugins,
  in %.

Both are paired by round and quoted as the median with the spread across rounds. Where
Linux reports it (``/proc/thread-self/schedstat``, read every 50 batches), each
window's time per step is split into the training thread's time on a CPU, its wait
for a CPU (run queue: other processes, the trackers' backend process among them, had
the cores) and the rest (waits off the run queue: the GIL, page faults, I/O). The
trackers that are not installed are left out and named; with none of them installed
the rows are printed as NOT RUN.

Run alone: ``python benchmarks/trackers.py [--device cpu|cuda] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import TRACKERS, Target, format_table, log
from torch.nn import functional as F

TARGET_LIMIT = 10.0
SIZES = {  # (first window s, total s, rounds)
    False: (2.0, 4.0, 6),
    True: (0.2, 0.4, 1),
}


SCHED_EVERY = 50
"""Batches between two reads of the training thread's scheduler statistics."""


def schedstat() -> tuple[float, float] | None:
    """Seconds the calling thread spent on a CPU and waiting for one (Linux), or
    ``None``."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as fh:
            on_cpu, waited = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e9, int(waited) / 1e9


class StampClock:
    """``steps`` batches cycled from ``batches``; records when each is handed out, and
    every ``SCHED_EVERY`` batches the thread's scheduler statistics."""

    def __init__(self, batches: list[Any], steps: int) -> None:
        self.batches = batches
        self.steps = steps
        self.stamps: list[float] = []
        self.sched: dict[int, tuple[float, float]] = {}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        batches, n, stamp = self.batches, len(self.batches), self.stamps.append
        clock = time.perf_counter
        for i in range(self.steps):
            if i % SCHED_EVERY == 0 or i == self.steps - 1:
                st = schedstat()
                if st is not None:
                    self.sched[i] = st
            stamp(clock())
            yield batches[i % n]


@dataclass
class Fit:
    """One timed fit: when ``fit`` was called, when each batch was handed out, and the
    training thread's scheduler statistics by batch index (``-1``: at the call)."""

    t0: float
    stamps: list[float]
    sched: dict[int, tuple[float, float]]


def _fit(make_plugins: Any, batches: list[Any], steps: int, device: torch.device) -> Fit:
    """One fit of ``steps`` steps of a fresh tiny MLP; returns the time ``fit`` was called
    and the stamps. The loop is closed afterwards, and the trackers' backend process
    told to exit and waited for, outside the stamps (the next fit starts its own)."""
    from workloads import quiet, tiny_mlp

    from hookloop import _tracker_host

    torch.manual_seed(0)
    clock = StampClock(batches, steps)
    with quiet():
        loop = benchlib.hookloop_loop(tiny_mlp().to(device), clock, plugins=make_plugins(),
                                      loss_fn=F.mse_loss)
        start = schedstat()
        t0 = time.perf_counter()
        try:
            loop.fit(max_steps=steps)
            benchlib.sync(device)
        finally:
            loop.close()
            _tracker_host.shutdown(wait=60.0)
    return Fit(t0, clock.stamps, {-1: start, **clock.sched} if start is not None else {})


def _split(fit: Fit, lo: int, hi: int) -> dict[str, float] | None:
    """Time per step between batch ``lo`` (-1: the call of fit) and batch ``hi`` (both
    taken to the nearest scheduler read at or before them), split into on a CPU, waiting
    for a CPU and other waits, in us."""
    sched = fit.sched
    if not sched:
        return None
    a = max((i for i in sched if i <= lo), default=None)
    b = max((i for i in sched if i <= hi), default=None)
    if a is None or b is None or b <= a:
        return None
    t0, stamps = fit.t0, fit.stamps
    wall = (stamps[b] if b >= 0 else t0) - (stamps[a] if a >= 0 else t0)
    cpu = sched[b][0] - sched[a][0]
    runq = sched[b][1] - sched[a][1]
    n = b - a if a >= 0 else b + 1
    return {"wall_us": wall / n * 1e6, "cpu_us": cpu / n * 1e6, "runq_us": runq / n * 1e6,
            "other_us": (wall - cpu - runq) / n * 1e6}


def _windows(base: Fit, other: Fit, first_s: float) -> tuple[float, float, dict[str, Any]]:
    """First-window and steady-state overheads (%) of ``other`` over ``base`` (one
    round), and the raw figures."""
    b0, bs, k0, ks = base.t0, base.stamps, other.t0, other.stamps
    k = next((i for i, s in enumerate(bs) if s - b0 > first_s), len(bs) - 1)
    k = min(max(k, 1), len(bs) - 2)
    base_first, trk_first = bs[k] - b0, ks[k] - k0
    base_rest = (bs[-1] - bs[k]) / (len(bs) - 1 - k)
    trk_rest = (ks[-1] - ks[k]) / (len(ks) - 1 - k)
    raw: dict[str, Any] = {"k": k, "none_first_s": base_first, "trackers_first_s": trk_first,
                           "none_steady_us": base_rest * 1e6, "trackers_steady_us": trk_rest * 1e6}
    for name, fit in (("none", base), ("trackers", other)):
        raw[f"{name}_split"] = {"first": _split(fit, -1, k), "steady": _split(fit, k, len(bs) - 1)}
        raw[f"{name}_first_step_ms"] = (fit.stamps[0] - fit.t0) * 1e3
    return (100.0 * (trk_first - base_first) / base_first, 100.0 * (trk_rest - base_rest) / base_rest, raw)


CREATE_RUN = """
import sys, time
t = time.perf_counter()
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
found = client.get_experiment_by_name("hookloop")
experiment = found.experiment_id if found else client.create_experiment("hookloop")
client.create_run(experiment)
print("SECONDS", time.perf_counter() - t)
"""


def mlflow_create_run_cost(root: Path, reps: int) -> dict[str, Any]:
    """What creating the MLflow run on the training thread at fit start would make it
    wait: in a fresh process, import MLflow, open a SQLite store and create the run,
    in a new store (its tables are created) and again in that store; seconds, over
    ``reps`` repetitions."""
    import subprocess
    import sys

    fresh, existing = [], []
    for i in range(reps):
        uri = f"sqlite:///{(benchlib.fresh_dir(root, f'create-run-{i}') / 'mlflow.db').as_posix()}"
        for into in (fresh, existing):
            proc = subprocess.run([sys.executable, "-c", CREATE_RUN, uri], capture_output=True, text=True,
                                  timeout=600)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("SECONDS ")), None)
            if proc.returncode != 0 or line is None:
                return {"error": (proc.stderr or proc.stdout)[-300:]}
            into.append(float(line.split()[1]))
    return {"new_store_s": benchlib.over_rounds(fresh), "existing_store_s": benchlib.over_rounds(existing)}


def _splits(windows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Median and spread over rounds of each part of the time per step of contender
    ``name`` (``none`` or ``trackers`` in ``windows``), per window."""
    out: dict[str, Any] = {}
    for window in ("first", "steady"):
        parts = [w[f"{name}_split"][window] for w in windows if w.get(f"{name}_split", {}).get(window)]
        out[window] = {key: benchlib.over_rounds([p[key] for p in parts])
                       for key in ("wall_us", "cpu_us", "runq_us", "other_us")} if parts else None
    return out


def run(device: torch.device, quick: bool, root: Path, stack: benchlib.FullStack | None = None
        ) -> dict[str, Any]:
    """The three contenders over rounds; returns the JSON-ready result with its targets."""
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

    def on_threads() -> list[Any]:
        return [(n, {**o, "backend": "thread"}) for n, o in trackers()]

    # how many steps fill total_s without plugins (one short calibration fit)
    calib = _fit(list, batches, 200, device)
    per_step = max((calib.stamps[-1] - calib.t0) / len(calib.stamps), 1e-6)
    steps = max(50, int(total_s / per_step))
    out["steps"] = steps
    log(f"trackers: {', '.join(chosen)}; {steps} steps per fit, {rounds} rounds")
    out["loadavg_before"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    first, steady, base_steps, windows = [], [], [], []
    t_first, t_steady, t_windows = [], [], []
    for r in range(rounds):
        if r > 0 and benchlib.out_of_time(3.5 * total_s + 5):
            log(f"trackers: time budget: stopping after {r} of {rounds} rounds")
            break
        order = [("none", list), ("trackers", trackers), ("thread", on_threads)]
        order = order[r % 3:] + order[:r % 3]
        runs = {}
        for name, make in order:
            runs[name] = _fit(make, batches, steps, device)
        f, s_, raw = _windows(runs["none"], runs["trackers"], first_s)
        first.append(f)
        steady.append(s_)
        base_steps.append(raw["k"])
        windows.append(raw)
        f, s_, raw = _windows(runs["none"], runs["thread"], first_s)
        t_first.append(f)
        t_steady.append(s_)
        t_windows.append(raw)
        log(f"trackers: round {r + 1}/{rounds}: first {first[-1]:+.1f} %, steady {steady[-1]:+.1f} % "
            f"(on threads: {t_first[-1]:+.1f} %, {t_steady[-1]:+.1f} %)")
    out["windows"] = windows
    out["first_pct"] = benchlib.over_rounds(first)
    out["steady_pct"] = benchlib.over_rounds(steady)
    out["thread_windows"] = t_windows
    out["thread_first_pct"] = benchlib.over_rounds(t_first)
    out["thread_steady_pct"] = benchlib.over_rounds(t_steady)
    out["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out["split"] = {"none": _splits(windows, "none"), "trackers": _splits(windows, "trackers"),
                    "thread": _splits(t_windows, "trackers")}
    out["first_step_ms"] = {
        "none": benchlib.over_rounds([w["none_first_step_ms"] for w in windows]),
        "trackers": benchlib.over_rounds([w["trackers_first_step_ms"] for w in windows]),
        "thread": benchlib.over_rounds([w["trackers_first_step_ms"] for w in t_windows])}
    if "mlflow" in chosen and not benchlib.out_of_time(60):
        log("trackers: what creating the MLflow run at fit start would cost")
        out["mlflow_create_run"] = mlflow_create_run_cost(folder, 1 if quick else 3)
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
        if result.get("thread_first_pct", {}).get("median") is not None:
            rows += [[f"first {result['first_s']:g} s, backend='thread'",
                      result["thread_first_pct"]["median"], benchlib.rng(result["thread_first_pct"])],
                     ["steady state, backend='thread'", result["thread_steady_pct"]["median"],
                      benchlib.rng(result["thread_steady_pct"])]]
        lines.append(format_table(rows, ["window", "trackers over none %", "[min..max]"]))
        fs = result.get("first_step_ms") or {}
        if fs:
            parts = [f"{k} {v['median']:.1f} [{benchlib.rng(v)}]" for k, v in fs.items()
                     if v.get("median") is not None]
            lines.append("  time from the call of fit to the first step, ms: " + ", ".join(parts))
        split = result.get("split") or {}
        srows = []
        keys = ("wall_us", "cpu_us", "runq_us", "other_us")
        for name, label in (("none", "no plugins"), ("trackers", "trackers"), ("thread", "backend='thread'")):
            for window, parts in (split.get(name) or {}).items():
                if parts:
                    cells = [f"{parts[k]['median']:.0f} [{benchlib.rng(parts[k])}]" for k in keys]
                    srows.append([f"{label}, {window}", *cells])
        if srows:
            lines.append("where the training thread's time per step goes, us (median [min..max] over "
                         "rounds):")
            lines.append(format_table(srows, ["contender, window", "wall", "on a CPU", "waiting for a CPU",
                                              "other waits (GIL, I/O)"]))
        load = (result.get("loadavg_before"), result.get("loadavg_after"))
        if all(load):
            lines.append(f"  load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load[0])}; "
                         f"after: {', '.join(f'{x:.2f}' for x in load[1])}; cores: {os.cpu_count()}")
        cr = result.get("mlflow_create_run")
        if cr and "error" in cr:
            lines.append(f"  MLflow run creation at fit start: not measured ({cr['error'][:120]})")
        elif cr:
            lines.append("  creating the MLflow run on the training thread at fit start would make it wait "
                         "(fresh process: import, SQLite store, create_run), s: new store "
                         f"{benchlib.spread_text(cr['new_store_s'])}, existing store "
                         f"{benchlib.spread_text(cr['existing_store_s'])}")
        lines.append("  trackers: " + ", ".join(result["trackers"])
                     + ("; missing: " + "; ".join(f"{k} ({v[:60]})" for k, v in result["missing"].items())
                        if result["missing"] else ""))
    return benchlib.report_text(lines, result["targets"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    return benchlib.plugin_script_main(argv, __doc__ or "", "trackers.json", run, report)


if __name__ == "__main__":
    raise SystemExit(main())
