"""Dispatch micro-benchmark and the framework overhead per step of ``Loop.fit``.

Part 1, one hook call (``on_train_batch_end``) with 0, 1 and 10 implementations and
with a wrapper, three ways:

- hookloop: the compiled caller, ``h = callers.on_train_batch_end; if h is not None:
  h(loop, outputs, batch, batch_idx)`` (what the loop does on every step);
- pluggy: ``pm.hook.on_train_batch_end(loop=..., outputs=..., batch=..., batch_idx=...)``;
- plain: a Python ``for`` loop over the same bound methods (for the wrapper case, a
  hand-written drive of the wrapper generator around the implementation).

Each figure is the median over interleaved repetitions of ``timeit`` runs; "net"
subtracts the cost of timeit's empty loop, which is also printed.

Part 2, ``fit`` with a step function that does nothing against a bare Python loop
calling the same no-op over the same batches (``FetchClock`` times the batches of
each epoch from inside, so start-up and epoch-end work are left out), with 0, 1, 2,
4, 8 and 16 no-op plugins and with every bundled plugin that is installed.

Run alone: ``python benchmarks/dispatch.py [--device cpu|cuda] [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import FetchClock, NoopPlugin, Target, format_table, log, summarize
from torch import nn

from hookloop.plugins import PluginManager, hookimpl

HOOK = "on_train_batch_end"
PLUGIN_COUNTS = (0, 1, 2, 4, 8, 16)


class _Impl:
    """One no-op implementation of ``on_train_batch_end``."""

    @hookimpl
    def on_train_batch_end(self, loop: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """No-op."""


class _Wrapper:
    """A new-style pluggy wrapper around ``on_train_batch_end`` that does nothing."""

    @hookimpl(wrapper=True)
    def on_train_batch_end(
        self, loop: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> Iterator[None]:
        """Pass the result through."""
        return (yield)


def _manager(impls: int, wrapper: bool) -> tuple[PluginManager, list[Any]]:
    pm = PluginManager()
    plugins: list[Any] = [_Impl() for _ in range(impls)]
    for i, p in enumerate(plugins):
        pm.register(p, name=f"impl{i}")
    if wrapper:
        w = _Wrapper()
        pm.register(w, name="wrapper")
        plugins.append(w)
    return pm, plugins


def _plain_wrapped(wrap: Callable[..., Any], impl: Callable[..., Any]) -> Callable[..., Any]:
    """The hand-written equivalent of one wrapper around one implementation."""

    def call(loop: Any, outputs: Any, batch: Any, batch_idx: int) -> Any:
        gen = wrap(loop, outputs, batch, batch_idx)
        next(gen)
        result = impl(loop, outputs, batch, batch_idx)
        try:
            gen.send([result] if result is not None else [])
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("wrapper did not stop")

    return call


CASES = (("0 impls", 0, False), ("1 impl", 1, False), ("10 impls", 10, False), ("wrapper + 1 impl", 1, True))


def dispatch_cases() -> tuple[dict[str, dict[str, tuple[str, str, dict[str, Any]]]], dict[str, str]]:
    """Case name to ``{way: (stmt, setup, globals)}`` for ``timeit``, and the cases
    whose plugin manager could not be built (name to error)."""
    cases: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {}
    errors: dict[str, str] = {}
    args_setup = "loop = _loop; o = None; b = None\n"
    for label, impls, wrapper in CASES:
        try:
            pm, plugins = _manager(impls, wrapper)
        except Exception as exc:  # report the case as failed; the others still run
            errors[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
            log(f"dispatch: {label}: registration failed: {errors[label]}")
            continue
        g: dict[str, Any] = {"_pm": pm, "_loop": object()}
        if wrapper:
            g["_plain"] = _plain_wrapped(plugins[-1].on_train_batch_end, plugins[0].on_train_batch_end)
            plain = ("f(loop, o, b, 0)", args_setup + "f = _plain")
        else:
            g["_fs"] = [p.on_train_batch_end for p in plugins]
            plain = ("for f in fs: f(loop, o, b, 0)", args_setup + "fs = _fs")
        cases[label] = {
            "hookloop": (f"h = callers.{HOOK}\nif h is not None: h(loop, o, b, 0)",
                         args_setup + "callers = _pm.callers", g),
            "pluggy": (f"hook.{HOOK}(loop=loop, outputs=o, batch=b, batch_idx=0)",
                       args_setup + "hook = _pm.hook", g),
            "plain": (*plain, g),
        }
    return cases, errors


def bench_dispatch(repeats: int, budget_s: float) -> dict[str, Any]:
    """Time every case; ``budget_s`` is the time of one timeit run (sets its number)."""
    cases, errors = dispatch_cases()
    timers: dict[tuple[str, str], tuple[timeit.Timer, int]] = {}
    empty = timeit.Timer("pass")
    empty_n = _calibrate(empty, budget_s)
    for label, ways in cases.items():
        for way, (stmt, setup, g) in ways.items():
            t = timeit.Timer(stmt, setup, globals=g)
            timers[(label, way)] = (t, _calibrate(t, budget_s))
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in timers}
    empty_samples: list[float] = []
    for _ in range(repeats):  # interleaved: every case once per repetition
        empty_samples.append(empty.timeit(empty_n) / empty_n)
        for key, (t, n) in timers.items():
            samples[key].append(t.timeit(n) / n)
    loop_s = statistics.median(empty_samples)
    rows = []
    for label, _, _ in CASES:
        row: dict[str, Any] = {"case": label}
        if label in errors:
            row["error"] = errors[label]
            for way in ("hookloop", "pluggy", "plain"):
                row[way] = summarize([])
                row[f"{way}_net_us"] = None
        else:
            for way in cases[label]:
                s = summarize(samples[(label, way)])
                row[way] = s
                row[f"{way}_net_us"] = s["median"] - loop_s * 1e6
        rows.append(row)
    return {"timeit_loop_us": loop_s * 1e6, "rows": rows}


def _calibrate(timer: timeit.Timer, budget_s: float) -> int:
    n = 1
    while True:
        t = timer.timeit(n)
        if t >= budget_s / 10 or n >= 10**7:
            return max(1, int(n * budget_s / max(t, 1e-9)))
        n *= 10


# ----------------------------------------------------------------------------- fit overhead


def noop_model() -> nn.Module:
    """The model of the no-op workload (index "1" is a parameter-free activation)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def noop_batches(n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` tiny ``(x, y)`` batches pre-generated on ``device``."""
    g = benchlib.seeded(0)
    return [(torch.randn(16, 8, generator=g).to(device), torch.randint(0, 2, (16,), generator=g).to(device))
            for _ in range(n)]


def bare_fit(clock: FetchClock, epochs: int) -> None:
    """The floor: a bare Python loop calling the no-op step over the batches."""
    step = benchlib.noop_step
    for _ in range(epochs):
        for batch in clock:
            step(None, batch)


def bench_fit_overhead(
    device: torch.device, steps: int, epochs: int, rounds: int, root: Path,
    stack: benchlib.FullStack | None,
) -> dict[str, Any]:
    """Per-step time of the bare loop and of ``fit`` with 0..16 no-op plugins and with
    the full stack; the first epoch of every fit is warm-up and left out."""
    from workloads import quiet

    batches = noop_batches(steps, device)
    val = batches[:1]
    variants: dict[str, Callable[[], list[Any]]] = {
        f"{k} no-op plugins": (lambda k=k: [NoopPlugin() for _ in range(k)]) for k in PLUGIN_COUNTS
    }
    if stack is not None and stack.chosen:
        variants[f"full stack ({len(stack.chosen)} plugins)"] = lambda: stack.plugins(root)
    samples: dict[str, list[float]] = {"bare loop": [], **{k: [] for k in variants}}
    per_round: dict[str, list[float]] = {k: [] for k in samples}
    for r in range(rounds):
        if r > 0 and benchlib.out_of_time(10.0):
            log(f"dispatch: time budget: stopping after {r} of {rounds} rounds")
            break
        clock = FetchClock(batches, device)
        bare_fit(clock, epochs)
        timed = clock.take()[1:]
        samples["bare loop"] += timed
        per_round["bare loop"].append(statistics.median(timed) * 1e6)
        for name, make in variants.items():
            clock = FetchClock(batches, device)
            loop = benchlib.hookloop_loop(noop_model().to(device), clock, plugins=make(),
                                          step_fn=benchlib.noop_step, val_data=val)
            with quiet():  # progress bars and summaries of the full stack
                loop.fit(max_epochs=epochs)
            timed = clock.take()[1:]
            samples[name] += timed
            per_round[name].append(statistics.median(timed) * 1e6)
    rows = []
    for name, s in samples.items():
        over = benchlib.over_rounds([a - b for a, b in zip(per_round[name], per_round["bare loop"])])
        rows.append({"contender": name, "us_per_step": summarize(s),
                     "us_per_step_rounds": benchlib.over_rounds(per_round[name]),
                     "overhead_us": over["median"], "overhead_us_rounds": over})
    return {"steps_per_epoch": steps, "epochs": epochs, "rounds": len(per_round["bare loop"]),
            "rows": rows}


# ----------------------------------------------------------------------------- driver


def run(
    device: torch.device, quick: bool, root: Path, stack: benchlib.FullStack | None = None
) -> dict[str, Any]:
    """Both parts; returns the JSON-ready result with its targets."""
    if stack is None:
        log("dispatch: resolving the full bundled stack")
        batches = noop_batches(4, device)

        def probe(plugins: list[Any]) -> None:
            benchlib.hookloop_loop(noop_model().to(device), batches, plugins=plugins,
                                   step_fn=benchlib.noop_step, val_data=batches[:1]).fit(max_epochs=1)

        stack = benchlib.resolve_full_stack(root, probe)
    log("dispatch: hook call micro-benchmark")
    micro = bench_dispatch(repeats=3 if quick else 15, budget_s=0.002 if quick else 0.05)
    log("dispatch: fit overhead per step")
    fit = bench_fit_overhead(device, steps=20 if quick else 3000, epochs=2 if quick else 4,
                             rounds=1 if quick else 5, root=root, stack=stack)
    targets = dispatch_targets(micro, fit, stack)
    return {"micro": micro, "fit": fit, "stack": stack.as_dict(),
            "targets": [t.as_dict() for t in targets]}


def dispatch_targets(micro: dict[str, Any], fit: dict[str, Any], stack: benchlib.FullStack) -> list[Target]:
    """The targets of the core issue, from the measured figures."""
    rows = {r["case"]: r for r in micro["rows"]}
    loop_us = micro["timeit_loop_us"]

    def spread(r: dict[str, Any]) -> tuple[float, float] | None:
        s = r.get("hookloop") or {}
        return None if s.get("min") is None else (s["min"] - loop_us, s["max"] - loop_us)

    out = [Target("hook with 0 impls (hookloop, net)", rows["0 impls"]["hookloop_net_us"], 0.05, "us",
                  "spread: min..max over repetitions", spread(rows["0 impls"]))]
    for label in ("1 impl", "10 impls", "wrapper + 1 impl"):
        r = rows[label]
        if "error" in r:
            out.append(Target(f"hook with {label} (hookloop, net)", None, 0.0, "us", "failed: " + r["error"]))
            continue
        limit = 1.5 * r["plain_net_us"] + 0.1
        out.append(Target(f"hook with {label} (hookloop, net)", r["hookloop_net_us"], round(limit, 4), "us",
                          "1.5 x plain + 0.1 us", spread(r)))
    fits = {r["contender"]: r for r in fit["rows"]}
    out.append(benchlib.target_from_rounds("fit no-op overhead, no plugins",
                                           fits["0 no-op plugins"]["overhead_us_rounds"], 1.0, "us/step"))
    full = [r for name, r in fits.items() if name.startswith("full stack")]
    note = ("missing: " + ", ".join(sorted(stack.missing))) if stack.missing else "all bundled plugins"
    out.append(benchlib.target_from_rounds("fit no-op overhead, full bundled stack",
                                           full[0]["overhead_us_rounds"] if full else None, 2.0, "us/step",
                                           note))
    return out


def report(result: dict[str, Any]) -> str:
    """The printed tables of this script, targets last."""
    micro, fit = result["micro"], result["fit"]
    lines = [f"one call of {HOOK}: median us per call over repetitions (net of timeit's empty loop, "
             f"{micro['timeit_loop_us'] * 1e3:.1f} ns); hookloop [min..max] over repetitions, gross"]
    rows = []
    for r in micro["rows"]:
        if "error" in r:
            rows.append([r["case"], "failed: " + r["error"][:70], None, None, None, None, None])
            continue
        rows.append([r["case"], r["hookloop_net_us"], r["pluggy_net_us"], r["plain_net_us"],
                     r["hookloop"]["median"], benchlib.rng(r["hookloop"]), r["pluggy"]["median"],
                     r["plain"]["median"]])
    lines.append(format_table(rows, ["case", "hookloop", "pluggy", "plain", "hookloop gross", "[min..max]",
                                     "pluggy gross", "plain gross"]))
    lines.append("")
    lines.append(f"fit with a no-op step, {fit['steps_per_epoch']} steps/epoch, median of "
                 f"{fit['rounds']} interleaved rounds x {fit['epochs'] - 1} epochs, [min..max] across rounds")
    rows = [[r["contender"], r["us_per_step_rounds"]["median"], benchlib.rng(r["us_per_step_rounds"]),
             r["overhead_us"], benchlib.rng(r["overhead_us_rounds"])] for r in fit["rows"]]
    lines.append(format_table(rows, ["contender", "us/step", "[min..max]", "overhead us/step", "[min..max]"]))
    if result["stack"]["missing"]:
        lines.append("full stack: missing " + "; ".join(f"{k} ({v[:120]})"
                                                         for k, v in result["stack"]["missing"].items()))
    lines.append("")
    return benchlib.report_text(lines, result["targets"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, help="folder for dispatch.json and plots")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = args.out.resolve() if args.out else None
    with benchlib.sandbox() as root:
        result = run(device, args.quick, root)
    result["machine"] = benchlib.machine_info(device)
    result["quick"] = args.quick
    if out is not None:
        benchlib.write_json(out / "dispatch.json", result)
        import plots

        plots.plot_dispatch(result, out)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
