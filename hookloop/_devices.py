"""Moving nested batches and states between devices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["model_device", "to_device"]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside lists, tuples (named ones too) and mappings
    moved to ``device``; tensors already there are left alone, pinned ones are copied
    non-blocking. Other objects are returned as they are."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        return value.to(device, non_blocking=value.is_pinned())
    if isinstance(value, (list, tuple)):
        moved = [to_device(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
