"""Passes of a resumable loader over an iterable dataset.

An iterable dataset has no index to skip by: its position is its own state. A Stateful one
(``state_dict()`` / ``load_state_dict()``) resumes exactly:

- read in the main process (``num_workers=0``): its state is saved with the position, and loaded
  back before the resumed pass iterates it;
- read by workers: each worker's copy reports its state with every batch (``worker_side``);
  the position keeps the state after the last batch each worker delivered and which worker
  comes next; the resumed pass loads each worker's state into that worker's copy and starts at
  the worker that comes next.

Only a pass in progress is positioned this way: ``load_state_dict()`` followed by ``iter()``
continues a pass, so a position at a pass's end starts the next pass from a fresh copy of the
dataset, as a DataLoader does (what a dataset keeps from one pass to the next, an epoch
counter say, is restored by putting the dataset itself in the state).

Any other iterable dataset cannot be positioned: a resumed pass reads its first batches again
and discards them, and a warning that names the dataset says so.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

from statevault.errors import CheckpointError
from statevault.state.data_position import Position, WorkerProgress
from statevault.state.data_seeds import derive_seed
from statevault.state.inner_loader import iterable_loader
from statevault.state.map_passes import process_rank
from statevault.state.stateful import is_stateful, type_name
from statevault.state.worker_side import (
    Marker,
    Reported,
    ReportingCollate,
    WorkerPlan,
    worker_iterable,
)

SKIP = object()  # what ``take`` returns for an item that is no batch (a worker's empty turn)


class IterablePasses:
    """Starts and resumes the passes of one DataLoader over an iterable dataset."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.stateful = is_stateful(self.dataset)
        self.workers = int(loader.num_workers)
        self.progress: WorkerProgress | None = None
        self._inner: Any = None
        self._wrapper: Any = None
        self._generator: Any = None

    def start(
        self, position: Position, resume: bool, source_seed: int
    ) -> tuple[Position, Iterator[Any], int | None]:
        """The started pass's position and its batches (their number is not known)."""
        continuing = resume and position.started
        seed = position.seed if continuing else None  # continuing: the pass has its seed
        if seed is None:
            seed = derive_seed(source_seed, position.epoch)
        if self.workers == 0:
            if continuing and self.stateful and position.dataset is not None:
                self.dataset.load_state_dict(position.dataset)
            inner = self._iterate(self._plain_inner(), seed)
        else:
            plan = self._plan(position, continuing, seed, source_seed)
            inner = self._iterate(self._worker_inner(plan), seed)
        skipped = position.batches if continuing else 0
        if skipped and not self.stateful:
            _read_and_discard(inner, skipped)
        return Position(position.epoch, seed, skipped), inner, None

    def take(self, item: Any) -> Any:
        """The batch in ``item`` (recording a worker's report), or SKIP."""
        if isinstance(item, Marker):
            return SKIP
        if isinstance(item, Reported):
            progress = self.progress
            if progress is not None:
                progress.counts[item.worker] = item.batches_read
                progress.states[item.worker] = item.state
                progress.next_worker = (item.worker + 1) % self.workers
            return item.batch
        return item

    def carry(self, position: Position) -> Position:
        return Position(position.epoch + 1)

    def live(self, position: Position) -> Position:
        """``position`` with the dataset's state as it is now (in a pass in progress)."""
        if not self.stateful or not position.started:
            return position
        if self.workers == 0:
            return _with(position, dataset=self.dataset.state_dict())
        return _with(position, workers=copy.deepcopy(self.progress))

    def reset(self) -> None:
        self._inner = self._wrapper = None

    def on_load(self, position: Position) -> None:
        """Check that this loader can continue ``position``; warn when it cannot exactly."""
        if position.split is not None:
            raise CheckpointError(
                "sv.resumable: the saved data position is a map-style loader's (it has a "
                "sampler's split); it cannot position an iterable dataset"
            )
        if self.stateful:
            self._check_worker_count(position)
        elif position.started and position.batches:
            warnings.warn(_unpositioned_warning(self.dataset, position), stacklevel=4)

    def _check_worker_count(self, position: Position) -> None:
        saved = None if position.workers is None else len(position.workers.counts)
        if position.dataset is not None and self.workers > 0:
            saved = 0
        if saved is None or saved == self.workers:
            return
        raise CheckpointError(
            f"sv.resumable: the position of {type_name(self.dataset)} was saved with "
            f"num_workers={saved} (each worker reads its own part of an iterable dataset) and "
            f"this loader has num_workers={self.workers}; resume with num_workers={saved}"
        )

    def _plan(
        self, position: Position, continuing: bool, seed: int, source_seed: int
    ) -> WorkerPlan:
        batch = self.loader.batch_size or 1
        plan = WorkerPlan(position.epoch, seed, source_seed, process_rank(), batch)
        if not self.stateful:
            return plan
        saved = position.workers if continuing else None
        if saved is None:
            self.progress = WorkerProgress.fresh(self.workers)
            return plan
        plan.states, plan.counts = list(saved.states), list(saved.counts)
        plan.markers_below = saved.next_worker
        self.progress = copy.deepcopy(saved)
        return plan

    def _plain_inner(self) -> Any:
        if self._inner is None:
            self._inner = iterable_loader(
                self.loader, self.dataset, self.loader.collate_fn, self._own_generator()
            )
        return self._inner

    def _worker_inner(self, plan: WorkerPlan) -> Any:
        if self._inner is None:
            self._wrapper = worker_iterable(self.dataset, plan)
            collate = self.loader.collate_fn
            if self.stateful:
                collate = ReportingCollate(collate, self.loader.batch_size is not None, True)
            generator = self._own_generator()
            self._inner = iterable_loader(self.loader, self._wrapper, collate, generator)
        # Workers that are started for this pass get this plan; persistent ones that exist
        # already follow their own count of passes (see worker_side).
        self._wrapper.plan = plan
        return self._inner

    def _own_generator(self) -> Any:
        import torch

        if self._generator is None:
            self._generator = torch.Generator()
        return self._generator

    def _iterate(self, inner: Any, seed: int) -> Iterator[Any]:
        self._own_generator().manual_seed(derive_seed(seed, "base"))
        return iter(inner)


def _read_and_discard(batches: Iterator[Any], count: int) -> None:
    for _ in range(count):
        if next(batches, SKIP) is SKIP:
            return


def _with(position: Position, **changes: Any) -> Position:
    import dataclasses

    return dataclasses.replace(position, **changes)


def _unpositioned_warning(dataset: Any, position: Position) -> str:
    return (
        f"statevault: {type_name(dataset)} is an IterableDataset without state_dict() and "
        "load_state_dict(), so its position cannot be saved: resuming epoch "
        f"{position.epoch} at batch {position.batches} reads its first {position.batches} "
        "batches again and discards them (their samples are loaded). That is exact only if the "
        "dataset yields the same items in the same order each time it is iterated. Give it "
        "state_dict() and load_state_dict() to resume without reading them"
    )
