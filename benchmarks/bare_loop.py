"""The bare loop against the raw loop on the tiny MLP (CPU): time, step against step,
and instructions counted by callgrind.

The target "tiny MLP, hookloop with no plugins, over the raw loop <= 3%" is a
difference of a few microseconds on a step of a hundred or more, on a machine whose
speed may drift by more than that between two whole fits (a shared VM's does, by 2x).
So the two are compared where drift cannot come between them:

- **Time, step against step.** A fresh process (the state a training script's
  process is in), one torch thread. A hookloop ``Loop`` with no plugins trains on an
  iterable that runs, for each batch, one step of the raw loop on the same batch (its
  own copy of the model and optimizer) and times it; the time from handing out a
  batch to being asked for the next is hookloop's step. The two steps on a batch run
  back to back, and which runs first alternates by window: whichever runs second is
  measured about 0.4% faster (the raw loop against itself), so a fixed order would
  favour one side. The epoch is cut into windows of one log interval (50 steps, so
  each holds one interval reduction); the first is dropped (warming up). A round's
  figure is the mean of two medians, over its raw-first and its raw-second windows,
  of (hookloop's time - raw's) / raw's, in %. The figure is the median over rounds
  (one epoch each) with its spread (min..max across rounds). The suite also measures
  it in its own process, after its workloads part has trained there (the full stack
  with its trackers, the compiled CNN, the peers when installed), and reports that
  beside the target: in such a process the loop's share of the step is larger, for
  reasons not pinned down (docs/benchmarks.md).
- **Instructions** (when ``valgrind`` is on ``PATH``, and not with ``--quick``): raw
  loop epochs and hookloop epochs in a child process under ``valgrind
  --tool=callgrind``, which zeroes its counters when an epoch's first batch is handed
  out and writes them out at the last (the markers are calls to ``os.getppid`` and
  ``os.getpgrp``, which nothing else in that process makes). Instructions per step of
  each, and hookloop's overhead in % of raw's, per round. A count, not a time: it
  does not depend on what else the machine does (it moves a little between rounds,
  with where Python's garbage collections land), but it does not see cache misses or
  branch mispredictions, and torch under valgrind runs its AVX2 kernels whatever the
  CPU has. It says where the loop's own work stands; the time figure says what users get.

Run alone: ``python benchmarks/bare_loop.py [--quick] [--out DIR] [--no-instructions]``
(``--device`` is accepted for the suite; the target is a CPU one, and on another
device this part is reported as not run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import LOG_EVERY, Target, format_table, log
from torch.nn import functional as F

SIZES = {False: (2000, 9), True: (24, 1)}  # steps per epoch (one epoch a round), rounds
COUNT_STEPS, COUNT_ROUNDS = 301, 3  # under callgrind: 300 counted steps per epoch
LIMIT_PCT = 3.0
CONTENDERS = ("raw", "hookloop")


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = benchlib.seeded(1)
    return [(torch.randn(32, 32, generator=g), torch.randn(32, 1, generator=g)) for _ in range(n)]


class _Interleaved:
    """The epoch hookloop consumes, with the raw loop's steps run inside it.

    Each batch gets one step of the raw loop (its own copy of the model and optimizer;
    the loss is kept until the next step, as a hand-written loop keeps it), timed, on
    the same batch as hookloop's step and a millisecond from it. The order alternates
    by blocks of ``window`` steps: in even blocks the raw step runs before the batch is
    handed out (raw first), in odd blocks when hookloop asks for the next batch, right
    after hookloop's step on it (raw second). Whichever runs second on a batch is
    measured a little faster (about 0.4% of the step, the same code against itself),
    so a fixed order would favour one side. The time from handing out a batch to being
    asked for the next is hookloop's step."""

    def __init__(self, batches: list[Any], model: torch.nn.Module, window: int) -> None:
        self.batches = batches
        self.model = model
        self.window = window
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.raw: list[float] = []
        self.hook: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def _raw_step(self, batch: Any) -> None:
        x, y = batch
        model, opt, loss_fn, clock = self.model, self.opt, F.mse_loss, time.perf_counter
        t0 = clock()
        # the last step's loss (and graph) goes here, after the forward, as in a loop
        self.loss = loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.raw.append(clock() - t0)

    def __iter__(self) -> Any:
        clock, hook, window, raw_step = time.perf_counter, self.hook, self.window, self._raw_step
        handed = None
        after = None  # a batch whose raw step runs after hookloop's
        for i, batch in enumerate(self.batches):
            back = clock()
            if handed is not None:
                hook.append(back - handed)
            if after is not None:
                raw_step(after)
                after = None
            if (i // window) % 2 == 0:
                raw_step(batch)
            else:
                after = batch
            handed = clock()
            yield batch
        if handed is not None:
            hook.append(clock() - handed)
        if after is not None:
            raw_step(after)


def _contenders(data: Callable[[torch.nn.Module], Any]) -> tuple[torch.nn.Module, Any, Any]:
    """The tiny MLP twice, with the same initial weights: the raw loop's copy, the
    iterable ``data(raw_model)`` builds, and a hookloop ``Loop`` with no plugins training
    the other copy on that iterable."""
    from workloads import tiny_mlp

    from hookloop import Loop

    torch.manual_seed(0)
    template = tiny_mlp()
    raw_model, model = copy.deepcopy(template), copy.deepcopy(template)
    it = data(raw_model)
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), it, loss_fn=F.mse_loss,
                log_every_n_steps=LOG_EVERY, autoload=False, distributed=False)
    return raw_model, it, loop


