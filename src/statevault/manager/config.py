"""The manager's settings that are values of their own, checked where they are made.

- :class:`Replica`: the second, durable tier (``replicate_to=``): where, how often, and its own
  retention. A plain URL is shorthand for ``Replica(url)``.
- :class:`RunOptions`: what a run rarely needs to change (``options=``): its name and metadata
  in ``run.json``, the staging budget of asynchronous saves, and the timings of the writer
  lease and of sweeping on object stores.
- :func:`retention_policies`: the retention of a tier, from either the shortcuts
  (``max_to_keep``, ``keep_every_n_steps``, ``best_metric`` with ``best_mode`` and
  ``keep_best``) or a list of policies (``retention=``), never both.

Example::

    sv.CheckpointManager(
        "/scratch/ckpt",
        max_to_keep=2,
        replicate_to=sv.Replica("s3://bucket/run", every=10, max_to_keep=5),
        options=sv.RunOptions(metadata={"lr": 3e-4}, lease_seconds=30),
    )
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from statevault.manager import options as check
from statevault.manager.holder import DEFAULT_LEASE_SECONDS
from statevault.manager.retention import RetentionPolicy, policies_from_options

DEFAULT_STALE_AFTER_SECONDS = 3600.0


class _DefaultCount(int):
    """The default ``max_to_keep`` (3), told apart from an explicit 3: with ``retention=``,
    passing the shortcut at all is an error, whatever its value."""


DEFAULT_MAX_TO_KEEP: int = _DefaultCount(3)


def retention_policies(
    max_to_keep: int | None,
    keep_every_n_steps: int | None,
    best_metric: str | None,
    best_mode: Literal["min", "max"],
    keep_best: int,
    retention: Sequence[RetentionPolicy] | None,
    owner: str = "CheckpointManager",
) -> list[RetentionPolicy]:
    """The policies of a tier: ``retention`` as given, or those the shortcuts stand for."""
    if retention is None:
        return policies_from_options(
            max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best
        )
    shortcuts = [
        name
        for name, given in (
            ("max_to_keep", max_to_keep is not DEFAULT_MAX_TO_KEEP),
            ("keep_every_n_steps", keep_every_n_steps is not None),
            ("best_metric", best_metric is not None),
            ("best_mode", best_mode != "min"),
            ("keep_best", keep_best != 1),
        )
        if given
    ]
    if shortcuts:
        raise ValueError(
            f"{owner}: pass either retention=[...] or the retention shortcuts "
            f"({', '.join(shortcuts)}), not both: retention= replaces the shortcuts, so they "
            "would be ignored. Put every policy in the list (sv.KeepLatest, "
            "sv.KeepEveryNSteps, sv.KeepBest)"
        )
    policies = list(retention)
    for policy in policies:
        if not callable(getattr(policy, "keep", None)):
            raise TypeError(f"{owner}: retention= takes policies, got {policy!r}")
    return policies


@dataclass(frozen=True)
class Replica:
    """The durable second tier of a run (``CheckpointManager(..., replicate_to=Replica(...))``).

    ``url``: any fsspec URL or path (an object store, a shared filesystem). Every ``every``-th
    checkpoint the manager saves, and every preemption save, is copied there in the background.
    Its retention: ``max_to_keep`` (default 3; None keeps all) or ``retention=[...]``, not both.
    ``storage_options``: for fsspec (default: the manager's own)."""

    url: str | os.PathLike[str]
    every: int = 1
    max_to_keep: int | None = DEFAULT_MAX_TO_KEEP
    retention: Sequence[RetentionPolicy] | None = None
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        check.count("Replica(every)", self.every)
        self.policies()  # refuses bad counts, and both max_to_keep and retention

    def policies(self) -> list[RetentionPolicy]:
        return retention_policies(
            self.max_to_keep, None, None, "min", 1, self.retention, owner="Replica"
        )


def as_replica(value: Replica | str | os.PathLike[str] | None) -> Replica | None:
    """``replicate_to`` as a :class:`Replica` (a URL or path is shorthand for ``Replica(url)``)."""
    if value is None or isinstance(value, Replica):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"replicate_to takes a URL, a path or an sv.Replica, got {type(value).__name__}"
        )
    return Replica(value)


@dataclass(frozen=True)
class RunOptions:
    """What a run rarely needs to change (``CheckpointManager(..., options=RunOptions(...))``).

    ``name`` and ``metadata``: recorded in ``run.json`` when the run is created (metadata: any
    tree of plain values, say the hyper-parameters). ``staging_budget_bytes``: the host memory
    asynchronous saves stage into (default: half of the machine's memory; a state larger than
    it is staged in pieces). ``lease_seconds``: how long a writer lock or lease without a
    heartbeat stays valid (default 60). ``stale_after_seconds``: on an object store, how old a
    manifest-less ``step_*`` prefix must be before it is swept (default 3600: a younger one may
    be a save in flight)."""

    name: str | None = None
    metadata: Any = None
    staging_budget_bytes: int | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    stale_after_seconds: float = DEFAULT_STALE_AFTER_SECONDS

    def __post_init__(self) -> None:
        check.text_or_none("RunOptions(name)", self.name)
        if self.staging_budget_bytes is not None:
            check.count("RunOptions(staging_budget_bytes)", self.staging_budget_bytes)
        check.seconds("RunOptions(lease_seconds)", self.lease_seconds)
        check.seconds("RunOptions(stale_after_seconds)", self.stale_after_seconds, True)
