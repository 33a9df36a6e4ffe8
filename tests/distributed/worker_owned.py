"""A worker whose process group is created by ``Loop`` itself (from torchrun's
environment), so the loop owns it: ``close()`` destroys it, and so does the exit
handler when the script never closes the loop (``OUT`` then ``with`` or ``atexit``)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as tdist
from _worker_common import HANDSHAKE, global_batches, model, out_dir
from torch import nn

from hookloop import Loop


class Closed:
    """Writes ``closed.rank<N>`` from ``on_close``, with whether the group was still up."""

    def on_close(self, loop: Loop) -> None:
        path = out_dir() / f"closed.rank{loop.state.rank}"
        path.write_text(f"group up in on_close: {tdist.is_initialized()}\n")


def main() -> None:
    how = sys.argv[2]
    assert not tdist.is_initialized()
    net = model()
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.1), global_batches(4, 8),
                loss_fn=nn.functional.mse_loss, plugins=[Closed()], autoload=False)
    rank = loop.state.rank
    (out_dir() / HANDSHAKE.format(rank=rank)).write_text("up\n")
    if how == "with":
        with loop:
            loop.fit(max_steps=3)
            inside = tdist.is_initialized()
        result = {"world": loop.state.world_size, "inside": inside,
                  "after": tdist.is_initialized(), "closed": loop.closed}
        (out_dir() / f"owned.rank{rank}.json").write_text(json.dumps(result))
    else:  # leave the loop open: the exit handler closes it and destroys the group
        loop.fit(max_steps=3)


if __name__ == "__main__":
    main()
