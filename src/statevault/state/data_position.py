"""The data position of a resumable loader: what its ``state_dict()`` holds, a few numbers.

::

    {"version": 1,
     "epoch": 3,            # the pass over the data in progress (or the next one)
     "seed": 8812...,       # that pass's seed; None: it has not started
     "batches": 17,         # batches of it already consumed
     "sampler_epoch": 3,    # the sampler's epoch (set_epoch) when it started, if it has one
     "split": {...},        # DistributedSampler: the part of the epoch's order it covers
     "world": 2,            # the sampler's num_replicas, if it has one
     "workers": None,       # Stateful iterable datasets read by workers: each one's state
     "dataset": None}       # Stateful iterable datasets read in the main process: its state

A batch counts as consumed once the iterator has returned it. When the last batch of a pass is
returned, the position moves to the start of the next pass (``seed`` None), so a checkpoint
taken then resumes into the next epoch (an iterable dataset's pass, whose length is not known,
ends when its iterator does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from statevault.errors import CheckpointError
from statevault.state.distributed_split import Split, split_from_state

VERSION = 1
_KEYS = (
    "version",
    "epoch",
    "seed",
    "batches",
    "sampler_epoch",
    "split",
    "world",
    "workers",
    "dataset",
)


@dataclass
class WorkerProgress:
    """How far each worker has read a Stateful iterable dataset in the current pass."""

    next_worker: int  # the worker whose batch comes next
    counts: list[int]  # batches each worker has read in this pass
    states: list[Any]  # each worker's dataset state (None: the worker's fresh copy)

    @classmethod
    def fresh(cls, workers: int) -> WorkerProgress:
        return cls(0, [0] * workers, [None] * workers)

    def to_state(self) -> dict[str, Any]:
        return {"next": self.next_worker, "counts": list(self.counts), "states": self.states}


@dataclass
class Position:
    """A data position (see the module docstring)."""

    epoch: int
    seed: int | None = None
    batches: int = 0
    sampler_epoch: int | None = None
    split: Split | None = None
    world: int | None = None
    workers: WorkerProgress | None = None
    dataset: Any = None

    @property
    def started(self) -> bool:
        return self.seed is not None

    def to_state(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "batches": self.batches,
            "sampler_epoch": self.sampler_epoch,
            "split": None if self.split is None else self.split.to_state(),
            "world": self.world,
            "workers": None if self.workers is None else self.workers.to_state(),
            "dataset": self.dataset,
        }

    @classmethod
    def from_state(cls, state: Any) -> Position:
        """Parse a saved position; raises CheckpointError saying what is wrong with it."""
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise _bad(f"expected a mapping with version {VERSION}, got {_describe(state)}")
        missing = [key for key in _KEYS if key not in state]
        if missing:
            raise _bad(f"the keys {missing} are missing")
        try:
            return cls(
                epoch=_count(state["epoch"]),
                seed=None if state["seed"] is None else int(state["seed"]),
                batches=_count(state["batches"]),
                sampler_epoch=_optional_int(state["sampler_epoch"]),
                split=None if state["split"] is None else split_from_state(state["split"]),
                world=_optional_int(state["world"]),
                workers=_workers_from_state(state["workers"]),
                dataset=state["dataset"],
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise _bad(str(exc)) from exc


def _workers_from_state(state: Any) -> WorkerProgress | None:
    if state is None:
        return None
    counts, states = [_count(c) for c in state["counts"]], list(state["states"])
    if len(counts) != len(states) or not 0 <= int(state["next"]) < max(len(counts), 1):
        raise ValueError("the workers' counts and states disagree")
    return WorkerProgress(int(state["next"]), counts, states)


def _count(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return int(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def _bad(detail: str) -> CheckpointError:
    return CheckpointError(
        f"sv.resumable: the saved data position is not one this statevault can read ({detail}); "
        "it must come from the state_dict() of an sv.resumable loader"
    )
