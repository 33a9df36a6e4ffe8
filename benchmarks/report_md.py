"""Render a ``results.json`` of ``run_all.py`` as Markdown tables (for docs/benchmarks.md).

``python benchmarks/report_md.py benchmarks/results/cpu/results.json`` prints the
Markdown; ``--write docs/benchmarks.md`` replaces the text between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers of that file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out


def render(results: dict[str, Any], rel: str) -> str:
    """Markdown of one run: machine, command, targets, then every table."""
    m = results["machine"]
    gpu = f", **{m['gpu']}** (CUDA {m['cuda']})" if m.get("gpu") else ""
    lines = [f"Measured {m['time']} on **{m['device']}**: {m['cpu']} ({m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads){gpu}"
             + f"; Python {m['python']}, torch {m['torch']}, pluggy {m.get('version:pluggy')}, "
             f"Ignite {m.get('version:pytorch-ignite') or 'not installed'}, "
             f"Lightning {m.get('version:lightning') or 'not installed'}. Whole suite: "
             f"{results['elapsed_s']:.0f} s.", "",
             f"Command: `{results['command']}`. Raw data: `{rel}/results.json`; plots beside it.", ""]
    stack = results.get("stack")
    if stack:
        missing = stack["missing"]
        lines.append("Full stack in this run: " + (", ".join(stack["plugins"]) or "none")
                     + (". Not in it: " + "; ".join(f"{k} ({v[:90]})" for k, v in missing.items())
                        if missing else ". Every bundled plugin was installed.") + "")
        lines.append("")
    lines += ["### Targets", ""]
    lines += _table(["status", "target", "measured", "limit", "note"],
                    [[("**MISSED**" if t["status"] == "MISSED" else t["status"]), t["name"],
                      _f(t["value"], 3) + " " + t["unit"], f"<= {t['limit']:g} {t['unit']}", t["note"] or ""]
                     for t in results["targets"]])
    d = results.get("dispatch")
    if d:
        lines += ["", "### One hook call (`on_train_batch_end`), us per call, net of timeit's empty loop "
                  f"({d['micro']['timeit_loop_us'] * 1e3:.1f} ns)", ""]
        lines += _table(["case", "hookloop compiled", "pluggy HookCaller", "plain loop"],
                        [[r["case"], r["hookloop_net_us"], r["pluggy_net_us"], r["plain_net_us"]]
                         if "error" not in r else [r["case"], "failed: " + r["error"][:80], "-", "-"]
                         for r in d["micro"]["rows"]])
        f = d["fit"]
        lines += ["", f"### `fit` with a no-op step vs a bare loop ({f['steps_per_epoch']} steps/epoch, "
                  f"{f['rounds']} rounds x {f['epochs'] - 1} timed epochs)", ""]
        lines += _table(["contender", "us/step (median)", "p25", "p75", "overhead us/step"],
                        [[r["contender"], r["us_per_step"]["median"], r["us_per_step"]["p25"],
                          r["us_per_step"]["p75"], r["overhead_us"]] for r in f["rows"]])
        lines += ["", "![overhead vs plugins](" + rel + "/overhead_vs_plugins.png)",
                  "![hook call](" + rel + "/dispatch_calls.png)"]
    w = results.get("workloads")
    if w:
        for work in w["workloads"]:
            lines += ["", f"### Workload `{work['name']}` (batch {work['batch_shape']}, "
                      f"{work['steps_per_epoch']} steps/epoch, {work['rounds']} rounds x "
                      f"{work['epochs'] - 1} timed epochs)", ""]
            rows = []
            for r in work["rows"]:
                if "error" in r:
                    rows.append([r["contender"], "failed: " + r["error"][:80]] + ["-"] * 6)
                    continue
                s = r["us_per_step"]
                rows.append([r["contender"], s["median"], f"{_f(s['p25'])}-{_f(s['p75'])}", r["overhead_us"],
                             r["overhead_pct"], r["fit_wall_us_per_step"]["median"],
                             r["syncs"].get("non_logging_steps"), r.get("peak_mem_diff_mb")])
            for name, why in work["skipped"].items():
                rows.append([name, "skipped: " + why[:80]] + ["-"] * 6)
            lines += _table(["contender", "us/step", "p25-p75", "over raw us", "over raw %",
                             "fit wall us/step", "syncs, non-log steps", "peak mem +MB"], rows)
        lines += ["", "![overhead per step](" + rel + "/overhead_per_step.png)",
                  "![overhead percent](" + rel + "/overhead_percent.png)"]
    c = results.get("checkpoint")
    if c:
        lines += ["", f"### Checkpoint stall per save ({c['model_mb']:.0f} MB model)", ""]
        if c.get("skipped"):
            lines.append(f"Not run: {c['skipped']}.")
        else:
            lines += _table(["mode", "stall ms (median)", "p25", "p75", "fit-end wait ms"],
                            [[k, v["stall_ms"]["median"], v["stall_ms"]["p25"], v["stall_ms"]["p75"],
                              v["fit_end_ms"]] for k, v in c["modes"].items()])
            for mode, err in c.get("errors", {}).items():
                lines.append(f"\n{mode} failed: {err}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--write", type=Path, help="Markdown file with the results markers")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if args.write is None:
        print(render(results, str(args.results.parent)))
        return 0
    rel = Path(*[".."] * (len(args.write.resolve().relative_to(Path.cwd().resolve()).parts) - 1),
               args.results.parent)
    text = args.write.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.write.write_text(head + START + "\n" + render(results, rel.as_posix()) + END + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
