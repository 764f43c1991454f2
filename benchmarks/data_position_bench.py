"""The cost of a data position (issue 16): saving it, and resuming a 1M-sample epoch from it.

A map-style dataset of 1,000,000 samples (each one a small tensor, so that loading is cheap and
the figures are the loader's own), batches of 256. For each loader:

- **plain DataLoader**: ``iter(loader)`` and the first batch: the cost of starting an epoch,
  the unit of every ratio;
- **sv.resumable, new epoch**: the same through ``sv.resumable``;
- **sv.resumable, resumed at P%**: ``load_state_dict(position)``, ``iter()`` and the first
  batch, with the position after P% of the epoch's batches;
- peers at 50%: **torchdata StatefulDataLoader** (its ``load_state_dict``, ``iter``, first
  batch; when torchdata is installed) and **replay**, what a loop that only knows its step
  count does: iterate a plain DataLoader and drop the batches already trained on.

Loaders: ``shuffle=True`` without workers and with 2 workers, a ``DistributedSampler`` (rank 1
of 4), and a sampler of the program's own (a permutation drawn from torch's global generator),
which sv.resumable can only skip key by key. Each figure is the median of ``--reps`` runs, the
rows of a loader taking turns. The size of the saved position is its JSON encoding, as
statevault's manifest stores it (torchdata's state is pickled, as torch.save would store it).

    python benchmarks/data_position_bench.py              # ~1-2 min on 2 CPUs
    python benchmarks/data_position_bench.py --reps 3 --size 200000
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import pickle
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import statevault as sv

BATCH = 256


class Tiny(Dataset[torch.Tensor]):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> torch.Tensor:
        return torch.tensor([key, key + 1])


class OwnShuffle(Sampler[int]):
    """A sampler sv.resumable knows nothing of (it skips such a sampler's keys one by one)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size).tolist()


LOADERS: dict[str, Callable[[Dataset[torch.Tensor]], DataLoader[torch.Tensor]]] = {
    "shuffle, 0 workers": lambda ds: DataLoader(ds, batch_size=BATCH, shuffle=True),
    "shuffle, 2 workers": lambda ds: DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2),
    "DistributedSampler 1/4": lambda ds: DataLoader(
        ds, batch_size=BATCH, sampler=DistributedSampler(ds, num_replicas=4, rank=1)
    ),
    "own sampler, 0 workers": lambda ds: DataLoader(
        ds, batch_size=BATCH, sampler=OwnShuffle(len(ds))
    ),
}


def interleaved(runs: list[tuple[str, Callable[[], Any]]], reps: int) -> list[tuple[str, float]]:
    """The median time of each run; the runs take turns, so that a noisy neighbour on a shared
    machine slows them alike (the ratios are what a run can compare)."""
    samples: dict[str, list[float]] = {label: [] for label, _ in runs}
    for _ in range(reps):
        for label, run in runs:
            gc.collect()
            started = time.perf_counter()
            run()
            samples[label].append(time.perf_counter() - started)
    return [(label, statistics.median(samples[label])) for label, _ in runs]


def first_batch(iterable: Any) -> Any:
    iterator = iter(iterable)
    batch = next(iterator)
    del iterator  # shuts workers down outside the timed part of the next run
    return batch


def position_after(make: Callable[[], DataLoader[torch.Tensor]], fraction: float) -> Any:
    """The data position after ``fraction`` of an epoch's batches (set, not iterated: a
    position is a few numbers, and iterating 1M samples to get one would dominate the run)."""
    data = sv.resumable(make())
    first_batch(data)  # starts pass 0: the position now has its seed
    state = data.state_dict()
    state["batches"] = int(len(data) * fraction)
    return state


def resume_from(make: Callable[[], DataLoader[torch.Tensor]], state: Any) -> Any:
    data = sv.resumable(make())
    data.load_state_dict(state)
    return first_batch(data)


def replay(make: Callable[[], DataLoader[torch.Tensor]], batches: int) -> Any:
    iterator = iter(make())
    next(itertools.islice(iterator, batches, batches), None)
    return next(iterator)


def stateful_dataloader_resume(dataset: Dataset[torch.Tensor]) -> Callable[[], Any] | None:
    """A resume of torchdata's StatefulDataLoader at half an epoch (None without torchdata)."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return None
    loader = StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    del iterator
    # Its sampler's position, moved to half the epoch (as position_after does for ours).
    half = len(loader) // 2
    sampler_state = state["_sampler_iter_state"]
    sampler_state["samples_yielded"] = sampler_state["sampler_iter_state"]["yielded"] = half * BATCH
    state["_sampler_iter_yielded"] = state["_num_yielded"] = half
    print(f"torchdata StatefulDataLoader's state: {len(pickle.dumps(state))} bytes pickled")

    def resume() -> Any:
        fresh = StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True)
        fresh.load_state_dict(state)
        return first_batch(fresh)

    return resume


def measure(name: str, dataset: Dataset[torch.Tensor], reps: int) -> list[tuple[str, float]]:
    def make() -> DataLoader[torch.Tensor]:
        return LOADERS[name](dataset)

    runs: list[tuple[str, Callable[[], Any]]] = [
        ("plain DataLoader: iter + first batch", lambda: first_batch(make())),
        ("sv.resumable, new epoch", lambda: first_batch(sv.resumable(make()))),
    ]
    for fraction in (0.001, 0.5, 0.999):
        state = position_after(make, fraction)
        label = f"sv.resumable, resumed at {fraction:.1%}"
        runs.append((label, lambda state=state: resume_from(make, state)))
    peer = stateful_dataloader_resume(dataset) if name == "shuffle, 0 workers" else None
    if peer is not None:
        runs.append(("torchdata StatefulDataLoader, resumed at 50.0%", peer))
    rows = interleaved(runs, reps)
    if name == "shuffle, 0 workers":  # seconds, not milliseconds: once
        half = len(make()) // 2
        label = "replay: iterate and drop 50.0% (loads them), 1 run"
        rows += interleaved([(label, lambda: replay(make, half))], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = Tiny(args.size)
    print(
        f"data position benchmark: {args.size:,} samples, batch {BATCH}, median of {args.reps}; "
        f"{platform.node()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    position = position_after(lambda: LOADERS["shuffle, 0 workers"](dataset), 0.5)
    print(f"saved position: {len(json.dumps(position))} bytes of JSON: {json.dumps(position)}")
    print()
    print("| loader | what | seconds | x plain iter + first batch |")
    print("|---|---|---:|---:|")
    for name in LOADERS:
        rows = measure(name, dataset, args.reps)
        unit = rows[0][1]
        for what, seconds in rows:
            print(f"| {name} | {what} | {seconds:.4f} | {seconds / unit:.2f} |", flush=True)


if __name__ == "__main__":
    main()
