"""What a resumable loader puts into its DataLoader workers.

Map-style datasets: each batch of keys travels to its worker as a :class:`SeededBatch` (or a
:class:`SeededKey` without automatic batching) carrying its seed, and the worker's dataset is a
:class:`SeededMapDataset` that reseeds the worker's random streams from it before loading the
batch (see ``data_seeds``).

Iterable datasets: the worker's dataset is a ``WorkerIterable``, which reseeds before each
batch it reads (from the pass seed, the worker and the batch's number in that worker), can load
a saved state into the worker's copy of the dataset first, and can start with one empty batch
(a :class:`Marker`): the DataLoader deals batches to workers in turn starting at worker 0, so
empty batches from workers ``0 .. s-1`` make a resumed pass continue at worker ``s``, as the
interrupted one would have. :class:`ReportingCollate` drops those markers and sends each
batch back with the worker's number, its count and, for a Stateful dataset, its state after
the batch (a :class:`Reported`).

Everything here is pickled into worker processes: the classes are module-level (the one that
must subclass torch's IterableDataset is made on first use, see the module ``__getattr__``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from statevault.state.data_seeds import derive_seed, reseed_process


class SeededBatch(list[Any]):
    """A batch of keys and the seed its worker loads it with."""

    def __init__(self, keys: Iterable[Any], seed: int) -> None:
        super().__init__(keys)
        self.seed = seed

    def __reduce__(self) -> tuple[Any, ...]:
        return (SeededBatch, (list(self), self.seed))


class SeededKey:
    """One key (no automatic batching) and the seed its worker loads it with."""

    __slots__ = ("key", "seed")

    def __init__(self, key: Any, seed: int) -> None:
        self.key, self.seed = key, seed

    def __reduce__(self) -> tuple[Any, ...]:
        return (SeededKey, (self.key, self.seed))


def seeded(
    batches: Iterator[Any], first: int, pass_seed: int, rank: int, batched: bool
) -> Iterator[Any]:
    """``batches`` (numbered from ``first``) with the seed of each."""
    for number, batch in enumerate(batches, start=first):
        seed = derive_seed(pass_seed, rank, number)
        yield SeededBatch(batch, seed) if batched else SeededKey(batch, seed)


class _Forwarding:
    """Reads and writes of attributes it does not own go to the wrapped dataset, so that a
    ``worker_init_fn`` that configures ``get_worker_info().dataset`` still configures it."""

    _own: frozenset[str] = frozenset({"dataset"})

    def __getattr__(self, name: str) -> Any:
        dataset = self.__dict__.get("dataset")
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)


class SeededMapDataset(_Forwarding):
    """A map-style dataset as a worker sees it: reseeded before each batch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitems__(self, batch: Any) -> Any:
        keys = list(batch)
        if isinstance(batch, SeededBatch):
            reseed_process(batch.seed)
        fetch = getattr(self.dataset, "__getitems__", None)
        if fetch:
            return fetch(keys)
        return [self.dataset[key] for key in keys]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, SeededKey):
            reseed_process(key.seed)
            key = key.key
        return self.dataset[key]

    def __len__(self) -> int:
        return len(self.dataset)


class Marker:
    """An empty batch: its worker's turn, taken to shift the order of a resumed pass."""


class Reported(NamedTuple):
    """A batch of an iterable dataset as its worker sends it back."""

    batch: Any
    worker: int
    batches_read: int  # batches this worker has read in this pass, this one included
    state: Any  # the worker's dataset state after this batch (Stateful datasets), else None


@dataclass
class WorkerPlan:
    """Where the workers of an iterable dataset start a pass."""

    pass_number: int
    pass_seed: int
    source_seed: int  # later passes of persistent workers: derive_seed(source_seed, number)
    rank: int
    items_per_batch: int
    counts: list[int] | None = None  # per worker: batches already read in this pass
    states: list[Any] | None = None  # per worker: state to load first (None: keep the copy's)
    markers_below: int = 0  # workers with a lower number read one empty batch first


class _WorkerIterableBase(_Forwarding):
    _own = frozenset({"dataset", "plan", "count", "last_pass"})

    def __init__(self, dataset: Any, plan: WorkerPlan) -> None:
        self.dataset, self.plan, self.count, self.last_pass = dataset, plan, 0, -1

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan, number, seed = self._this_pass()
        size = plan.items_per_batch
        if plan.pass_number == number and plan.states and plan.states[worker] is not None:
            self.dataset.load_state_dict(plan.states[worker])
        fresh = plan.pass_number != number
        self.count = 0 if fresh or not plan.counts else plan.counts[worker]
        if not fresh and worker < plan.markers_below:
            yield from itertools.repeat(Marker(), size)
        items = iter(self.dataset)
        while True:
            reseed_process(derive_seed(seed, plan.rank, worker, self.count))
            group = list(itertools.islice(items, size))
            if not group:
                return
            self.count += 1
            yield from group

    def _this_pass(self) -> tuple[WorkerPlan, int, int]:
        """The plan, and this iteration's pass number and seed: the plan's for the first
        iteration of this copy, the following ones for a persistent worker's later ones."""
        plan = self.plan
        if self.last_pass < 0:
            self.last_pass = plan.pass_number
            return plan, plan.pass_number, plan.pass_seed
        self.last_pass += 1
        return plan, self.last_pass, derive_seed(plan.source_seed, self.last_pass)


_MADE: dict[str, type] = {}


def _worker_iterable_class() -> type:
    made = _MADE.get("WorkerIterable")
    if made is None:
        from torch.utils.data import IterableDataset

        made = type(
            "WorkerIterable",
            (_WorkerIterableBase, IterableDataset),
            {"__module__": __name__, "__qualname__": "WorkerIterable"},
        )
        _MADE["WorkerIterable"] = made
    return made


def worker_iterable(dataset: Any, plan: WorkerPlan) -> Any:
    """The iterable dataset as the workers see it (see the module docstring)."""
    return _worker_iterable_class()(dataset, plan)


def __getattr__(name: str) -> Any:
    # Unpickling a WorkerIterable in a spawned worker looks the class up here by name.
    if name == "WorkerIterable":
        return _worker_iterable_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ReportingCollate:
    """The loader's collate_fn in a worker of an iterable dataset (see the module docstring)."""

    def __init__(self, collate_fn: Callable[[Any], Any], batched: bool, stateful: bool) -> None:
        self.collate_fn, self.batched, self.stateful = collate_fn, batched, stateful

    def __call__(self, data: Any) -> Any:
        from torch.utils.data import get_worker_info

        first = data[0] if self.batched and data else data
        if isinstance(first, Marker):
            return Marker()
        batch = self.collate_fn(data)
        info = get_worker_info()
        if info is None:
            raise RuntimeError("statevault: ReportingCollate runs in DataLoader workers only")
        wrapper: Any = info.dataset
        state = wrapper.dataset.state_dict() if self.stateful else None
        return Reported(batch, info.id, wrapper.count, state)
