"""The read-only side of a run's manager: which steps exist, which is best, what a checkpoint
records, which checkpoints retention keeps and why, and whether a step is due (cadence and
preemption). Mixed into :class:`statevault.manager.manager.CheckpointManager`."""

from __future__ import annotations

import time
from typing import Any

from statevault.checkpoint.save import SaveFuture
from statevault.errors import CheckpointError
from statevault.manager.index import CheckpointRecord, RunScan
from statevault.manager.preemption import PreemptionWatcher
from statevault.manager.replication import Replicator
from statevault.manager.retention import KeepBest, RetentionPolicy, decide
from statevault.manager.rundir import RunDir


class RunQueries:
    """Queries over the manager's state (attributes set by CheckpointManager.__init__)."""

    directory: str
    retention: list[RetentionPolicy]
    save_interval_steps: int | None
    save_interval_seconds: float | None
    _dir: RunDir
    _scan: RunScan
    _replicator: Replicator | None
    _closed: bool
    _pending: tuple[int, SaveFuture] | None
    _resumed_step: int | None
    _last_save_time: float
    _preemption: PreemptionWatcher
    _preemption_saved: bool
    _run: dict[str, Any]

    @property
    def run_id(self) -> str:
        run_id: str = self._run["run_id"]
        return run_id

    def _collect(self, block: bool) -> None:
        raise NotImplementedError

    # ---- queries ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints of this run (the first tier), oldest first."""
        self._collect(block=False)
        return [r.step for r in self._scan.committed()]

    def replica_steps(self) -> list[int]:
        """Steps committed on the replica tier, oldest first ([] without ``replicate_to``)."""
        if self._replicator is None:
            return []
        if not self._closed:
            self._collect(block=False)
        return [r.step for r in self._replicator.committed()]

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (or the first KeepBest policy), None without one."""
        policy = next((p for p in self.retention if isinstance(p, KeepBest)), None)
        if policy is None:
            return None
        scored = [
            (policy.score(r.metrics[policy.metric]), r.step)
            for r in self._scan.committed()
            if policy.has(r)
        ]
        return min(scored)[1] if scored else None

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be): a local path or a URL."""
        return self._dir.path(step)

    def checkpoints(self) -> list[CheckpointRecord]:
        """Every checkpoint directory with its status, metrics and why retention keeps it."""
        records = sorted(self._scan.records.values(), key=lambda r: r.step)
        kept, _ = decide(self._own_records(), self.retention, self._protected())
        for record in records:
            record.kept_because = kept.get(record.step, [])
            if record.status == "committed" and record.run_id != self.run_id:
                record.kept_because = ["written by another run"]
        return records

    def metadata(self, step: int) -> dict[str, Any]:
        """What the checkpoint of ``step`` records: user metadata, metrics, time, save figures."""
        record = self._committed_record(step)
        return {
            "step": record.step,
            "created": record.created,
            "metrics": dict(record.metrics),
            "metadata": record.metadata,
            "save": dict(record.save),
            "run_id": record.run_id,
        }

    def _committed_record(self, step: int) -> CheckpointRecord:
        record = self._scan.records.get(step)
        if record is None or record.status != "committed":
            raise CheckpointError(f"no committed checkpoint for step {step} in {self.directory}")
        return record

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived *and* the save it asked for is durable (on
        the replica too, with ``replicate_to``): the loop may exit. (A signal landing after
        ``should_save`` returned False is honoured at the next step: ``should_save`` is True
        there, and ``preempted`` only after that save.)"""
        return self._preemption.requested and self._preemption_saved

    @property
    def preemption_requested(self) -> bool:
        """True as soon as SIGTERM / SIGUSR1 (or ``request_preemption``) arrived."""
        return self._preemption.requested

    def request_preemption(self) -> None:
        """Act as if SIGTERM arrived (for schedulers that notify some other way)."""
        self._preemption.request()

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due: an interval is reached, or a preemption signal arrived."""
        if step in self._scan.records and self._scan.records[step].status == "committed":
            return False
        if self._pending is not None and self._pending[0] == step:
            return False
        if self._preemption.requested and not self._preemption_saved:
            return True
        by_steps = self.save_interval_steps is not None
        by_time = self.save_interval_seconds is not None
        if not by_steps and not by_time:
            return True
        if by_steps and step % int(self.save_interval_steps or 1) == 0:
            return True
        elapsed = time.monotonic() - self._last_save_time
        return by_time and elapsed >= float(self.save_interval_seconds or 0)

    def _protected(self) -> dict[int, str]:
        protected: dict[int, str] = {}
        latest = self.latest_step()
        if latest is not None:
            protected[latest] = "newest"
        if self._resumed_step is not None and self._resumed_step == latest:
            protected[self._resumed_step] = "resumed from (until a newer one is committed)"
        if self._replicator is not None:
            for step in self._replicator.busy_steps():
                protected.setdefault(step, "being replicated")
        return protected

    def _own_records(self) -> list[CheckpointRecord]:
        """Checkpoints this run wrote; another run's copied here are never ours to delete."""
        return [r for r in self._scan.records.values() if r.run_id == self.run_id]
