"""The staging buffer of async saves: reused across saves, re-allocated when the
state's layout changes, released at close, and never a source of stale values: every
async checkpoint loads equal to the state a sync save would have written at that
moment, also with a slow writer that the next save has to wait for."""

from __future__ import annotations

import io
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hookloop_checkpoint import Checkpoint
from hookloop_checkpoint import _plugin as plugin_mod
from hookloop_checkpoint._staging import StagingBuffer, cpu_copy

from hookloop.plugins import hookimpl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_testlib import make_loop

# ---------------------------------------------------------------- helpers


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality: tensors bit for bit (dtype, shape, strides' values), arrays,
    containers of the same type, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, where


def n_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(n_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(n_tensors(v) for v in obj)
    return 0


def record_states(loop: Any) -> list[Any]:
    """Capture a fresh deep copy of every ``loop.state_dict()`` the plugin takes: what
    a sync save writes at that moment."""
    refs: list[Any] = []
    original = loop.state_dict

    def state_dict(*args: Any, **kwargs: Any) -> Any:
        state = original(*args, **kwargs)
        refs.append(cpu_copy(state))
        return state

    loop.state_dict = state_dict
    return refs


def slow_writes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every file write of the plugin starts late: the next save comes while it runs."""
    atomic_write = plugin_mod.atomic_write

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return atomic_write(*args, **kwargs)

    monkeypatch.setattr(plugin_mod, "atomic_write", slow)


class BufferLog:
    """After each staging copy: the address of each staged model and optimizer tensor,
    by its path in the state, and the number of buffers held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ptrs: list[dict[tuple[Any, ...], int]] = []
        self.held: list[int] = []
        copy = StagingBuffer.copy
        log = self

        def recording(staging: StagingBuffer, obj: Any) -> Any:
            out = copy(staging, obj)
            ptrs: dict[tuple[Any, ...], int] = {}
            for key in ("model", "optimizers"):
                addresses(out[key], (key,), ptrs)
            log.ptrs.append(ptrs)
            log.held.append(len(staging))
            return out

        monkeypatch.setattr(StagingBuffer, "copy", recording)


def addresses(obj: Any, path: tuple[Any, ...], into: dict[tuple[Any, ...], int]) -> None:
    if isinstance(obj, torch.Tensor):
        into[path] = obj.data_ptr()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            addresses(v, (*path, k), into)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            addresses(v, (*path, i), into)


def check_files(ckpt: Checkpoint, refs: list[Any]) -> None:
    """Each save's file loads equal to the state captured at that save."""
    assert len(ckpt.stats) == len(refs) >= 3
    for stat, ref in zip(ckpt.stats, refs):
        saved = torch.load(stat.path, map_location="cpu", weights_only=False)
        assert saved.pop("checkpoint")["name"] == Path(stat.path).stem
        assert_same(ref, saved, Path(stat.path).name)


class LayoutChanges:
    """Changes the state's layout between saves: unfreezing a layer (AdamW then adds
    its state), a new buffer, then that buffer with another shape and dtype."""

    @hookimpl
    def on_train_epoch_start(self, loop: Any, epoch: int) -> None:
        net = loop.module.net
        if epoch == 1:
            net[0].weight.requires_grad_(True)
        elif epoch == 2:
            net.register_buffer("extra", torch.arange(5.0))
        elif epoch == 3:
            net.extra = torch.arange(12, dtype=torch.int64).reshape(3, 4)


# ---------------------------------------------------------------- the buffer alone


def test_reused_when_the_layout_holds_and_serialises_like_a_fresh_copy() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(64, 32, generator=gen), "wt": torch.randn(32, 64, generator=gen).t(),
                       "n": torch.tensor(3)},
             "opt": [{"m": torch.zeros(64, 32)}, (torch.ones(2, dtype=torch.bfloat16), "tag", None)],
             "rng": torch.get_rng_state(), "step": 7}
    staging = StagingBuffer()
    first = staging.copy(state)
    ptrs = [first["model"]["w"].data_ptr(), first["opt"][0]["m"].data_ptr()]
    assert staging.allocations == len(staging) == n_tensors(state) == 6
    assert staging.nbytes == sum(t.numel() * t.element_size() for t in
                                 (state["model"]["w"], state["model"]["wt"], state["model"]["n"],
                                  state["opt"][0]["m"], state["opt"][1][0], state["rng"]))
    for _ in range(3):
        state["model"]["w"].add_(1.0)  # the source changes in place, as training does
        state["opt"][0]["m"].normal_(generator=gen)
        out = staging.copy(state)
        assert staging.allocations == 6  # nothing new
        assert [out["model"]["w"].data_ptr(), out["opt"][0]["m"].data_ptr()] == ptrs
        assert_same(cpu_copy(state), out)
        assert out["model"]["wt"].stride() == state["model"]["wt"].stride()  # as .to() keeps them
        assert out["model"]["w"] is not state["model"]["w"]
        # the file is byte for byte the one a fresh copy makes
        a, b = io.BytesIO(), io.BytesIO()
        torch.save(cpu_copy(state), a)
        torch.save(out, b)
        assert a.getvalue() == b.getvalue()


