"""How long the training loop is blocked per checkpoint save, synchronous vs async, as
the ``checkpoint`` plugin itself measures it (``Checkpoint.stats``).

A quick, in-process companion to ``checkpoint_stall.py`` (which measures the gap the
loop sees from outside, against a run without the plugin): call
:func:`measure_save_stall` from a notebook or run
``python benchmarks/checkpoint_save_stall.py [--model-mb 128] [--saves 5] [--device cpu]``.
Benchmark code only: the plugin's runtime package does not carry it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["measure_save_stall"]


def _summary(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000.0 for v in values]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "all": ms}


def measure_save_stall(
    model_mb: float = 128.0,
    saves: int = 5,
    dirpath: str | Path | None = None,
    device: str = "cpu",
    modes: tuple[str, ...] = ("sync", "async"),
) -> dict[str, Any]:
    """Time the loop is blocked per checkpoint save, for a model of ``model_mb`` MB.

    A :class:`~hookloop.Loop` trains a stack of linear layers (float32, about
    ``model_mb`` MB of parameters, SGD with momentum so the optimizer state is as large
    again) and saves a checkpoint at every optimizer step, ``saves`` times per mode.
    Before each save the previous async write is waited for outside the measurement
    (training steps longer than a write), so the async figure is the copy to CPU
    memory only.

    Returns ``{"model_mb", "saves", "device", "modes": {mode: {"stall_ms": {"median",
    "min", "max", "all"}, "write_ms": {...}, "bytes"}}, "ratio"}`` where ``ratio`` is
    the async median stall over the sync one (the goal is at most 0.2).
    """
    from hookloop_checkpoint import Checkpoint

    from hookloop import Loop
    from hookloop.plugins import hookimpl

    width = 2048
    layers = max(1, round(model_mb * 1e6 / (width * width * 4)))
    root = Path(dirpath) if dirpath is not None else Path(tempfile.mkdtemp(prefix="hookloop-ckpt-bench-"))
    result: dict[str, Any] = {"model_mb": layers * width * width * 4 / 1e6, "saves": saves,
                              "device": device, "modes": {}}

    class _WaitBetweenSaves:
        hookloop_name = "bench_wait"

        def __init__(self, ckpt: Checkpoint) -> None:
            self.ckpt = ckpt

        @hookimpl
        def on_train_batch_start(self, loop: Any) -> None:
            self.ckpt.wait(loop)

    try:
        for mode in modes:
            torch.manual_seed(0)
            model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
            opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
            data = [(torch.randn(2, width), torch.randn(2, width))] * saves
            ckpt = Checkpoint(root / mode, every_n_epochs=None, every_n_steps=1, top_k=1,
                              filename="{step}", async_save=(mode == "async"), signals=(), verbose=False)
            loop = Loop(model, opt, data, loss_fn=nn.functional.mse_loss, device=device,
                        plugins=[_WaitBetweenSaves(ckpt), ckpt], autoload=False, log_every_n_steps=10**6)
            loop.fit(max_epochs=1)
            stats = ckpt.stats[:saves]
            result["modes"][mode] = {
                "stall_ms": _summary([s.stall_s for s in stats]),
                "write_ms": _summary([s.write_s or 0.0 for s in stats]),
                "bytes": stats[-1].nbytes if stats else 0,
            }
            del loop, model, opt
    finally:
        if dirpath is None:
            shutil.rmtree(root, ignore_errors=True)
    if "sync" in result["modes"] and "async" in result["modes"]:
        result["ratio"] = (result["modes"]["async"]["stall_ms"]["median"]
                           / result["modes"]["sync"]["stall_ms"]["median"])
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: print the result of :func:`measure_save_stall` as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=float, default=128.0, help="model size in MB (default: 128)")
    parser.add_argument("--saves", type=int, default=5, help="saves per mode (default: 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    result = measure_save_stall(model_mb=args.model_mb, saves=args.saves, device=args.device)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
