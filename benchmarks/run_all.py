"""Run the whole benchmark suite: dispatch, workloads and checkpoint stall.

Writes ``results.json`` (every figure, the machine, the command) and the PNG plots to
``--out``, prints each part's tables, then a summary table and every target (met,
MISSED or NOT RUN) last.

``python benchmarks/run_all.py --device cpu --out benchmarks/results/local`` (``make
bench``); ``--quick`` runs tiny sizes (the smoke test); ``--device cuda`` times with
CUDA events (see ``run_gpu.sh``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import checkpoint_stall
import dispatch
import plots
import torch
import workloads
from benchlib import Target, format_table, log

PARTS = ("dispatch", "workloads", "checkpoint")


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
                rows.append([work["name"], r["contender"], r["us_per_step"]["median"], r["overhead_us"],
                             r["overhead_pct"], r["syncs"].get("non_logging_steps"),
                             r.get("peak_mem_diff_mb")])
            for name, why in work["skipped"].items():
                rows.append([work["name"], name, "skipped", None, None, None, why[:50]])
        lines.append(format_table(rows, ["workload", "contender", "us/step", "over raw us", "over raw %",
                                         "non-log syncs", "peak mem +MB"]))
        missing = w["stack"]["missing"]
        lines.append("full stack: " + ", ".join(w["stack"]["plugins"])
                     + (f"; not in it: {', '.join(sorted(missing))}" if missing else ""))
    lines.append("")
    lines.append("targets:")
    lines += [Target(**{k: t[k] for k in ("name", "value", "limit", "unit", "note")}).line()
              for t in results["targets"]]
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
    args = parser.parse_args(argv)
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
    reports = []
    with benchlib.sandbox() as root:
        stack = None
        if "dispatch" in parts or "workloads" in parts:
            stack = workloads._resolve(device, root)
            results["stack"] = stack.as_dict()
        if "dispatch" in parts:
            results["dispatch"] = dispatch.run(device, args.quick, root, stack)
            results["dispatch"]["machine"] = results["machine"]
            reports.append(dispatch.report(results["dispatch"]))
        if "workloads" in parts:
            results["workloads"] = workloads.run(device, args.quick, root, stack)
            results["workloads"]["machine"] = results["machine"]
            reports.append(workloads.report(results["workloads"]))
        if "checkpoint" in parts:
            results["checkpoint"] = checkpoint_stall.run(device, args.quick, root)
            reports.append(checkpoint_stall.report(results["checkpoint"]))
    results["targets"] = [t for p in ("dispatch", "workloads", "checkpoint") if p in results
                          for t in results[p]["targets"]]
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
