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


def _rng(stat: dict[str, Any] | None) -> str:
    """``min..max`` (new layout) or ``p25-p75`` (results written before spreads)."""
    if not stat:
        return "-"
    if stat.get("min") is not None:
        return f"{_f(stat['min'])}..{_f(stat['max'])}"
    if stat.get("p25") is not None:
        return f"{_f(stat['p25'])}-{_f(stat['p75'])} (p25-p75)"
    return "-"


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
    lines += ["### Targets", "", "Median, and in brackets the spread (min..max) across rounds: a "
              "difference smaller than the spread is not a result.", ""]

    def measured(t: dict[str, Any]) -> str:
        text = _f(t["value"], 3) + " " + t["unit"]
        if t.get("spread") and t["value"] is not None:
            text += f" [{_f(t['spread'][0], 3)}..{_f(t['spread'][1], 3)}]"
        return text + (" (spread straddles the limit)" if t.get("inconclusive") else "")

    lines += _table(["status", "target", "measured", "limit", "note"],
                    [[("**MISSED**" if t["status"] == "MISSED" else t["status"]), t["name"], measured(t),
                      f"<= {t['limit']:g} {t['unit']}", t["note"] or ""] for t in results["targets"]])
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
        lines += _table(["contender", "us/step (median)", "spread", "overhead us/step", "spread"],
                        [[r["contender"], (r.get("us_per_step_rounds") or r["us_per_step"])["median"],
                          _rng(r.get("us_per_step_rounds") or r["us_per_step"]), r["overhead_us"],
                          _rng(r.get("overhead_us_rounds"))] for r in f["rows"]])
        lines += ["", "![overhead vs plugins](" + rel + "/overhead_vs_plugins.png)",
                  "![hook call](" + rel + "/dispatch_calls.png)"]
    w = results.get("workloads")
    if w:
        for work in w["workloads"]:
            note = f", {work['note']}" if work.get("note") else ""
            lines += ["", f"### Workload `{work['name']}` (batch {work['batch_shape']}, "
                      f"{work['steps_per_epoch']} steps/epoch, "
                      f"{work.get('rounds_run', work['rounds'])} rounds x "
                      f"{work['epochs'] - 1} timed epochs{note})", ""]
            rows = []
            for r in work["rows"]:
                if "error" in r:
                    rows.append([r["contender"], "failed: " + r["error"][:80]] + ["-"] * 6)
                    continue
                s = r["us_per_step"]
                rows.append([r["contender"], s["median"], _rng(s), r["overhead_pct"],
                             _rng(r.get("overhead_pct_rounds")), r["fit_wall_us_per_step"]["median"],
                             r["syncs"].get("non_logging_steps"), r.get("peak_mem_diff_mb")])
            for name, why in work["skipped"].items():
                rows.append([name, "skipped: " + why[:80]] + ["-"] * 6)
            lines += _table(["contender", "us/step", "spread", "over raw %", "spread",
                             "fit wall us/step", "syncs, non-log steps", "peak mem +MB"], rows)
        for name, why in w.get("skipped_workloads", {}).items():
            lines += ["", f"Workload `{name}`: NOT RUN: {why}."]
        lines += ["", "![overhead per step](" + rel + "/overhead_per_step.png)",
                  "![overhead percent](" + rel + "/overhead_percent.png)"]
    c = results.get("checkpoint")
    if c:
        lines += ["", f"### Checkpoint stall per save ({c['model_mb']:.0f} MB model)", ""]
        if c.get("skipped"):
            lines.append(f"Not run: {c['skipped']}.")
        else:
            rows = [[k, v["stall_ms"]["median"], _rng(v["stall_ms"]), v["fit_end_ms"]]
                    for k, v in c["modes"].items()]
            if c.get("memcpy"):
                rows.append(["memcpy floor (same bytes, preallocated touched buffer, back to back)",
                             c["memcpy"]["ms"]["median"], _rng(c["memcpy"]["ms"]), "-"])
            lines += _table(["mode", "stall ms (median)", "spread", "fit-end wait ms"], rows)
            p = c.get("paired")
            if p:
                later, first = p["later_x"], p["first_x"]
                lines.append(f"\nEach async save over a memcpy made just before it, {p['rounds']} rounds "
                             f"(median of each round, then over rounds): saves after the first "
                             f"{later['median']:.2f}x [{_rng(later)}]; first saves (allocating the staging "
                             f"buffer) {first['median']:.2f}x [{_rng(first)}].")
            for mode, err in c.get("errors", {}).items():
                lines.append(f"\n{mode} failed: {err}")
    bare = results.get("bare")
    if bare:
        lines += ["", "### Bare loop against raw, step against step (tiny MLP, one torch thread)", ""]
        if bare.get("skipped"):
            lines.append(f"NOT RUN: {bare['skipped']}.")
        else:
            tm = bare["time"]
            rows = []
            fresh = " (fresh process)" if "overhead_pct_by_order" in tm else ""  # older results: in-process
            for t, where in ((tm, fresh), (bare.get("time_here"), " (the suite's process)")):
                if not t or "error" in t:
                    continue
                us = t["us_per_step"]
                rows += [["raw" + where, us["raw"]["median"], _rng(us["raw"]), "-", "-"],
                         ["hookloop, no plugins" + where, us["hookloop"]["median"], _rng(us["hookloop"]),
                          t["overhead_pct"]["median"], _rng(t["overhead_pct"])]]
                for key, label in (("raw_first", "raw step first"), ("raw_second", "raw step second")):
                    o = t.get("overhead_pct_by_order", {}).get(key)
                    if o:
                        rows.append([f"windows with the {label}", "-", "-", o["median"], _rng(o)])
            if "error" in tm:
                lines.append(f"Timing failed: {tm['error']}.")
            else:
                lines += _table(["contender", "us/step", "spread", "over raw %", "spread"], rows)
                lines.append(f"\n{tm['rounds_run']} rounds of {tm['steps_per_epoch']} steps, windows of "
                             f"{tm['window']} steps.")
            ins = bare.get("instructions") or {}
            if "error" in ins or not ins:
                lines.append(f"Instructions per step: {ins.get('error', 'not run')}.")
            else:
                pct, per = ins["overhead_pct"], ins["per_step"]
                lines.append(f"Instructions per step (callgrind): raw {per['raw']['median']:,.0f}, "
                             f"hookloop {per['hookloop']['median']:,.0f} "
                             f"({pct['median']:+.2f}% [{pct['min']:+.2f}..{pct['max']:+.2f}]).")
    t = results.get("trackers")
    if t:
        lines += ["", "### Trackers (tiny MLP, logging every 50 steps, over no plugins, from fit's call)",
                  ""]
        if t.get("skipped"):
            lines.append(f"NOT RUN: {t['skipped']}.")
        else:
            rows = [[f"first {t['first_s']:g} s", t["first_pct"]["median"], _rng(t["first_pct"])],
                    ["steady state", t["steady_pct"]["median"], _rng(t["steady_pct"])]]
            if (t.get("thread_first_pct") or {}).get("median") is not None:
                rows += [[f"first {t['first_s']:g} s, backend='thread'", t["thread_first_pct"]["median"],
                          _rng(t["thread_first_pct"])],
                         ["steady state, backend='thread'", t["thread_steady_pct"]["median"],
                          _rng(t["thread_steady_pct"])]]
            lines += _table(["window", "trackers over none %", "spread"], rows)
            split = t.get("split") or {}
            srows = []
            labels = (("none", "no plugins"), ("trackers", "trackers"), ("thread", "backend='thread'"))
            for name, label in labels:
                for window, parts in (split.get(name) or {}).items():
                    if parts:
                        srows.append([f"{label}, {window}", *(parts[k]["median"] for k in
                                                             ("wall_us", "cpu_us", "runq_us", "other_us"))])
            if srows:
                lines += ["", "Training thread's time per step (us, medians over rounds):", ""]
                lines += _table(["contender, window", "wall", "on a CPU", "waiting for a CPU", "other waits"],
                                srows)
            lines.append(f"\nTrackers: {', '.join(t['trackers'])}"
                         + (f"; missing: {', '.join(t['missing'])}" if t["missing"] else "") + ".")
    wf = results.get("wholefit")
    if wf:
        lines += ["", f"### Whole fit, {wf['steps']} steps of the tiny MLP, start-up and close included", ""]
        rows = []
        for r in wf["rows"]:
            if "error" in r:
                rows.append([r["contender"], "failed: " + r["error"][:80], "-", "-", "-"])
                continue
            rows.append([r["contender"], r["wall_s"]["median"], _rng(r["wall_s"]), r["over_raw_x"]["median"],
                         _f((r.get("import_s") or {}).get("median"))])
        rows += [[name, "skipped: " + why[:80], "-", "-", "-"] for name, why in wf["skipped"].items()]
        lines += _table(["contender", "wall s", "spread", "x raw", "import s (fresh process)"], rows)
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
