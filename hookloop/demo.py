"""``hookloop demo``: a small real training run on scikit-learn's bundled digits."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

from hookloop.loop import Loop

__all__ = ["main"]


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _digits(seed: int = 0) -> tuple[Batches, Batches]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise SystemExit("the demo needs scikit-learn: pip install 'hookloop[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, cut, 64)]
    val = [(x[i : i + 256], y[i : i + 256]) for i in range(cut, len(x), 256)]
    return train, val


def main(argv: Sequence[str] | None = None) -> int:
    """Train a small CNN on digits and print the validation accuracy per epoch."""
    parser = argparse.ArgumentParser(prog="hookloop demo")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, val = _digits()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )
    acc = {"acc": lambda out, y: (out.argmax(1) == y).float().mean()}

    class Report:
        def on_train_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            print(f"epoch {epoch}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    loop = Loop(model, torch.optim.Adam(model.parameters(), lr=3e-3), train, val_data=val,
                loss_fn=nn.functional.cross_entropy, val_metrics=acc, plugins=[Report()])
    loop.fit(max_epochs=args.epochs)
    print(f"final validation accuracy: {loop.state.metrics['val/acc']:.3f}")
    return 0
