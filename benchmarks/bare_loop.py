"""The bare loop against the raw loop on the tiny MLP: time in short paired blocks,
and instructions counted by callgrind.

The target "tiny MLP, hookloop with no plugins, over the raw loop <= 3%" is a
difference of a few microseconds on a step of about a hundred, on a machine whose
speed may drift by more than that between two whole fits. So the two contenders are
compared where drift cannot come between them:

- **Time, paired blocks.** One process, one torch thread. The raw loop and one
  hookloop ``Loop`` with no plugins (each ``fit`` call runs one more epoch) take turns
  over the same epoch of pre-generated batches, in ABBA order; each epoch is timed from
  inside by :class:`benchlib.FetchClock` (first batch to last, so fit start-up and end
  are left out). A pair's figure is hookloop minus raw, in % of raw; a round's figure
  is the median over its pairs; the suite's figure is the median over rounds with its
  spread (min..max across rounds).
- **Instructions** (when ``valgrind`` is on ``PATH``, and not with ``--quick``): the
  same two contenders in a child process under ``valgrind --tool=callgrind``, which
  zeroes its counters when an epoch's first batch is handed out and writes them out at
  the last (the markers are calls to ``os.getppid`` and ``os.getpgrp``, which nothing
  else in that process makes). Instructions per step of each, and hookloop's
  overhead in % of raw's, per round. A count, not a time: it repeats exactly whatever
  else the machine does, but it does not see cache misses or memory stalls, and torch
  under valgrind runs its AVX2 kernels whatever the CPU has. It says where the loop's
  own work stands; the time figure says what users get.

Run alone: ``python benchmarks/bare_loop.py [--device cpu|cuda] [--quick] [--out DIR]
[--no-instructions]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import LOG_EVERY, Target, format_table, log
from torch.nn import functional as F

# steps per epoch, pairs per round, rounds
SIZES = {False: (200, 20, 9), True: (6, 2, 1)}
COUNT_STEPS, COUNT_ROUNDS = 101, 3  # under callgrind: 100 counted steps per epoch
LIMIT_PCT = 3.0
CONTENDERS = ("raw", "hookloop")


def _batches(n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = benchlib.seeded(1)
    return [(torch.randn(32, 32, generator=g).to(device), torch.randn(32, 1, generator=g).to(device))
            for _ in range(n)]


class _Pair:
    """The raw loop and a hookloop ``Loop`` (no plugins) on copies of one tiny MLP, each
    consuming its own epoch iterable; :meth:`epoch` runs one epoch of either."""

    def __init__(self, batches: list[Any], device: torch.device, clock: Any) -> None:
        from workloads import tiny_mlp

        from hookloop import Loop

        torch.manual_seed(0)
        template = tiny_mlp().to(device)
        self.raw_data = clock(batches)
        self.hook_data = clock(batches)
        self.raw_model = copy.deepcopy(template)
        self.raw_opt = torch.optim.SGD(self.raw_model.parameters(), lr=0.01, momentum=0.9)
        model = copy.deepcopy(template)
        self.loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), self.hook_data,
                         loss_fn=F.mse_loss, log_every_n_steps=LOG_EVERY, autoload=False, distributed=False)
        self.epochs = 0

    def epoch(self, who: str) -> None:
        """One epoch of the raw loop (``"raw"``) or of the hookloop fit (``"hookloop"``)."""
        if who == "raw":
            model, opt = self.raw_model, self.raw_opt
            for x, y in self.raw_data:
                loss = F.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            self.epochs += 1
            self.loop.fit(max_epochs=self.epochs)


def time_pairs(device: torch.device, quick: bool) -> dict[str, Any]:
    """The paired-block timing (see the module's docstring)."""
    steps, pairs, rounds = SIZES[quick]
    batches = _batches(steps, device)
    pair = _Pair(batches, device, lambda b: benchlib.FetchClock(b, device))
    for who in CONTENDERS * 2:  # warm-up, not timed
        pair.epoch(who)
    pair.raw_data.take()
    pair.hook_data.take()
    per_round: dict[str, list[float | None]] = {c: [] for c in CONTENDERS}
    pcts: list[float | None] = []
    pairs_run = 0
    for r in range(rounds):
        if r > 0 and benchlib.out_of_time(10.0):
            log(f"  bare loop: time budget: stopping after {r} of {rounds} rounds")
            break
        for p in range(pairs):
            for who in (CONTENDERS if p % 2 == 0 else CONTENDERS[::-1]):
                pair.epoch(who)
        raw = [t * 1e6 for t in pair.raw_data.take()]
        hook = [t * 1e6 for t in pair.hook_data.take()]
        pairs_run += len(raw)
        per_round["raw"].append(statistics.median(raw))
        per_round["hookloop"].append(statistics.median(hook))
        pcts.append(statistics.median(100.0 * (h - a) / a for a, h in zip(raw, hook, strict=True)))
        log(f"  bare loop: round {r + 1}/{rounds}: raw {per_round['raw'][-1]:.1f} us/step, "
            f"hookloop {pcts[-1]:+.2f}%")
    pair.loop.close()
    return {"steps_per_epoch": steps, "pairs_per_round": pairs, "rounds": rounds, "rounds_run": len(pcts),
            "pairs_run": pairs_run, "torch_threads": torch.get_num_threads(),
            "us_per_step": {c: benchlib.over_rounds(v) for c, v in per_round.items()},
            "overhead_pct": benchlib.over_rounds(pcts)}


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
    pair = _Pair(_batches(COUNT_STEPS, torch.device("cpu")), torch.device("cpu"), _Marked)
    for _ in range(rounds + 1):
        for who in CONTENDERS:
            pair.epoch(who)
    pair.loop.close()


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


def run(device: torch.device, quick: bool, root: Path | None = None, stack: Any = None,
        count: bool = True) -> dict[str, Any]:
    """Both measurements; returns the JSON-ready result with its target. ``root`` and
    ``stack`` are unused (the suite passes them to every part)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log(f"bare loop: paired blocks on {device.type}")
        out: dict[str, Any] = {"device": device.type, "time": time_pairs(device, quick)}
    finally:
        torch.set_num_threads(threads)
    if quick or not count or device.type != "cpu":
        why = "--quick" if quick else "--no-instructions" if not count else "CPU only"
        out["instructions"] = {"error": f"not run ({why})"}
    elif benchlib.out_of_time(400.0):
        out["instructions"] = {"error": "not run: time budget (about 5 minutes under valgrind)"}
    else:
        log("bare loop: counting instructions under callgrind (about 5 minutes)")
        out["instructions"] = instructions()
    t = out["time"]
    note = f"paired blocks, {t['rounds_run']} rounds of {t['pairs_per_round']} pairs"
    target = benchlib.target_from_rounds("tiny MLP, hookloop no plugins over raw", t["overhead_pct"],
                                         LIMIT_PCT, "% of raw step", note)
    out["targets"] = [target.as_dict()]
    return out


def report(result: dict[str, Any]) -> str:
    """The printed lines of this part."""
    t = result["time"]
    us = t["us_per_step"]
    lines = [f"bare loop, tiny MLP 32-64-64-1, batch 32, {result['device']}, one torch thread: "
             f"{t['rounds_run']} rounds of {t['pairs_per_round']} paired epochs of "
             f"{t['steps_per_epoch']} steps (ABBA); median [min..max] across rounds"]
    rows = [["raw", us["raw"]["median"], benchlib.rng(us["raw"]), None, None],
            ["hookloop, no plugins", us["hookloop"]["median"], benchlib.rng(us["hookloop"]),
             t["overhead_pct"]["median"], benchlib.rng(t["overhead_pct"])]]
    lines.append(format_table(rows, ["contender", "us/step", "[min..max]", "over raw %", "[min..max]"]))
    ins = result["instructions"]
    if "error" in ins:
        lines.append(f"instructions per step: {ins['error']}")
    else:
        raw, hook, pct = ins["per_step"]["raw"], ins["per_step"]["hookloop"], ins["overhead_pct"]
        lines.append(f"instructions per step (callgrind, {ins['rounds']} rounds of "
                     f"{ins['steps_per_epoch']} steps): "
                     f"raw {raw['median']:,.0f}, hookloop {hook['median']:,.0f}, "
                     f"+{ins['overhead']['median']:,.0f} = {pct['median']:+.2f}% "
                     f"[{pct['min']:+.2f}..{pct['max']:+.2f}]")
    lines.append("targets:")
    lines += [Target.from_dict(d).line() for d in result["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), no callgrind")
    parser.add_argument("--out", type=Path, help="folder for bare_loop.json")
    parser.add_argument("--no-instructions", action="store_true", help="skip the callgrind count")
    parser.add_argument("--count-child", type=int, metavar="ROUNDS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_child is not None:
        count_child(args.count_child)
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
