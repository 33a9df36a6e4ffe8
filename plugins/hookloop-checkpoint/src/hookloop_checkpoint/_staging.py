"""The host staging buffer of async saves: preallocated tensors that each async save
copies the state into, kept from one save to the next.

The copy is the only part of an async save that blocks the training loop. Into fresh
tensors it costs an allocation and a page fault per page on top of the copy itself;
into tensors kept from the previous save (already allocated, already touched) it runs
at memory-copy speed. On CUDA the buffers are pinned (page-locked), so the device to
host copies are DMA transfers issued with ``non_blocking=True`` and waited for once, at
the end.

The buffers are keyed by the tensor's place in the state (its path of keys and
indices) and its layout (shape, strides, dtype, device type): a save whose state has
the same layout reuses every buffer; a tensor that appears, disappears or changes
shape or dtype (freezing adds optimizer state, a module is added) gets a new buffer
and the unused ones are released. The writer thread serialises from these buffers, so
the caller must not start a new copy while a write of the previous one is in flight.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StagingBuffer", "cpu_copy"]

# (shape, strides, dtype, device type, pinned)
_Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, str, bool]
# a tensor's path of keys and indices in the state -> (its layout, its buffer)
_Buffers = dict[tuple[Any, ...], tuple[_Layout, torch.Tensor]]


def cpu_copy(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to fresh CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj


def _stageable(t: torch.Tensor) -> bool:
    """A plain dense tensor whose bytes a preallocated host tensor can take; anything
    else (sparse, quantized, nested, a subclass, a lazy conjugate) is copied fresh."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
            and not t.is_quantized and not t.is_nested and not t.is_meta
            and not t.is_conj() and not t.is_neg())


class StagingBuffer:
    """Host tensors for the state's tensors, reused while the state's layout holds.

    :meth:`copy` returns the same structure as :func:`cpu_copy` (dicts, lists and
    tuples rebuilt, other objects shared), its tensors being views of nothing but these
    buffers: each a tensor of its own, so that it serialises exactly as a fresh copy.
    """

    def __init__(self) -> None:
        self._buffers: _Buffers = {}
        self.allocations = 0
        """Buffers allocated so far (a save that reuses every buffer adds none)."""

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(t.numel() * t.element_size() for _, t in self._buffers.values())

    def __len__(self) -> int:
        return len(self._buffers)

    def copy(self, obj: Any) -> Any:
        """Copy ``obj``'s tensors into the buffers (allocating those whose layout is new)
        and return the state made of them; waits for device copies before returning."""
        used: _Buffers = {}
        devices: set[torch.device] = set()
        try:
            out = self._copy(obj, (), used, devices)
        finally:
            for device in devices:  # one wait per CUDA device, after every copy was issued
                torch.cuda.current_stream(device).synchronize()
        self._buffers = used  # buffers of tensors gone from the state are released
        return out

    def _copy(self, obj: Any, path: tuple[Any, ...], used: _Buffers,
              devices: set[torch.device]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._stage(obj, path, used, devices)
        if isinstance(obj, dict):
            return {k: self._copy(v, (*path, k), used, devices) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, (*path, i), used, devices) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, (*path, i), used, devices) for i, v in enumerate(obj))
        return obj

    def _stage(self, src: torch.Tensor, path: tuple[Any, ...],
               used: _Buffers, devices: set[torch.device]) -> torch.Tensor:
        if not _stageable(src):
            return cpu_copy(src)
        src = src.detach()
        pin = src.device.type == "cuda"
        layout: _Layout = (tuple(src.shape), tuple(src.stride()), src.dtype, src.device.type, pin)
        held = self._buffers.get(path)
        if held is not None and held[0] == layout:
            dst = held[1]
        else:
            # same strides as a fresh ``.to("cpu", copy=True)`` (preserve_format)
            dst = torch.empty_like(src, device="cpu", pin_memory=pin)
            self.allocations += 1
        used[path] = (layout, dst)
        if pin:
            dst.copy_(src, non_blocking=True)
            devices.add(src.device)
        else:
            dst.copy_(src)
        return dst
