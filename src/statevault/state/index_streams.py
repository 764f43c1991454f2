"""The keys a pass of a map-style loader loads, starting at any batch, by index.

A pass is a function of its seed: the sampler draws from streams seeded by it (see
``isolated_rng``). Resuming at batch ``k`` skips the keys of the first ``k`` batches without
loading a sample. For torch's own samplers (``SequentialSampler``, ``RandomSampler`` without
replacement, ``DistributedSampler``) the order is computed directly and cut, which costs what
creating the sampler's iterator costs, wherever the pass resumes; any other sampler (or batch
sampler) is iterated under the pass's streams and its first keys are dropped, at a cost that
grows with the position (keys only: still no sample is loaded). The direct computations
reproduce exactly what the sampler yields under those streams (a test holds them to it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from statevault.state.data_seeds import derive_seed
from statevault.state.distributed_split import Split, rank_keys
from statevault.state.isolated_rng import IsolatedRandomness

# Keys drawn from a sampler per switch to its streams (each switch costs a few microseconds).
_CHUNK = 4096


@dataclass(frozen=True)
class Layout:
    """How a DataLoader turns its sampler into batches of keys."""

    sampler: Any | None  # yields keys, batched here; None with a custom batch sampler
    batch_size: int | None  # None: no automatic batching (each key is one item)
    drop_last: bool
    batch_sampler: Any | None  # a custom batch sampler, whose batches are used as they are

    @classmethod
    def of(cls, loader: Any) -> Layout:
        from torch.utils.data import BatchSampler

        batch_sampler = loader.batch_sampler
        if batch_sampler is None:
            return cls(loader.sampler, None, False, None)
        if type(batch_sampler) is BatchSampler:
            return cls(
                batch_sampler.sampler,
                int(batch_sampler.batch_size),
                bool(batch_sampler.drop_last),
                None,
            )
        return cls(None, None, False, batch_sampler)

    @property
    def samplers(self) -> list[Any]:
        """The samplers of the pass, outermost first (where generators and epochs live)."""
        if self.batch_sampler is None:
            return [self.sampler]
        inner = getattr(self.batch_sampler, "sampler", None)
        return [self.batch_sampler] + ([inner] if inner is not None else [])

    @property
    def keys_per_batch(self) -> int:
        return self.batch_size or 1


@dataclass
class PassKeys:
    """The batches (lists of keys; single keys without automatic batching) left in a pass."""

    batches: Iterator[Any]
    remaining: int | None  # how many, when the sampler has a length


def pass_keys(layout: Layout, seed: int, skip: int, split: Split | None, rank: int) -> PassKeys:
    """The batches of the pass of seed ``seed`` after its first ``skip`` batches; ``split`` is
    the part of a DistributedSampler's epoch the pass covers (None for other samplers)."""
    if layout.batch_sampler is not None:
        return _custom_batches(layout.batch_sampler, seed, skip)
    sampler, skip_keys = layout.sampler, skip * layout.keys_per_batch
    if split is not None:
        return _batched(layout, rank_keys(split, rank, skip_keys))
    direct = _direct_keys(sampler, seed, skip_keys)
    if direct is not None:
        return _batched(layout, direct)
    keys = _isolated_keys(sampler, seed, skip_keys)
    length = _length(sampler)
    remaining = None if length is None else _batch_count(layout, length) - skip
    return PassKeys(_batches_of(layout, keys), remaining)


def _direct_keys(sampler: Any, seed: int, skip: int) -> Sequence[int] | None:
    """The keys of torch's own samplers, computed directly; None for any other sampler."""
    from torch.utils.data import RandomSampler, SequentialSampler

    if type(sampler) is SequentialSampler:
        return range(skip, len(sampler.data_source))
    if type(sampler) is RandomSampler and not sampler.replacement:
        return _random_permutations(sampler, seed)[skip:].tolist()  # type: ignore[no-any-return]
    return None


def _random_permutations(sampler: Any, seed: int) -> Any:
    """What ``RandomSampler.__iter__`` yields (without replacement) under the pass's streams:
    with a generator, the pass's own generator; without, a generator seeded by a draw from
    the pass's global stream (see ``isolated_rng``)."""
    import torch

    if sampler.generator is not None:
        generator = torch.Generator().manual_seed(derive_seed(seed, "generator", "generator"))
    else:
        global_stream = torch.Generator().manual_seed(derive_seed(seed, "torch"))
        drawn = int(torch.empty((), dtype=torch.int64).random_(generator=global_stream).item())
        generator = torch.Generator().manual_seed(drawn)
    n, wanted = len(sampler.data_source), int(sampler.num_samples)
    parts = [torch.randperm(n, generator=generator) for _ in range(wanted // n)]
    if wanted % n:  # (RandomSampler draws this last permutation even when it takes none of it)
        parts.append(torch.randperm(n, generator=generator)[: wanted % n])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _isolated_keys(sampler: Any, seed: int, skip: int) -> Iterator[Any]:
    """Any sampler's keys, drawn under the pass's streams, less the first ``skip``."""
    streams = IsolatedRandomness(seed, [sampler])
    with streams.active():
        keys = iter(sampler)
        _drop(keys, skip)
    while True:
        with streams.active():
            chunk = list(itertools.islice(keys, _CHUNK))
        if not chunk:
            return
        yield from chunk


def _custom_batches(batch_sampler: Any, seed: int, skip: int) -> PassKeys:
    inner = getattr(batch_sampler, "sampler", None)
    streams = IsolatedRandomness(seed, [batch_sampler] + ([inner] if inner is not None else []))
    with streams.active():
        batches = iter(batch_sampler)
        _drop(batches, skip)

    def rest() -> Iterator[Any]:
        while True:
            with streams.active():
                chunk = list(itertools.islice(batches, max(_CHUNK // 64, 1)))
            if not chunk:
                return
            yield from chunk

    length = _length(batch_sampler)
    return PassKeys(rest(), None if length is None else max(length - skip, 0))


def _batched(layout: Layout, keys: Sequence[Any]) -> PassKeys:
    return PassKeys(_batches_of(layout, keys), _batch_count(layout, len(keys)))


def _batches_of(layout: Layout, keys: Iterable[Any]) -> Iterator[Any]:
    if layout.batch_size is None:
        yield from keys
        return
    size, flat = layout.batch_size, iter(keys)
    while batch := list(itertools.islice(flat, size)):
        if len(batch) < size and layout.drop_last:
            return
        yield batch


def _batch_count(layout: Layout, keys: int) -> int:
    if layout.batch_size is None:
        return keys
    if layout.drop_last:
        return keys // layout.batch_size
    return -(-keys // layout.batch_size)


def _length(sampler: Any) -> int | None:
    try:
        return len(sampler)
    except TypeError:
        return None


def _drop(iterator: Iterator[Any], count: int) -> None:
    # Consumed at C speed, keys only: the samples they name are never loaded.
    next(itertools.islice(iterator, count, count), None)
