"""Resume: load the newest checkpoint that passes its checksums, across the tiers of a run.

A candidate is a step and the places that hold it, best first (the local tier before the
replica). Damaged copies are skipped with a warning naming them and kept for inspection; the
next copy of the same step, then the next older step, is tried.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from statevault.checkpoint.load import load
from statevault.errors import CheckpointNotFoundError, CorruptCheckpointError
from statevault.manager.index import CheckpointRecord


@dataclass(frozen=True)
class Copy:
    """One tier's copy of a checkpoint."""

    tier: str  # "local" | "replica" | "source"
    url: str
    record: CheckpointRecord | None
    storage_options: Mapping[str, Any]


# What restore tries: a corrupt checkpoint is tried (and skipped with a warning naming it);
# incomplete, foreign and unreadable directories are not checkpoints.
LOADABLE = ("committed", "corrupt")


@dataclass
class Loaded:
    step: int
    copy: Copy
    state: Any


def candidates(
    tiers: Sequence[tuple[str, Mapping[int, CheckpointRecord], Mapping[str, Any]]],
    step: int | None,
) -> list[tuple[int, list[Copy]]]:
    """Steps to try, newest first, each with its copies in tier order.

    ``tiers``: (tier name, records by step, storage options), best tier first."""
    steps: set[int] = set()
    for _, records, _ in tiers:
        steps.update(s for s, r in records.items() if r.status in LOADABLE)
    if step is not None:
        steps = {step}
    ordered = []
    for candidate in sorted(steps, reverse=True):
        copies = []
        for tier, records, options in tiers:
            record = records.get(candidate)
            if record is not None and record.status in LOADABLE:
                copies.append(Copy(tier, record.path, record, options))
        ordered.append((candidate, copies))
    return ordered


def load_newest(
    ordered: list[tuple[int, list[Copy]]],
    into: Mapping[str, Any] | None,
    device: str | None,
    strict: bool,
    explicit: bool,
) -> tuple[Loaded | None, list[tuple[int, Copy, str]]]:
    """Load the first copy that loads. Returns it and the copies found damaged on the way.

    ``explicit`` (a step was asked for): a damaged last copy raises instead of being skipped."""
    damaged: list[tuple[int, Copy, str]] = []
    for candidate, copies in ordered:
        if explicit and not copies:
            raise CheckpointNotFoundError(f"no committed checkpoint for step {candidate}")
        for index, copy in enumerate(copies):
            last = index == len(copies) - 1
            if copy.record is not None and copy.record.status == "corrupt" and not explicit:
                warnings.warn(
                    f"statevault: skipping damaged checkpoint {copy.url}: {copy.record.problem}",
                    stacklevel=4,
                )
                continue
            try:
                state = load(
                    copy.url,
                    into=into,
                    device=device,
                    strict=strict,
                    storage_options=copy.storage_options or None,
                )
            except CorruptCheckpointError as exc:
                warnings.warn(
                    f"statevault: skipping damaged checkpoint {copy.url}: {exc}", stacklevel=4
                )
                damaged.append((candidate, copy, str(exc)))
                if explicit and last:
                    raise
                continue
            return Loaded(candidate, copy, state), damaged
    return None, damaged
