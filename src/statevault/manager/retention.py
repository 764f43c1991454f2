"""Retention as small composable policies. A checkpoint is kept if any policy keeps it.

Each policy maps the run's committed checkpoints to the steps it keeps, with a reason that
``statevault ls`` shows ("latest 3", "every 1000 steps", "best val_loss (max)")::

    policies = [KeepLatest(3), KeepEveryNSteps(10_000), KeepBest("val_loss", "min", 2)]
    kept, deletable = decide(records, policies, protected={1200: "resumed from"})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from statevault.manager import options
from statevault.manager.index import CheckpointRecord, RunScan

Mode = Literal["min", "max"]


class RetentionPolicy(Protocol):
    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        """The steps this policy keeps among ``records`` (committed, sorted by step), and why."""
        ...


@dataclass(frozen=True)
class KeepLatest:
    count: int

    def __post_init__(self) -> None:
        options.count("KeepLatest(count)", self.count)

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        newest = sorted(r.step for r in records)[-self.count :] if self.count > 0 else []
        return dict.fromkeys(newest, f"latest {self.count}")


@dataclass(frozen=True)
class KeepEveryNSteps:
    interval: int

    def __post_init__(self) -> None:
        options.count("KeepEveryNSteps(interval)", self.interval)

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        return {
            r.step: f"every {self.interval} steps" for r in records if r.step % self.interval == 0
        }


@dataclass(frozen=True)
class KeepBest:
    metric: str
    mode: Mode = "min"
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise TypeError(f"KeepBest(metric) must be a metric name, got {self.metric!r}")
        options.choice("KeepBest(mode)", self.mode, ("min", "max"))
        options.count("KeepBest(count)", self.count)

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        scored = [(self.score(r.metrics[self.metric]), r.step) for r in records if self.has(r)]
        best = sorted(scored)[: self.count]
        return {step: f"best {self.metric} ({self.mode})" for _, step in best}

    def has(self, record: CheckpointRecord) -> bool:
        value = record.metrics.get(self.metric)
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def score(self, value: float) -> float:
        """Lower is better; NaN (a diverged run) ranks last."""
        if math.isnan(value):
            return math.inf
        return value if self.mode == "min" else -value


def decide(
    records: Sequence[CheckpointRecord],
    policies: Sequence[RetentionPolicy],
    protected: Mapping[int, str],
) -> tuple[dict[int, list[str]], list[int]]:
    """Steps kept (with every reason) and steps to delete. No policies means keep everything."""
    committed = sorted((r for r in records if r.status == "committed"), key=lambda r: r.step)
    reasons: dict[int, list[str]] = {step: [why] for step, why in protected.items()}
    if not policies:
        for record in committed:
            reasons.setdefault(record.step, []).append("no retention policy")
    for policy in policies:
        for step, why in policy.keep(committed).items():
            reasons.setdefault(step, []).append(why)
    deletable = [r.step for r in committed if r.step not in reasons]
    return reasons, deletable


def policies_from_options(
    max_to_keep: int | None,
    keep_every_n_steps: int | None,
    best_metric: str | None,
    best_mode: Literal["min", "max"],
    keep_best: int,
) -> list[RetentionPolicy]:
    """The policies the manager's keyword options stand for (an empty list keeps everything);
    each option is checked here, at the call (options.py)."""
    options.choice("best_mode", best_mode, ("min", "max"))
    max_to_keep = options.count_or_none("max_to_keep", max_to_keep)
    keep_every_n_steps = options.count_or_none(
        "keep_every_n_steps", keep_every_n_steps, "keep no step for its number"
    )
    keep_best = options.count("keep_best", keep_best)
    best_metric = options.text_or_none("best_metric", best_metric)
    policies: list[RetentionPolicy] = []
    if max_to_keep is not None:
        policies.append(KeepLatest(max_to_keep))
    if keep_every_n_steps is not None:
        policies.append(KeepEveryNSteps(keep_every_n_steps))
    if best_metric is not None:
        policies.append(KeepBest(best_metric, best_mode, keep_best))
    return policies


def retention_reasons(
    scan: RunScan, run_id: str | None, policies: Sequence[RetentionPolicy]
) -> tuple[dict[int, list[str]], list[int]]:
    """Why each committed checkpoint is kept, and the steps the policies would delete.

    As the manager decides: the newest committed checkpoint is always kept, and only this run's
    own checkpoints count (one written by another run, or by ``sv.save``, is never deleted).
    """
    committed = scan.committed()
    own = [r for r in committed if run_id is not None and r.run_id == run_id]
    protected = {committed[-1].step: "newest"} if committed else {}
    kept, deletable = decide(own, policies, protected)
    own_steps = {r.step for r in own}
    for record in committed:
        if record.step not in own_steps:
            kept[record.step] = ["written by another run"]
    return kept, deletable