def test_reallocated_when_the_layout_changes() -> None:
    state: dict[str, Any] = {"a": torch.ones(4), "b": torch.ones(3)}
    staging = StagingBuffer()
    staging.copy(state)
    kept = staging.copy(state)["a"].data_ptr()
    state["b"] = torch.full((2, 3), 2.0)  # new shape
    state["c"] = torch.arange(4, dtype=torch.int32)  # new tensor
    out = staging.copy(state)
    assert staging.allocations == 4 and len(staging) == 3
    assert out["a"].data_ptr() == kept
    assert_same(cpu_copy(state), out)
    state["c"] = torch.arange(4, dtype=torch.float64)  # same shape, new dtype
    del state["b"]  # gone: its buffer is released
    out = staging.copy(state)
    assert staging.allocations == 5 and len(staging) == 2
    assert_same(cpu_copy(state), out)


def test_unusual_tensors_are_copied_fresh() -> None:
    sparse = torch.eye(3).to_sparse()
    conj = torch.tensor([1 + 2j, 3 - 1j]).conj()
    state = {"sparse": sparse, "conj": conj, "dense": torch.ones(2)}
    staging = StagingBuffer()
    out = staging.copy(state)
    assert len(staging) == 1  # only the dense tensor is staged
    assert torch.equal(out["sparse"].to_dense(), torch.eye(3))
    assert torch.equal(out["conj"].resolve_conj(), conj.resolve_conj())
    assert out["sparse"] is not sparse


def test_a_tensor_requiring_grad_is_staged_detached() -> None:
    w = torch.ones(3, requires_grad=True)
    out = StagingBuffer().copy({"w": w})
    assert not out["w"].requires_grad and out["w"].grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_goes_to_pinned_buffers() -> None:
    state = {"w": torch.randn(256, 256, device="cuda"), "cpu": torch.ones(3)}
    staging = StagingBuffer()
    for i in range(3):
        state["w"].add_(i)
        out = staging.copy(state)
        assert out["w"].device.type == "cpu" and out["w"].is_pinned()
        assert not out["cpu"].is_pinned()
        assert torch.equal(out["w"], state["w"].cpu())
    assert staging.allocations == 2


# ---------------------------------------------------------------- in the plugin


