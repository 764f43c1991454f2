"""Datasets, samplers and loops for the tests of ``sv.resumable`` (importable by workers and by
spawned ranks).

Every sample is ``[key, torch draw, numpy draw, python draw]``: the draws are the dataset's
random augmentation, so two runs agree only if they load the same samples in the same order
with the same random streams. Datasets count their loads in shared memory, which forked
DataLoader workers inherit, so a test can tell which samples a resumed run loaded.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

_FORK = multiprocessing.get_context("fork")


def draws(key: int) -> list[int]:
    return [
        key,
        int(torch.randint(0, 2**30, ())),
        int(np.random.randint(0, 2**30)),
        random.randrange(2**30),
    ]


class Augmented(Dataset[torch.Tensor]):
    """A map-style dataset with random augmentation that counts the loads of each key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.loads = _FORK.Array("i", size, lock=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> torch.Tensor:
        self.loads[key] += 1
        return torch.tensor(draws(key))

    def load_counts(self) -> list[int]:
        return list(self.loads)

    def forget_loads(self) -> None:
        for key in range(self.size):
            self.loads[key] = 0


class StatefulStream(IterableDataset[torch.Tensor]):
    """An iterable dataset, sharded over workers by worker id, that knows its position.

    ``load_state_dict()`` followed by ``iter()`` continues where the state was taken; a plain
    ``iter()`` starts the stream again (a new epoch)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self.resumed = False
        # Locked: two workers counting into one shared int lose updates without it.
        self.produced = _FORK.Value("i", 0)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.resumed = int(state["position"]), True

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.resumed:
            self.position = 0
        self.resumed = False
        info = get_worker_info()
        mine = range(info.id, self.size, info.num_workers) if info else range(self.size)
        while self.position < len(mine):
            key = mine[self.position]
            self.position += 1
            with self.produced.get_lock():
                self.produced.value += 1
            yield torch.tensor(draws(key))


class PlainStream(IterableDataset[torch.Tensor]):
    """An iterable dataset without a state: the same items each time it is iterated."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        mine = range(info.id, self.size, info.num_workers) if info else range(self.size)
        for key in mine:
            yield torch.tensor(draws(key))


class GlobalShuffle(Sampler[int]):
    """A sampler of its own whose randomness is torch's global generator."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size).tolist()


class OwnGenerator(Sampler[int]):
    """A sampler that draws from a torch.Generator it holds under a name of its own."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size, generator=self.rng).tolist()


class PairBatches(Sampler[list[int]]):
    """A batch sampler of its own: shuffled pairs of neighbouring keys (global generator)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size // 2

    def __iter__(self) -> Iterator[list[int]]:
        for pair in torch.randperm(self.size // 2).tolist():
            yield [2 * pair, 2 * pair + 1]


def as_lists(batch: Any) -> Any:
    return batch.tolist() if isinstance(batch, torch.Tensor) else batch


def take(data: Any, epochs: int, stop: int | None = None) -> list[Any]:
    """The batches of ``data`` until its epoch reaches ``epochs`` (or ``stop`` batches); a
    sampler with ``set_epoch`` is set to each epoch first, as a training loop does."""
    seen: list[Any] = []
    while data.epoch < epochs:
        set_epoch = getattr(data.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(data.epoch)
        for batch in data:
            seen.append(as_lists(batch))
            if stop is not None and len(seen) == stop:
                return seen
    return seen


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ---- ranks of a gloo job (run by tests.dist_helpers.run_ranks) ------------------------------


def _distributed_data(size: int, workers: int) -> Any:
    from torch.utils.data import DataLoader, DistributedSampler

    import statevault as sv

    dataset = Augmented(size)
    sampler = DistributedSampler(dataset, seed=3)  # this job's world size and rank
    return sv.resumable(DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers))


def consume_and_save(rank: int, world: int, path: str, size: int, batches: int) -> list[int]:
    """Epoch 1 on every rank: ``batches`` batches, then a collective save; the keys seen."""
    import statevault as sv

    data = _distributed_data(size, workers=0)
    data.sampler.set_epoch(1)
    seen = iter(data)
    keys = [int(k) for _ in range(batches) for k in next(seen)[:, 0]]
    sv.save({"data": sv.PerRank(data), "rng": sv.RNGState()}, path)
    return keys


def restore_and_finish(rank: int, world: int, path: str, size: int) -> dict[str, Any]:
    """Restore the position saved by ``consume_and_save`` on any number of ranks, then read
    the rest of the epoch and the first batch of the next one. (Ranks run as daemon processes,
    which cannot start DataLoader workers: workers are covered by tests/test_resumable.py.)"""
    import logging
    import warnings

    import statevault as sv

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("statevault").addHandler(handler)
    data = _distributed_data(size, workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PerRank's own note about the other world size
        sv.load(path, into={"data": sv.PerRank(data), "rng": sv.RNGState()})
    rest = [int(k) for batch in data for k in batch[:, 0]]
    loads = sum(data.dataset.load_counts())
    finished = (data.epoch, data.sampler.epoch)
    data.sampler.set_epoch(2)
    next_epoch = [int(k) for k in next(iter(data))[:, 0]]
    return {"rest": rest, "loads": loads, "log": lines, "finished": finished, "next": next_epoch}
