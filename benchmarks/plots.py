"""PNG plots of the benchmark results (matplotlib, Agg backend; skipped if missing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dispatch(result: dict[str, Any], out: Path) -> list[Path]:
    """``dispatch_calls.png`` (us per hook call by case and way) and
    ``overhead_vs_plugins.png`` (fit overhead per step vs registered no-op plugins)."""
    plt = _pyplot()
    if plt is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = result["micro"]["rows"]
    ways = ("hookloop", "pluggy", "plain")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, way in enumerate(ways):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [max(r[f"{way}_net_us"] or 0.0, 0.0) for r in rows], width, label=way)
    ax.set_xticks(range(len(rows)), [r["case"] for r in rows])
    ax.set_ylabel("us per hook call (net)")
    ax.set_title("One hook call")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "dispatch_calls.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fit_rows = result["fit"]["rows"]
    counts, values = [], []
    full = None
    for r in fit_rows:
        name = r["contender"]
        if name.endswith("no-op plugins"):
            counts.append(int(name.split()[0]))
            values.append(r["overhead_us"])
        elif name.startswith("full stack"):
            full = (int(name.split("(")[1].split()[0]), r["overhead_us"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, values, "o-", label="no-op plugins (5 per-step hooks each)")
    if full is not None:
        ax.plot([full[0]], [full[1]], "s", color="C3", label="full bundled stack")
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="target, no plugins (1 us)")
    ax.axhline(2.0, color="grey", ls=":", lw=1, label="target, full stack (2 us)")
    ax.set_xlabel("registered plugins")
    ax.set_ylabel("fit overhead over bare loop (us/step)")
    ax.set_title(f"No-op step overhead ({result.get('machine', {}).get('device', '')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "overhead_vs_plugins.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_workloads(result: dict[str, Any], out: Path) -> list[Path]:
    """``overhead_per_step.png``: overhead over the raw loop per step, by workload and
    contender (log scale), and ``overhead_percent.png``: the same as % of the raw step."""
    plt = _pyplot()
    if plt is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    workloads = result["workloads"]
    names: list[str] = []
    for w in workloads:
        for r in w["rows"]:
            if r["contender"] not in names and r["contender"] != "raw":
                names.append(r["contender"])
    paths = []
    for key, fname, label in (("overhead_us", "overhead_per_step.png", "overhead over raw (us/step)"),
                              ("overhead_pct", "overhead_percent.png", "overhead over raw (% of raw step)")):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, w in enumerate(workloads):
                row = next((r for r in w["rows"] if r["contender"] == name), None)
                if row is not None and row.get(key) is not None:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(max(row[key], 1e-3))
            ax.bar(xs, ys, width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(range(len(workloads)), [w["name"] for w in workloads])
        ax.set_ylabel(label + ", log scale")
        ax.set_title(f"Per-step overhead by contender ({result.get('machine', {}).get('device', '')})")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_checkpoint(result: dict[str, Any], out: Path) -> list[Path]:
    """``checkpoint_stall.png``: loop blocked per save, synchronous vs async."""
    plt = _pyplot()
    if plt is None or not result.get("modes"):
        return []
    out.mkdir(parents=True, exist_ok=True)
    modes = result["modes"]
    fig, ax = plt.subplots(figsize=(5, 4))
    names = list(modes)
    ax.bar(names, [modes[n]["stall_ms"]["median"] for n in names], color=["C0", "C1"][: len(names)])
    ax.set_ylabel("loop blocked per save (ms, median)")
    ax.set_title(f"Checkpoint stall, {result['model_mb']:.0f} MB model")
    fig.tight_layout()
    path = out / "checkpoint_stall.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
