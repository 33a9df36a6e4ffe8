"""A worker for the launch helper's own tests: ``torchrun ... worker_setup.py OUT MODE MARK``.

MODE ``setup-once``: the first launch (while the file ``MARK.rank<N>`` does not exist)
aborts on every rank before its process group is up, as a failed set-up would; later
launches run. ``setup-always``:
every launch aborts there. ``after``: rank 0 aborts right after its handshake (a failure
of the worker's own code).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODE = sys.argv[2]
MARK = Path(f"{sys.argv[3]}.rank{os.environ['LOCAL_RANK']}")

if MODE == "setup-always" or (MODE == "setup-once" and not MARK.exists()):
    MARK.touch()
    os.abort()

from _worker_common import dump, init, run  # noqa: E402  (after the simulated set-up failure)

RANK, WORLD = init()


def scenario_ok() -> None:
    """Abort on rank 0 in ``after`` mode; otherwise record that the worker ran."""
    if MODE == "after" and RANK == 0:
        os.abort()
    dump("ok", {"rank": RANK, "world": WORLD})


if __name__ == "__main__":
    run(scenario_ok)