def time_interleaved(quick: bool) -> dict[str, Any]:
    """The interleaved timing (see the module's docstring)."""
    steps, rounds = SIZES[quick]
    window = min(LOG_EVERY, steps // 4)
    _, it, loop = _contenders(lambda m: _Interleaved(_batches(steps), m, window))
    loop.fit(max_epochs=1)  # warm-up, not counted
    per_round: dict[str, list[float | None]] = {c: [] for c in CONTENDERS}
    pcts: list[float | None] = []
    by_order: dict[str, list[float | None]] = {"raw_first": [], "raw_second": []}
    for r in range(rounds):
        if r > 0 and benchlib.out_of_time(10.0):
            log(f"  bare loop: time budget: stopping after {r} of {rounds} rounds")
            break
        it.raw.clear()
        it.hook.clear()
        loop.fit(max_epochs=r + 2)
        raw, hook = it.raw, it.hook
        per_round["raw"].append(1e6 * statistics.median(raw[window:]))
        per_round["hookloop"].append(1e6 * statistics.median(hook[window:]))
        # windows of one log interval (one reduction in each) and one order; the first
        # window of the epoch is left out (warming up)
        over: dict[int, list[float]] = {0: [], 1: []}
        for w in range(1, len(raw) // window):
            a, b = sum(raw[w * window:(w + 1) * window]), sum(hook[w * window:(w + 1) * window])
            over[w % 2].append(100.0 * (b - a) / a)
        first, second = statistics.median(over[0]), statistics.median(over[1])
        by_order["raw_first"].append(first)
        by_order["raw_second"].append(second)
        pcts.append((first + second) / 2)  # each order weighs the same
        log(f"  bare loop: round {r + 1}/{rounds}: raw {per_round['raw'][-1]:.1f} us/step, "
            f"hookloop {pcts[-1]:+.2f}% (raw first {first:+.2f}%, raw second {second:+.2f}%)")
    loop.close()
    return {"steps_per_epoch": steps, "rounds": rounds, "rounds_run": len(pcts), "window": window,
            "torch_threads": torch.get_num_threads(),
            "us_per_step": {c: benchlib.over_rounds(v) for c, v in per_round.items()},
            "overhead_pct": benchlib.over_rounds(pcts),
            "overhead_pct_by_order": {k: benchlib.over_rounds(v) for k, v in by_order.items()}}


# ----------------------------------------------------------------------------- instructions


class _Marked:
    """An epoch over ``batches`` that tells callgrind where the counted steps begin and
    end: ``os.getppid()`` before the first batch (``--zero-before=getppid``) and
    ``os.getpgrp()`` before the last (``--dump-before=getpgrp``)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        last = len(self.batches) - 1
        os.getppid()
        for i in range(last):
            yield self.batches[i]
        os.getpgrp()
        yield self.batches[last]


def count_child(rounds: int) -> None:
    """Run inside callgrind: a warm-up epoch of each contender, then ``rounds`` of each
    (raw first); every epoch writes one dump."""
    torch.set_num_threads(1)
    model, _, loop = _contenders(lambda m: _Marked(_batches(COUNT_STEPS)))
    data = _Marked(_batches(COUNT_STEPS))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for r in range(rounds + 1):
        for x, y in data:
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        loop.fit(max_epochs=r + 1)
    loop.close()


_SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.M)


def read_dumps(folder: Path, prefix: str) -> list[int]:
    """Instruction counts of callgrind's dumps ``<prefix>.<n>`` in ``folder``, in dump
    order (the final dump, without a number, is the process's exit and is left out)."""
    found = []
    for path in folder.glob(prefix + ".*"):
        tail = path.name[len(prefix) + 1:]
        if tail.isdigit():
            m = _SUMMARY.search(path.read_bytes())
            if m is None:
                raise ValueError(f"{path}: no 'summary:' line (not a callgrind dump?)")
            found.append((int(tail), int(m.group(1))))
    return [count for _, count in sorted(found)]


def instructions(rounds: int = COUNT_ROUNDS) -> dict[str, Any]:
    """Instructions per step of each contender under callgrind (see the docstring);
    ``{"error": ...}`` when valgrind is missing or the child fails."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"error": "valgrind not found on PATH"}
    steps = COUNT_STEPS - 1
    with tempfile.TemporaryDirectory(prefix="hookloop-callgrind-") as tmp:
        cmd = [valgrind, "--tool=callgrind", "--zero-before=getppid", "--dump-before=getpgrp",
               f"--callgrind-out-file={tmp}/cg.out", sys.executable, str(Path(__file__).resolve()),
               "--count-child", str(rounds)]
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, check=False)
        if proc.returncode != 0:
            return {"error": f"callgrind child exited {proc.returncode}: {proc.stderr[-400:]}"}
        counts = read_dumps(Path(tmp), "cg.out")
    expected = 2 * (rounds + 1)
    if len(counts) != expected:
        return {"error": f"expected {expected} callgrind dumps, found {len(counts)}: "
                         "a marker fired elsewhere"}
    per_step = [c / steps for c in counts[2:]]  # the warm-up epochs left out
    raw, hook = per_step[0::2], per_step[1::2]
    pcts = [100.0 * (h - a) / a for a, h in zip(raw, hook, strict=True)]
    return {"steps_per_epoch": steps, "rounds": rounds,
            "per_step": {"raw": benchlib.over_rounds(raw), "hookloop": benchlib.over_rounds(hook)},
            "overhead": benchlib.over_rounds([h - a for a, h in zip(raw, hook, strict=True)]),
            "overhead_pct": benchlib.over_rounds(pcts)}


# ----------------------------------------------------------------------------- suite part


def time_in_fresh_process(quick: bool) -> dict[str, Any]:
    """:func:`time_interleaved` in a new Python process (the state a training script's
    process is in), with this process's time budget; ``{"error": ...}`` if it fails."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--time-child", "quick" if quick else "full"]
    left = benchlib.time_left()
    if left != float("inf"):
        cmd += ["--budget-s", f"{left:.0f}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # progress on stderr
    if proc.returncode != 0:
        return {"error": f"the timing process exited {proc.returncode}"}
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def run(device: torch.device, quick: bool, root: Path | None = None, stack: Any = None,
        count: bool = True, here: bool = False) -> dict[str, Any]:
    """Both measurements; returns the JSON-ready result with its target. The target's
    timing runs in a fresh process; with ``here`` (the suite, whose process has run the
    workloads by then), it is also measured in this process and reported beside it.
    ``root`` and ``stack`` are unused (the suite passes them to every part)."""
    name = "tiny MLP, hookloop no plugins over raw"
    if device.type != "cpu":
        why = f"a CPU target; not run on {device.type}"
        return {"device": device.type, "skipped": why,
                "targets": [Target(name, None, LIMIT_PCT, "% of raw step", why).as_dict()]}
    log("bare loop: hookloop's steps against raw steps, interleaved, in a fresh process")
    out: dict[str, Any] = {"device": device.type, "time": time_in_fresh_process(quick)}
    if here:
        log("bare loop: the same in this process")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["time_here"] = time_interleaved(quick)
        finally:
            torch.set_num_threads(threads)
    if quick or not count:
        out["instructions"] = {"error": "not run (" + ("--quick" if quick else "--no-instructions") + ")"}
    elif benchlib.out_of_time(400.0):
        out["instructions"] = {"error": "not run: time budget (about 7 minutes under valgrind)"}
    else:
        log("bare loop: counting instructions under callgrind (about 7 minutes)")
        out["instructions"] = instructions()
    t = out["time"]
    if "error" in t:
        out["targets"] = [Target(name, None, LIMIT_PCT, "% of raw step", t["error"]).as_dict()]
        return out
    note = f"step against step, {t['rounds_run']} rounds of {t['steps_per_epoch']} steps, fresh process"
    out["targets"] = [benchlib.target_from_rounds(name, t["overhead_pct"], LIMIT_PCT, "% of raw step",
                                                  note).as_dict()]
    return out


def _time_rows(t: dict[str, Any], where: str) -> list[list[Any]]:
    """Table rows of one interleaved timing."""
    us, order = t["us_per_step"], t["overhead_pct_by_order"]
    rows = [[f"raw{where}", us["raw"]["median"], benchlib.rng(us["raw"]), None, None],
            [f"hookloop, no plugins{where}", us["hookloop"]["median"], benchlib.rng(us["hookloop"]),
             t["overhead_pct"]["median"], benchlib.rng(t["overhead_pct"])]]
    for key, label in (("raw_first", "raw step first"), ("raw_second", "raw step second")):
        o = order[key]
        rows.append([f"  windows with the {label}", None, None, o["median"], benchlib.rng(o)])
    return rows


def report(result: dict[str, Any]) -> str:
    """The printed lines of this part."""
    if result.get("skipped"):
        return benchlib.report_text([f"bare loop: NOT RUN: {result['skipped']}"], result["targets"])
    t = result["time"]
    if "error" in t:
        return benchlib.report_text([f"bare loop: {t['error']}"], result["targets"])
    lines = [f"bare loop, tiny MLP 32-64-64-1, batch 32, CPU, one torch thread: each hookloop step "
             f"beside a raw step on the same batch, the order alternating by window; {t['rounds_run']} "
             f"rounds of {t['steps_per_epoch']} steps, windows of {t['window']}; median [min..max] "
             "across rounds; a round's figure is the mean of its two orders'"]
    rows = _time_rows(t, " (fresh process)")
    if "time_here" in result:
        rows += _time_rows(result["time_here"], " (the suite's process)")
    lines.append(format_table(rows, ["contender", "us/step", "[min..max]", "over raw %", "[min..max]"]))
    ins = result["instructions"]
    if "error" in ins:
        lines.append(f"instructions per step: {ins['error']}")
    else:
        raw, hook, pct = ins["per_step"]["raw"], ins["per_step"]["hookloop"], ins["overhead_pct"]
        lines.append(f"instructions per step (callgrind, {ins['rounds']} rounds of "
                     f"{ins['steps_per_epoch']} steps): raw {raw['median']:,.0f}, "
                     f"hookloop {hook['median']:,.0f}, "
                     f"+{ins['overhead']['median']:,.0f} = {pct['median']:+.2f}% "
                     f"[{pct['min']:+.2f}..{pct['max']:+.2f}]")
    return benchlib.report_text(lines, result["targets"])


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), no callgrind")
    parser.add_argument("--out", type=Path, help="folder for bare_loop.json")
    parser.add_argument("--no-instructions", action="store_true", help="skip the callgrind count")
    parser.add_argument("--count-child", type=int, metavar="ROUNDS", help=argparse.SUPPRESS)
    parser.add_argument("--time-child", choices=("quick", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_child is not None:
        count_child(args.count_child)
        return 0
    if args.time_child is not None:  # one JSON line on stdout
        benchlib.set_budget(args.budget_s)
        torch.set_num_threads(1)
        print(json.dumps(time_interleaved(args.time_child == "quick")))
        return 0
    device = torch.device(args.device)
    result = run(device, args.quick, count=not args.no_instructions)
    result["machine"] = benchlib.machine_info(device)
    if args.out is not None:
        benchlib.write_json(args.out.resolve() / "bare_loop.json", result)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
