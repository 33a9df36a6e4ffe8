"""Workers for the process-group timeout and the ZeroRedundancyOptimizer refusal
(``torchrun ... worker_scale.py OUT owned|given``).

``owned``: ``Loop(dist_timeout=7)`` creates the process group from torchrun's
environment; the worker records the timeout the group's backend holds. ``given``: the
group is initialised first (``_worker_common.init``); the worker records the errors of
``Loop(dist_timeout=...)`` and of a loop given a ``ZeroRedundancyOptimizer``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as tdist
from _worker_common import HANDSHAKE, dump, global_batches, init, model, out_dir, run
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from hookloop import Loop


def group_timeout_s() -> float:
    """The timeout of the default group's CPU (gloo) backend, in seconds."""
    group = tdist.distributed_c10d._get_default_group()
    backend: Any = group._get_backend(torch.device("cpu"))
    return float(backend.options._timeout.total_seconds())


def owned() -> None:
    assert not tdist.is_initialized()
    net = model()
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), global_batches(4, 8),
                loss_fn=nn.functional.mse_loss, autoload=False, dist_timeout=7)
    (out_dir() / HANDSHAKE.format(rank=loop.state.rank)).write_text("up\n")
    with loop:
        loop.fit(max_steps=2)
        dump("owned", {"world": loop.state.world_size, "timeout_s": group_timeout_s(),
                       "step": loop.state.global_step})


def _error(fn: Any) -> list[str]:
    try:
        fn()
    except Exception as exc:  # recorded for the test to judge
        return [type(exc).__name__, str(exc)]
    return ["", "no error"]


def given() -> None:
    net = model()

    def with_timeout() -> None:
        Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), autoload=False, dist_timeout=5)

    def with_zero() -> None:
        zero = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
        Loop(net, zero, global_batches(4, 8), loss_fn=nn.functional.mse_loss, autoload=False)

    dump("given", {"timeout_error": _error(with_timeout), "zero_error": _error(with_zero),
                   "group_up": tdist.is_initialized(), "default_timeout_s": group_timeout_s()})


def main() -> None:
    how = sys.argv[2]
    if how == "owned":
        owned()
    else:
        init()
        run(given)


if __name__ == "__main__":
    main()
