"""Run a Python block extracted from the docs as written
(``torchrun ... worker_docs.py OUT SNIPPET``), in ``OUT`` (torchrun's working folder).

The snippet cannot write the launch handshake, so this wrapper observes the process
group's creation: ``torch.distributed.init_process_group`` is wrapped to write
``OUT/started.rank<N>`` once the group is up. ``os.replace`` is wrapped to record the
files this rank put in place (the checkpoint plugin's atomic writes). Neither changes
what the snippet does. The records go to ``OUT/docs.rank<N>.json``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch.distributed as tdist
from _worker_common import HANDSHAKE

OUT = Path(sys.argv[1]).resolve()
RANK = int(os.environ["RANK"])


def main() -> None:
    snippet = sys.argv[2]
    original_init = tdist.init_process_group
    original_replace = os.replace
    replaced: list[str] = []
    inits: list[bool] = []

    def init_process_group(*args: Any, **kwargs: Any) -> None:
        original_init(*args, **kwargs)
        inits.append(True)
        (OUT / HANDSHAKE.format(rank=RANK)).write_text("up\n")

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        original_replace(src, dst, **kwargs)
        replaced.append(os.path.relpath(Path(dst).resolve(), OUT))

    tdist.init_process_group = init_process_group
    os.replace = replace  # type: ignore[assignment]
    sys.argv = [snippet]
    try:
        namespace = runpy.run_path(snippet, run_name="__main__")
    finally:
        os.replace = original_replace
        tdist.init_process_group = original_init
    loop = namespace.get("loop")
    result = {"inits": len(inits), "group_up_after": tdist.is_initialized(),
              "replaced": replaced,
              "rank": getattr(getattr(loop, "state", None), "rank", None),
              "world_size": getattr(getattr(loop, "state", None), "world_size", None),
              "global_step": getattr(getattr(loop, "state", None), "global_step", None),
              "closed": getattr(loop, "closed", None)}
    (OUT / f"docs.rank{RANK}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
