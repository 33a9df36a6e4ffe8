"""Run the whole benchmark suite: workloads (with the compiled CNN), the bare loop
against the raw loop in paired blocks, checkpoint stall, trackers, whole-fit wall time
and dispatch, in that order.

Writes ``results.json`` (every figure, the machine, the command) and the PNG plots to
``--out``, prints each part's tables, then a summary table and every target (met,
MISSED or NOT RUN) last.

``python benchmarks/run_all.py --device cpu --out benchmarks/results/local`` (``make
bench``); ``--quick`` runs tiny sizes (the smoke test); ``--device cuda`` times with
CUDA events (see ``run_gpu.sh``); ``--budget-s N`` (or ``HOOKLOOP_BENCH_BUDGET_S``)
bounds the run: parts stop after the last round that fits, and a part that does not
fit at all is reported as NOT RUN.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import bare_loop
import benchlib
import checkpoint_stall
import dispatch
import plots
import torch
import trackers
import wholefit
import workloads
from benchlib import Target, format_table, log

PARTS = ("workloads", "bare", "checkpoint", "trackers", "wholefit", "dispatch")
MODULES = {"workloads": workloads, "bare": bare_loop, "checkpoint": checkpoint_stall, "trackers": trackers,
           "wholefit": wholefit, "dispatch": dispatch}
NEEDS_STACK = ("workloads", "trackers", "wholefit", "dispatch")


def summary(results: dict[str, Any]) -> str:
    """The final table (per-step figures by workload and contender) and the targets."""
    lines = [f"hookloop benchmarks on {results['machine']['device']}: {results['machine']['cpu']}"
             + (f", {results['machine']['gpu']}" if results["machine"].get("gpu") else "")
             + f"; torch {results['machine']['torch']}, Python {results['machine']['python']}"]
    w = results.get("workloads")
    if w:
        rows = []
        for work in w["workloads"]:
            for r in work["rows"]:
                if "error" in r:
                    rows.append([work["name"], r["contender"], "failed", None, None, None, None])
                    continue
                rows.append([work["name"], r["contender"], r["us_per_step"]["median"],
                             benchlib.rng(r["us_per_step"]), r["overhead_pct"],
                             benchlib.rng(r["overhead_pct_rounds"]), r["syncs"].get("non_logging_steps"),
                             r.get("peak_mem_diff_mb")])
            for name, why in work["skipped"].items():
                rows.append([work["name"], name, "skipped", None, None, None, None, why[:50]])
        for name, why in w.get("skipped_workloads", {}).items():
            rows.append([name, "-", "NOT RUN", None, None, None, None, why[:50]])
        lines.append(format_table(rows, ["workload", "contender", "us/step", "[min..max]", "over raw %",
                                         "[min..max]", "non-log syncs", "peak mem +MB"]))
        missing = w["stack"]["missing"]
        lines.append("full stack: " + ", ".join(w["stack"]["plugins"])
                     + (f"; not in it: {', '.join(sorted(missing))}" if missing else ""))
    if results.get("wholefit", {}).get("rows") is not None:
        lines.append("")
        lines.append(wholefit.report(results["wholefit"]))
    lines.append("")
    lines.append("targets (median [min..max] across rounds):")
    lines += [Target.from_dict(t).line() for t in results["targets"]]
    counts = {s: sum(t["status"] == s for t in results["targets"]) for s in ("met", "MISSED", "NOT RUN")}
    lines.append(f"  {counts['met']} met, {counts['MISSED']} MISSED, {counts['NOT RUN']} NOT RUN")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/local"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", nargs="*", choices=PARTS, help="run only these parts")
    parser.add_argument("--budget-s", type=float,
                        default=float(os.environ.get("HOOKLOOP_BENCH_BUDGET_S") or 0),
                        help="stop starting work after this many seconds (0: no limit)")
    args = parser.parse_args(argv)
    benchlib.set_budget(args.budget_s or None)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available to torch {torch.__version__}", file=sys.stderr)
        return 2
    parts = args.only or list(PARTS)
    out = args.out.resolve()
    t0 = time.perf_counter()
    script = os.path.relpath(sys.argv[0]) if sys.argv[0] else "benchmarks/run_all.py"
    results: dict[str, Any] = {"command": " ".join(["python", script, *sys.argv[1:]]),
                               "quick": args.quick, "machine": benchlib.machine_info(device)}
    results["budget_s"] = args.budget_s or None
    reports = []
    not_run: list[Target] = []
    with benchlib.sandbox() as root:
        stack = None
        if any(p in parts for p in NEEDS_STACK):
            stack = workloads._resolve(device, root)
            results["stack"] = stack.as_dict()
        for part in PARTS:
            if part not in parts:
                continue
            if benchlib.out_of_time(10.0):
                log(f"{part}: NOT RUN: time budget")
                results.setdefault("not_run", {})[part] = "time budget"
                not_run.append(Target(f"part {part}", None, 0.0, "", "NOT RUN: time budget"))
                continue
            mod = MODULES[part]
            t_part = time.perf_counter()
            if part == "checkpoint":
                results[part] = mod.run(device, args.quick, root)
            elif part == "bare":  # the target in a fresh process, and this process's figure beside it
                results[part] = mod.run(device, args.quick, root, stack, here=True)
            else:
                results[part] = mod.run(device, args.quick, root, stack)
            results[part]["machine"] = results["machine"]
            results[part]["elapsed_s"] = time.perf_counter() - t_part
            reports.append(mod.report(results[part]))
    results["targets"] = [t for p in PARTS if p in results for t in results[p]["targets"]]
    results["targets"] += [t.as_dict() for t in not_run]
    results["elapsed_s"] = time.perf_counter() - t0
    benchlib.write_json(out / "results.json", results)
    pngs = []
    if "dispatch" in results:
        pngs += plots.plot_dispatch(results["dispatch"], out)
    if "workloads" in results:
        pngs += plots.plot_workloads(results["workloads"], out)
    if "checkpoint" in results:
        pngs += plots.plot_checkpoint(results["checkpoint"], out)
    for r in reports:
        print(r)
        print()
    names = ", ".join(p.name for p in pngs) or "none (no matplotlib)"
    print(f"results: {out / 'results.json'}; plots: {names}")
    print(f"elapsed: {results['elapsed_s']:.0f} s")
    print()
    print(summary(results))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
