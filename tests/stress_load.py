"""Run a command several times in a row under an artificial CPU load (``make test-stress``).

    python tests/stress_load.py [--busy N] [--runs R] [--max-seconds S] -- COMMAND ...

Starts ``N`` busy-loop processes (default: one per core), runs ``COMMAND`` ``R`` times
(default 3) and exits with status 1 if any run failed (every run is made). The busy
loops are ended in a ``finally`` on every path (failure, Ctrl-C, SIGTERM); each also
ends by itself after ``S`` seconds or when this process is gone, so none outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

BUSY_LOOP = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
n = 0
while True:
    n += 1
    if n % 200000 == 0 and (time.monotonic() > end or os.getppid() != parent):
        break
"""


def start_busy(n: int, max_seconds: float) -> list[subprocess.Popen[bytes]]:
    """Start ``n`` busy-loop processes that end by themselves after ``max_seconds`` or
    when this process is gone."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid()), str(max_seconds)])
            for _ in range(n)]


def stop_busy(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Kill the busy loops started by :func:`start_busy` and reap them."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
    for p in procs:
        p.wait()


def _raise_exit(signum: int, frame: object) -> None:
    """SIGTERM ends this process through ``finally`` blocks, like Ctrl-C."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the command under load, report each run; 0 if all passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2,
                        help="busy-loop processes (default: one per core)")
    parser.add_argument("--runs", type=int, default=3, help="runs in a row (default 3)")
    parser.add_argument("--max-seconds", type=float, default=3 * 3600,
                        help="lifetime bound of each busy loop (default 3 h)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    signal.signal(signal.SIGTERM, _raise_exit)
    results: list[tuple[int, int, float]] = []
    busy = start_busy(args.busy, args.max_seconds)
    try:
        for run in range(1, args.runs + 1):
            print(f"stress_load: run {run}/{args.runs} under {args.busy} busy loop(s): "
                  f"{' '.join(command)}", flush=True)
            start = time.monotonic()
            rc = subprocess.call(command)
            results.append((run, rc, time.monotonic() - start))
            print(f"stress_load: run {run}/{args.runs} {'passed' if rc == 0 else f'FAILED ({rc})'} "
                  f"in {results[-1][2]:.0f} s", flush=True)
    finally:
        stop_busy(busy)
    failed = [r for r, rc, _ in results if rc != 0]
    summary = ", ".join(f"run {r}: {'ok' if rc == 0 else f'exit {rc}'} ({t:.0f} s)"
                        for r, rc, t in results)
    print(f"stress_load: {len(results) - len(failed)}/{len(results)} runs passed: {summary}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