@pytest.mark.parametrize("async_save", [False, True])
def test_every_async_checkpoint_equals_its_sync_state(tmp_path: Path, async_save: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # a slow writer: each save arrives while the previous write is in flight, so a copy
    # into the buffer before waiting for that write would put this save's values in
    # the previous file
    slow_writes(monkeypatch, 0.05)
    buffers = BufferLog(monkeypatch)
    ckpt = Checkpoint(tmp_path, top_k=-1, every_n_steps=2, filename="s{step}", async_save=async_save,
                      verbose=False)
    loop = make_loop([ckpt])
    refs = record_states(loop)
    loop.fit(max_epochs=2)
    check_files(ckpt, refs)
    if async_save:
        assert ckpt._staging is not None
        # the model's and the optimizer's tensors were copied into the same buffers at
        # every save (pending metrics come and go: theirs are allocated as they appear)
        assert len(buffers.ptrs) == len(refs)
        assert all(p == buffers.ptrs[0] for p in buffers.ptrs)
        assert len(buffers.ptrs[0]) == n_tensors([refs[0]["model"], refs[0]["optimizers"]])
        assert buffers.held == [n_tensors(r) for r in refs]  # nothing held beyond the state
        # the weights did change between the saves of successive steps (the epoch end
        # saves the step just saved again): a stale buffer would have been caught
        steps = {r["loop"]["global_step"]: r["model"]["net.0.weight"] for r in refs}
        assert len(steps) >= 8
        assert all(not torch.equal(a, b) for a, b in itertools.pairwise(steps.values()))
    else:
        assert ckpt._staging is None
    loop.close()
    assert ckpt._staging is None


def test_layout_change_reallocates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_writes(monkeypatch, 0.02)
    buffers = BufferLog(monkeypatch)
    ckpt = Checkpoint(tmp_path, top_k=-1, every_n_steps=5, filename="s{step}", async_save=True,
                      verbose=False)
    loop = make_loop([ckpt, LayoutChanges()])
    loop.module.net[0].weight.requires_grad_(False)  # frozen: AdamW keeps no state for it
    refs = record_states(loop)
    loop.fit(max_epochs=4)
    check_files(ckpt, refs)
    assert buffers.held == [n_tensors(r) for r in refs]  # no buffer outlives its tensor
    by_epoch: dict[int, list[dict[tuple[Any, ...], int]]] = {}
    for ptrs, ref in zip(buffers.ptrs, refs, strict=True):
        by_epoch.setdefault(ref["loop"]["epoch"], []).append(ptrs)
    assert sorted(by_epoch) == [0, 1, 2, 3]
    for saves in by_epoch.values():
        assert len(saves) >= 2 and all(p == saves[0] for p in saves)  # reused within an epoch
    first = {epoch: saves[0] for epoch, saves in by_epoch.items()}
    # unfrozen: AdamW's state of that layer is new, everything else is reused
    added = set(first[1]) - set(first[0])
    assert len(added) == 3 and all(p[:2] == ("optimizers", 0) for p in added)
    assert all(first[1][p] == first[0][p] for p in first[0])
    # a new buffer in the model
    assert set(first[2]) - set(first[1]) == {("model", "net.extra")}
    assert all(first[2][p] == first[1][p] for p in first[1])
    # that buffer with another shape and dtype: a new staging tensor, the rest reused
    assert set(first[3]) == set(first[2])
    assert first[3][("model", "net.extra")] != first[2][("model", "net.extra")]
    assert all(first[3][p] == first[2][p] for p in first[2] if p != ("model", "net.extra"))
    assert refs[-1]["model"]["net.extra"].dtype == torch.int64


def test_buffer_released_when_async_is_turned_off(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, top_k=-1, filename="e{epoch}", async_save=True, verbose=False)
    loop = make_loop([ckpt])
    loop.fit(max_epochs=1)
    assert ckpt._staging is not None and ckpt._staging.nbytes > 0
    ckpt.async_save = False
    loop.fit(max_epochs=2)
    assert ckpt._staging is None
    ckpt.async_save = True  # on again: a fresh buffer at the next save
    loop.fit(max_epochs=3)
    assert ckpt._staging is not None
    loop.close()
    assert ckpt._staging is None

