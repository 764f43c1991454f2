"""A ``DistributedSampler``'s epoch as offset arithmetic, so that a pass can be resumed on any
number of ranks.

``DistributedSampler`` orders an epoch globally (a permutation of the dataset seeded by
``seed + epoch``, or ``range``), repeats it cyclically to ``total_size`` (or cuts it, with
``drop_last``), and gives rank ``r`` of ``W`` the positions ``r, r + W, r + 2W, ...``. A
:class:`Split` names such a part of the global order: positions ``start + r + W*j`` below
``end``. When every rank has consumed ``c`` samples (ranks step together), the consumed
positions are exactly ``start .. start + W*c - 1``: whatever the world size, the rest of the
epoch is the range ``start + W*c .. end``. Resumed on ``M`` ranks, that range is dealt out the
same way over ``M`` ranks, without the padding repeats, so each remaining sample is loaded
exactly once across the new ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Split:
    """Positions ``start + rank + world*j < end`` of one epoch's global order (module doc)."""

    start: int
    world: int
    end: int
    size: int  # len(dataset): positions past it repeat the order from its beginning
    seed: int  # the sampler's seed: the order is seeded by seed + epoch
    shuffle: bool
    epoch: int

    def to_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def remaining(self, rank: int) -> int:
        return len(range(self.start + rank, self.end, self.world))


def is_distributed_sampler(sampler: Any) -> bool:
    """Exactly torch's DistributedSampler (a subclass may order its epoch otherwise)."""
    from torch.utils.data.distributed import DistributedSampler

    return type(sampler) is DistributedSampler


def fresh_split(sampler: Any) -> Split:
    """The whole of the sampler's current epoch, as its own ``__iter__`` deals it out."""
    return Split(
        start=0,
        world=int(sampler.num_replicas),
        end=int(sampler.total_size),
        size=len(sampler.dataset),
        seed=int(sampler.seed),
        shuffle=bool(sampler.shuffle),
        epoch=int(sampler.epoch),
    )


def split_from_state(state: Any) -> Split:
    fields = {field.name for field in dataclasses.fields(Split)}
    if not isinstance(state, dict) or set(state) != fields:
        raise ValueError(f"a DistributedSampler split has the keys {sorted(fields)}")
    return Split(
        **{name: int(state[name]) for name in fields if name != "shuffle"},
        shuffle=bool(state["shuffle"]),
    )


def rank_keys(split: Split, rank: int, skip: int) -> list[int]:
    """The indices rank ``rank`` loads from ``split``, less its first ``skip``."""
    import torch

    first = split.start + rank + split.world * skip
    if first >= split.end:
        return []
    if split.shuffle:
        generator = torch.Generator()
        generator.manual_seed(split.seed + split.epoch)
        order = torch.randperm(split.size, generator=generator)
    else:
        order = torch.arange(split.size)
    positions = torch.arange(first, split.end, split.world)
    keys: list[int] = order[positions % split.size].tolist()
    return keys


def remainder(split: Split, consumed_per_rank: int, world: int) -> Split:
    """What is left of ``split`` once every rank consumed ``consumed_per_rank`` samples, dealt
    out over ``world`` ranks, each remaining sample once (the padding repeats are dropped)."""
    end = min(split.end, split.size)
    start = min(split.start + split.world * consumed_per_rank, end)
    return dataclasses.replace(split, start=start, world=world, end=end)


def mismatch(saved: Split, sampler: Any) -> str | None:
    """Why ``sampler`` cannot continue ``saved``'s epoch, or None."""
    now = fresh_split(sampler)
    for name in ("size", "seed", "shuffle"):
        if getattr(now, name) != getattr(saved, name):
            return (
                f"the DistributedSampler's {name} is {getattr(now, name)!r} now and was "
                f"{getattr(saved, name)!r} when the position was saved"
            )
    return None


def resplit_message(old: Split, new: Split, consumed_per_rank: int, rank: int) -> str:
    """The log line of a resume on another number of ranks."""
    left = max(new.end - new.start, 0)
    low, high = left // new.world, -(-left // new.world)
    shares = f"{low}" if low == high else f"{low} or {high}"
    uneven = (
        ""
        if low == high
        else "; ranks get different numbers of samples, so their last batches of this epoch "
        "may differ in number (DDP: use join(), or stop the epoch at the shortest rank)"
    )
    return (
        f"statevault: the data position in epoch {old.epoch} was saved by {old.world} ranks "
        f"({consumed_per_rank} samples consumed by each) and is resumed by {new.world}: the "
        f"{left} samples left of the epoch's {min(old.end, old.size)} are dealt out over the "
        f"{new.world} ranks, each exactly once ({shares} per rank; rank {rank} takes "
        f"{new.remaining(rank)}){uneven}"
    )
