"""Where a resumed epoch continues: its position counted in samples, not batches.

A mid-epoch checkpoint stores ``position``: the batches this epoch did and, when the
training data is a ``DataLoader`` with a ``BatchSampler`` over a map-style dataset, the
number of sample indices its sampler handed out over all ranks (``samples``), with the
geometry they were handed out in (per-rank ``batch_size``, the sampler's kind,
``replicas`` and dataset length). Computed when the checkpoint is taken, so the step
pays nothing for it.

On resume the epoch is **fast-forwarded in the sampler**: for that one epoch the
loader's ``BatchSampler`` draws from :class:`FastForward`, which yields the sampler's
order from sample ``samples`` on (sliced for this rank), and no batch is fetched to be
discarded. The order is the one an uninterrupted run has:

- a ``DistributedSampler``'s epoch order does not depend on the world size (a
  permutation of the dataset from ``seed + epoch``), so the samples left are dealt to
  the new ranks the way ``DistributedSampler`` deals them: the world size and the
  per-rank batch size may both change; the new ranks' share is padded with the epoch's
  first samples (or truncated with ``drop_last``), as ``DistributedSampler`` pads;
- any other sampler (one process) is iterated at the moment the loader would iterate
  it, after the epoch's RNG and loader generators were replayed, so it yields the same
  order; the batch size may change.

With the same geometry the batches are exactly those of an uninterrupted run (resume
is bit-exact). Data hookloop cannot position (a list of batches, an iterable dataset, a
custom batch sampler) is skipped batch by batch as before, which needs the same world
size and batch size; a changed world size is refused. Every refusal says what differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, Sampler

__all__ = ["FastForward", "batch_sampler", "check", "describe", "fast_forward", "restore", "resumed_batches",
           "saved_position"]


class FastForward(Sampler[int]):
    """The rest of ``inner``'s epoch order after ``skip`` samples, dealt to ``rank`` of
    ``replicas`` (``replicas`` is 1 unless ``inner`` is a ``DistributedSampler``).

    The order is computed once, on :meth:`prepare` or the first iteration, whichever
    comes first: the loop calls :meth:`prepare` where the loader would first draw from
    its sampler, so a sampler that shuffles with the global RNG draws the same order.
    """

    def __init__(self, inner: Sampler[int], skip: int) -> None:
        self.inner = inner
        self.skip = skip
        self._indices: list[int] | None = None

    def _distributed(self) -> DistributedSampler[Any] | None:
        return self.inner if isinstance(self.inner, DistributedSampler) else None

    def prepare(self) -> None:
        """Compute this rank's indices now (once per epoch)."""
        if self._indices is not None:
            return
        ds = self._distributed()
        if ds is None:
            order = list(iter(self.inner))
            self._indices = order[self.skip:]
            return
        whole = DistributedSampler(ds.dataset, num_replicas=1, rank=0, shuffle=ds.shuffle,
                                   seed=ds.seed)  # torch's own epoch order, undealt
        whole.set_epoch(ds.epoch)
        order = list(whole)
        rest = order[self.skip:]
        replicas = ds.num_replicas
        if ds.drop_last:
            rest = rest[:len(rest) - len(rest) % replicas]
        elif rest and len(rest) % replicas:
            pad = replicas - len(rest) % replicas
            rest += (order * (pad // len(order) + 1))[:pad]
        self._indices = rest[ds.rank::replicas]

    def __iter__(self) -> Iterator[int]:
        self.prepare()
        assert self._indices is not None
        return iter(self._indices)

    def __len__(self) -> int:
        """The whole epoch's length, as ``inner`` reports it: ``len(train_data)`` keeps
        meaning the epoch's batches, numbered from where the saved position falls."""
        return len(self.inner)  # type: ignore[arg-type]


def batch_sampler(data: Any) -> BatchSampler | None:
    """The ``BatchSampler`` of ``data`` when hookloop can position it by samples."""
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return None
    bs = data.batch_sampler
    return bs if isinstance(bs, BatchSampler) and isinstance(bs.batch_size, int) else None


def describe(sampler: Any) -> dict[str, Any] | None:
    """What fixes a sampler's epoch order: kind, replicas, length (``None`` if unknown)."""
    if isinstance(sampler, FastForward):
        sampler = sampler.inner
    if isinstance(sampler, DistributedSampler):
        return {"kind": "DistributedSampler", "replicas": sampler.num_replicas,
                "n": len(sampler.dataset), "shuffle": sampler.shuffle,  # type: ignore[arg-type]
                "seed": sampler.seed, "drop_last": sampler.drop_last}
    try:
        n = len(sampler)
    except TypeError:
        return None
    return {"kind": type(sampler).__name__, "replicas": 1, "n": n}


def _total(sampler: Mapping[str, Any]) -> int:
    """Indices one epoch hands out over all replicas (a DistributedSampler pads)."""
    n, r = sampler["n"], sampler["replicas"]
    if sampler.get("drop_last"):
        return n - n % r
    return -(-n // r) * r


def saved_position(data: Any, batches: int, base: tuple[int, int]) -> dict[str, Any]:
    """The position a checkpoint stores after ``batches`` batches of the epoch; ``base``
    is (batches, samples) where this process's run of the epoch began."""
    pos: dict[str, Any] = {"batches": batches}
    bs = batch_sampler(data)
    desc = describe(bs.sampler) if bs is not None else None
    if bs is None or desc is None:
        return pos
    samples = base[1] + (batches - base[0]) * bs.batch_size * desc["replicas"]
    pos.update(samples=min(samples, _total(desc)), batch_size=bs.batch_size, sampler=desc)
    return pos


def _kind(desc: Mapping[str, Any]) -> str:
    if desc["kind"] == "DistributedSampler":
        return (f"DistributedSampler(shuffle={desc['shuffle']}, seed={desc['seed']}) over "
                f"{desc['replicas']} rank(s), {desc['n']} samples")
    return f"{desc['kind']} over {desc['n']} samples"


def check(data: Any, saved: Mapping[str, Any] | None, saved_world: int, world: int) -> list[str]:
    """Why ``data`` cannot continue the epoch at ``saved`` (empty when it can)."""
    if not saved or not saved.get("batches"):
        return []
    bs = batch_sampler(data)
    desc = describe(bs.sampler) if bs is not None else None
    old = saved.get("sampler")
    if old is None or desc is None:  # skipped batch by batch: the same geometry only
        if saved_world != world:
            what = "the checkpoint" if old is None else "train_data"
            return [f"the checkpoint was taken {saved['batches']} batch(es) into an epoch on "
                    f"{saved_world} process(es) and this run has {world}; {what} cannot be "
                    "positioned by samples (hookloop can for a DataLoader over a map-style "
                    "dataset with a batch_size and a DistributedSampler): resume on "
                    f"{saved_world} process(es), or from an end-of-epoch checkpoint"]
        return []
    if desc["n"] != old["n"]:
        return [f"the checkpoint's epoch ran on {_kind(old)}; train_data now has {desc['n']} "
                "samples: a mid-epoch resume needs the same dataset"]
    if old["kind"] == "DistributedSampler":
        if desc["kind"] != "DistributedSampler" or (desc["shuffle"], desc["seed"]) != (
                old["shuffle"], old["seed"]):
            return [f"the checkpoint's epoch ran on {_kind(old)}; train_data now uses "
                    f"{_kind(desc)}, whose order differs: use a DistributedSampler with "
                    f"shuffle={old['shuffle']} and seed={old['seed']} (it also works with one "
                    "process: num_replicas=1, rank=0)"]
        return []
    if desc["kind"] != old["kind"]:
        return [f"the checkpoint's epoch ran on {_kind(old)}; train_data now uses "
                f"{_kind(desc)}, whose order differs: resume with a {old['kind']}"]
    return []


def fast_forward(data: Any, saved: Mapping[str, Any]) -> FastForward | None:
    """Install a :class:`FastForward` in ``data``'s batch sampler for the resumed epoch
    (``None`` when ``data`` is skipped batch by batch). Undo with :func:`restore`."""
    bs = batch_sampler(data)
    if bs is None or "samples" not in saved or describe(bs.sampler) is None:
        return None
    ff = FastForward(bs.sampler, int(saved["samples"]))
    bs.sampler = ff
    return ff


def restore(data: Any, ff: FastForward) -> None:
    """Put back the sampler :func:`fast_forward` replaced."""
    bs = batch_sampler(data)
    if bs is not None and bs.sampler is ff:
        bs.sampler = ff.inner


def resumed_batches(data: Any, samples: int) -> int:
    """The batch index, in this run's geometry, that ``samples`` consumed samples reach."""
    bs = batch_sampler(data)
    desc = describe(bs.sampler) if bs is not None else None
    assert bs is not None and desc is not None
    return samples // (bs.batch_size * desc["replicas"])
