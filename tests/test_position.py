"""A mid-epoch resume continues at the saved sample, whatever the batch size: the
sampler is fast-forwarded (no batch fetched to be thrown away), and data that cannot
continue says why. World-size changes are tested under torchrun
(tests/distributed/test_ddp_position.py)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from hookloop import Loop, ResumeError
from hookloop.plugins import hookimpl

N = 80


class Ids(Dataset):
    """Sample ``i`` is ``(features, target)`` with ``features[0] == i``; counts fetches."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.x[:, 0] = torch.arange(n, dtype=torch.float32)
        self.y = torch.randn(n, 1, generator=g)
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.fetched += 1
        return self.x[i], self.y[i]


class Lengths:
    """Records ``len(train_data)`` and the batch index at every batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    @hookimpl
    def on_train_batch_end(self, loop: Loop, batch_idx: int) -> None:
        self.seen.append((batch_idx, len(loop.train_data)))


class Seen:
    """Records the sample ids of every batch trained, per epoch; saves at ``save_step``."""

    def __init__(self, save_step: int | None = None) -> None:
        self.ids: dict[int, list[int]] = {}
        self.save_step = save_step
        self.saved: dict[str, Any] | None = None

    @hookimpl
    def on_train_batch_start(self, loop: Loop, batch: Any) -> None:
        self.ids.setdefault(loop.state.epoch, []).extend(int(v) for v in batch[0][:, 0])

    @hookimpl
    def on_train_batch_end(self, loop: Loop) -> None:
        if loop.state.global_step == self.save_step:
            buf = io.BytesIO()
            torch.save(loop.state_dict(), buf)
            buf.seek(0)
            self.saved = torch.load(buf, weights_only=True)


def make(data: Any, seen: Seen) -> Loop:
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    return Loop(net, torch.optim.SGD(net.parameters(), lr=0.01), data, loss_fn=nn.functional.mse_loss,
                plugins=[seen], autoload=False)


def shuffled(ds: Dataset, batch_size: int, **kw: Any) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(5), **kw)


def saved_run(batch_size: int = 8, step: int = 3, epochs: int = 2, **kw: Any) -> tuple[Seen, Seen]:
    """An uninterrupted reference run, and the state saved at ``step`` of a second one."""
    ref = Seen()
    make(shuffled(Ids(), batch_size, **kw), ref).fit(max_epochs=epochs)
    first = Seen(save_step=step)
    make(shuffled(Ids(), batch_size, **kw), first).fit(max_epochs=epochs)
    assert first.saved is not None
    return ref, first


@pytest.mark.parametrize(("new_batch", "step"), [(8, 3), (12, 3), (5, 3), (16, 1), (3, 9)])
def test_a_changed_batch_size_continues_at_the_saved_sample(new_batch: int, step: int) -> None:
    ref, first = saved_run(8, step)
    assert first.saved is not None
    pos = first.saved["position"]
    assert pos["samples"] == 8 * step and pos["batch_size"] == 8
    assert pos["sampler"]["kind"] == "RandomSampler"
    ds = Ids()
    resumed = Seen()
    loop = make(shuffled(ds, new_batch), resumed)
    loop.fit(max_epochs=2, resume=first.saved)
    done = ref.ids[0][: 8 * step]
    # the rest of the epoch, in the uninterrupted run's order: nothing twice, nothing skipped
    assert done + resumed.ids[0] == ref.ids[0]
    assert sorted(ref.ids[0]) == list(range(N))
    assert sorted(resumed.ids[1]) == list(range(N))  # the next epoch is whole
    assert ds.fetched == N - 8 * step + N  # fast-forwarded: no sample fetched to be dropped
    assert loop.state.stop_reason == "max_epochs"


def test_same_batch_size_is_the_uninterrupted_run_with_workers() -> None:
    ref, first = saved_run(8, 4, num_workers=2)
    resumed = Seen()
    make(shuffled(Ids(), 8, num_workers=2), resumed).fit(max_epochs=2, resume=first.saved)
    assert ref.ids[0][:32] + resumed.ids[0] == ref.ids[0]
    assert resumed.ids[1] == ref.ids[1]


def test_a_second_save_in_a_resumed_epoch_counts_samples_from_the_first() -> None:
    ref, first = saved_run(8, 3)  # 24 samples done
    again = Seen(save_step=5)  # 2 more batches of 12 after the resume: 48 samples
    make(shuffled(Ids(), 12, drop_last=False), again).fit(max_epochs=1, resume=first.saved)
    assert again.saved is not None
    assert again.saved["position"]["samples"] == 24 + 2 * 12
    last = Seen()
    make(shuffled(Ids(), 8), last).fit(max_epochs=1, resume=again.saved)
    assert ref.ids[0][:24] + again.ids[0][:24] + last.ids[0] == ref.ids[0]


def test_a_position_at_or_past_the_end_of_the_epoch_ends_it_cleanly() -> None:
    # 84 samples in batches of 8: the last batch holds 4; saved inside it (before the
    # epoch's end), the position is the whole epoch, not 88
    ds = Ids(84)
    first = Seen(save_step=11)
    make(shuffled(ds, 8), first).fit(max_epochs=2)
    assert first.saved is not None and first.saved["position"]["samples"] == 84
    resumed = Seen()
    loop = make(shuffled(Ids(84), 16), resumed)
    loop.fit(max_epochs=2, resume=first.saved)
    assert 0 not in resumed.ids  # nothing left of epoch 0, and no StopIteration
    assert sorted(resumed.ids[1]) == list(range(84))
    assert loop.state.stop_reason == "max_epochs"


def test_a_dataset_of_another_length_is_refused() -> None:
    _, first = saved_run(8, 3)
    loop = make(shuffled(Ids(N + 8), 8), Seen())
    with pytest.raises(ResumeError, match=r"RandomSampler over 80 samples.* now has 88 samples"):
        loop.fit(max_epochs=2, resume=first.saved)


def test_another_sampler_order_is_refused() -> None:
    _, first = saved_run(8, 3)
    loop = make(DataLoader(Ids(), batch_size=8, sampler=SequentialSampler(range(N))), Seen())
    with pytest.raises(ResumeError, match=r"ran on RandomSampler.*uses SequentialSampler.*order differs"):
        loop.fit(max_epochs=2, resume=first.saved)


def test_the_check_also_runs_when_the_data_is_set_after_loading() -> None:
    _, first = saved_run(8, 3)
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.01), loss_fn=nn.functional.mse_loss,
                autoload=False)
    loop.load_state_dict(first.saved)  # no train_data yet: nothing to check
    with pytest.raises(ResumeError, match=r"cannot continue the resumed epoch.*88 samples"):
        loop.train_data = shuffled(Ids(N + 8), 8)
        loop.fit(max_epochs=2)


def test_a_list_of_batches_resumes_batch_by_batch_and_refuses_another_world_size() -> None:
    ds = Ids()
    batches = [(ds.x[i:i + 8], ds.y[i:i + 8]) for i in range(0, N, 8)]
    first = Seen(save_step=3)
    make(batches, first).fit(max_epochs=1)
    assert first.saved is not None
    assert first.saved["position"] == {"batches": 3, "world_size": 1}
    resumed = Seen()
    make(batches, resumed).fit(max_epochs=1, resume=first.saved)
    assert resumed.ids[0] == list(range(24, N))
    first.saved["position"]["world_size"] = 2  # as if saved by two processes
    with pytest.raises(ResumeError, match=r"on 2 process.*this run has 1.*cannot be positioned"):
        make(batches, Seen()).fit(max_epochs=1, resume=first.saved)


def test_a_checkpoint_without_a_position_still_resumes_by_batches() -> None:
    ref, first = saved_run(8, 3)
    assert first.saved is not None
    del first.saved["position"]  # as written before positions were stored
    resumed = Seen()
    make(shuffled(Ids(), 8), resumed).fit(max_epochs=2, resume=first.saved)
    assert ref.ids[0][:24] + resumed.ids[0] == ref.ids[0]
    assert resumed.ids[1] == ref.ids[1]


def test_the_sampler_is_given_back_after_the_resumed_epoch() -> None:
    _, first = saved_run(8, 3)
    data = shuffled(Ids(), 8)
    sampler = data.batch_sampler.sampler
    make(data, Seen()).fit(max_epochs=1, resume=first.saved)
    assert data.batch_sampler.sampler is sampler
    assert isinstance(sampler, RandomSampler)


@pytest.mark.parametrize(("new_batch", "full"), [(8, 10), (16, 5)])
def test_the_loader_reports_the_whole_epoch_while_fast_forwarded(new_batch: int, full: int) -> None:
    _, first = saved_run(8, 3)  # 24 samples done
    lengths = Lengths()
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    loop = Loop(net, torch.optim.SGD(net.parameters(), lr=0.01), shuffled(Ids(), new_batch),
                loss_fn=nn.functional.mse_loss, plugins=[lengths], autoload=False)
    loop.fit(max_epochs=1, resume=first.saved)
    assert {n for _, n in lengths.seen} == {full}  # plugins comparing batch_idx to len() see the epoch
    assert lengths.seen[-1][0] == full - 1  # the epoch's last batch has the last index
