"""CheckpointManager: a run of checkpoints, with retention, resume, preemption and lineage.

Three levels, kept apart (the Orbax habit): this manager handles a *sequence* of steps; the
checkpoint module makes *one* atomic save; adapters handle one kind of value. Example::

    mgr = sv.CheckpointManager("runs/exp1", max_to_keep=3, save_interval_steps=100)
    r = mgr.restore(into={"model": model, "optimizer": opt, "rng": sv.RNGState()})
    start = r.step + 1 if r else 0
    for step in range(start, total):
        loss = train_step()
        if mgr.should_save(step):
            mgr.save(step, {"model": model, "optimizer": opt, "rng": sv.RNGState()},
                     metrics={"loss": loss})
        if mgr.preempted:
            break
    mgr.close()
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from statevault import commit
from statevault.checkpoint import load, local_path
from statevault.errors import CheckpointError, CorruptCheckpointError
from statevault.manager.index import (
    CheckpointRecord,
    RunScan,
    annotations_bytes,
    encode_metrics,
    plain_metrics,
    read_annotations,
    read_record,
    scan_run,
)
from statevault.manager.lock import RunLock
from statevault.manager.naming import ANNOTATIONS_FILE, LOCK_FILE, RUN_FILE, step_dir_name
from statevault.manager.preemption import PreemptionWatcher
from statevault.manager.retention import (
    KeepBest,
    RetentionPolicy,
    decide,
    policies_from_options,
)
from statevault.manager.run import new_run, new_session, read_run, write_run
from statevault.saver import SaveFuture, Saver
from statevault.storage.local import LocalStorage, fsync_dir

logger = logging.getLogger("statevault")


@dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` restored: the step, its path and the loaded tree."""

    step: int
    path: str
    state: Any


class CheckpointManager:
    """Manages the checkpoints of one run directory (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = 3,
        keep_every_n_steps: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        save_on_preemption: bool = True,
        run_metadata: Any = None,
        retention: Sequence[RetentionPolicy] | None = None,
        name: str | None = None,
        async_save: bool = False,
        staging_budget_bytes: int | None = None,
    ) -> None:
        self.directory = local_path(directory)
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.retention = (
            list(retention)
            if retention is not None
            else policies_from_options(
                max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best
            )
        )
        os.makedirs(self.directory, exist_ok=True)
        self._lock = RunLock(os.path.join(self.directory, LOCK_FILE))
        self._lock.acquire()
        self._closed = False
        try:
            self._run = self._open_run(name, run_metadata)
            self._sweep_temporaries()
            self._scan: RunScan = scan_run(self.directory)
        except BaseException:
            self._closed = True
            self._lock.release()
            raise
        self._saver = Saver(asynchronous=async_save, staging_budget_bytes=staging_budget_bytes)
        self._pending: tuple[int, SaveFuture] | None = None
        self._resumed_step: int | None = None
        self._last_save_time = time.monotonic()
        self._preemption = PreemptionWatcher()
        self._preemption_saved = False
        if save_on_preemption:
            self._preemption.install()

    # ---- run bookkeeping -------------------------------------------------------------------

    def _open_run(self, name: str | None, run_metadata: Any) -> dict[str, Any]:
        run = read_run(self.directory) or new_run(self.directory, name, run_metadata)
        self._session = new_session()
        run["sessions"].append(self._session)
        write_run(self.directory, run)
        return run

    @property
    def run_id(self) -> str:
        run_id: str = self._run["run_id"]
        return run_id

    def _sweep_temporaries(self) -> None:
        """Remove leftovers of dead saves. Safe: holding the run lock, no other save is live.

        A committed checkpoint moved aside by an overwrite that died between its two renames
        (platforms without an atomic exchange) is put back first, never swept.
        """
        scan = scan_run(self.directory)
        leftovers = list(scan.temporaries)
        for name in scan.set_aside:
            original = os.path.join(self.directory, name.split(commit.TMP_MARKER)[0])
            if os.path.lexists(original):
                leftovers.append(name)  # the overwrite finished: the old copy is garbage
            else:
                os.rename(os.path.join(self.directory, name), original)
                fsync_dir(self.directory)
        # A step directory without a manifest was never a save in flight (saves run under
        # temporary names): it is what a deletion killed halfway left behind.
        leftovers += [
            os.path.basename(r.path) for r in scan.records.values() if r.status == "incomplete"
        ]
        leftovers += [n for n in os.listdir(self.directory) if n.startswith(RUN_FILE + ".tmp-")]
        for name in leftovers:
            path = os.path.join(self.directory, name)
            logger.info("statevault: removing leftover of an interrupted save: %s", path)
            if os.path.isdir(path) and not os.path.islink(path):
                LocalStorage().remove_tree(path)
            else:
                LocalStorage().remove_file(path)

    # ---- queries ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints of this run, oldest first."""
        self._collect(block=False)
        return [r.step for r in self._scan.committed()]

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
        return os.path.join(self.directory, step_dir_name(step))

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

    # ---- restore ---------------------------------------------------------------------------

    def restore(
        self,
        into: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        source: str | os.PathLike[str] | None = None,
        device: str | None = None,
        strict: bool = True,
    ) -> Restored | None:
        """Restore the newest valid checkpoint (or ``step``); None when the run has none.

        A checkpoint that fails verification is skipped with a warning naming it, and the next
        older one is tried; damaged checkpoints are kept for inspection, never deleted here.
        ``source``: fork from another run directory (its newest valid checkpoint, or ``step``)
        instead; the fork is recorded in this run's lineage.
        """
        if source is not None:
            restored = self._fork(local_path(source), into, step, device, strict)
        else:
            restored = self._restore_own(into, step, device, strict)
        if into is not None:
            # Staging memory for async saves is made ready now, in the background.
            self._saver.prepare(into, reserve_optimizer_moments=True)
        return restored

    def _restore_own(
        self,
        into: Mapping[str, Any] | None,
        step: int | None,
        device: str | None,
        strict: bool,
    ) -> Restored | None:
        self._collect(block=False)
        if step is not None:
            candidates = [step]
        else:  # newest first; damaged ones are named as they are passed over
            candidates = sorted(
                (r.step for r in self._scan.records.values() if r.status != "incomplete"),
                reverse=True,
            )
        for candidate in candidates:
            path = self.path(candidate)
            record = self._scan.records.get(candidate)
            if step is None and record is not None and record.status == "corrupt":
                warnings.warn(
                    f"statevault: skipping damaged checkpoint {path}: {record.problem}",
                    stacklevel=3,
                )
                continue
            try:
                state = load(path, into=into, device=device, strict=strict)
            except CorruptCheckpointError as exc:
                warnings.warn(
                    f"statevault: skipping damaged checkpoint {path}: {exc}", stacklevel=2
                )
                self._scan.records[candidate] = CheckpointRecord(
                    candidate, path, "corrupt", str(exc)
                )
                if step is not None:
                    raise
                continue
            self._resumed_step = candidate
            self._session["resumed_from"] = {"run_id": self.run_id, "step": candidate}
            write_run(self.directory, self._run)
            logger.info("statevault: resumed from %s", path)
            return Restored(candidate, path, state)
        return None

    def _fork(
        self,
        source: str,
        into: Mapping[str, Any] | None,
        step: int | None,
        device: str | None,
        strict: bool,
    ) -> Restored | None:
        scan = scan_run(source)
        steps = [step] if step is not None else [r.step for r in reversed(scan.committed())]
        for candidate in steps:
            path = os.path.join(source, step_dir_name(candidate))
            try:
                state = load(path, into=into, device=device, strict=strict)
            except CorruptCheckpointError as exc:
                warnings.warn(
                    f"statevault: skipping damaged checkpoint {path}: {exc}", stacklevel=3
                )
                continue
            source_run = read_run(source)
            self._session["forked_from"] = {
                "path": source,
                "run_id": source_run["run_id"] if source_run else None,
                "step": candidate,
            }
            write_run(self.directory, self._run)
            return Restored(candidate, path, state)
        return None

    # ---- save ------------------------------------------------------------------------------

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived *and* the save it asked for is durable: the
        loop may exit. (A signal landing after ``should_save`` returned False is honoured at
        the next step: ``should_save`` is True there, and ``preempted`` only after that save.)"""
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

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Any = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as the checkpoint of ``step`` if due (or ``force``); True if saved.

        Retention runs only after the new checkpoint is committed.
        """
        self._check_open()
        if not force and not self.should_save(step):
            return False
        self._collect(block=True)  # one save in flight; raises a previous background failure
        path = self.path(step)
        self._make_room(step, force)
        extra = {
            "run_id": self.run_id,
            "step": step,
            "metrics": encode_metrics(metrics),
        }
        future = self._saver.save(state, path, metadata=metadata, overwrite=force, extra_info=extra)
        self._pending = (step, future)
        self._last_save_time = time.monotonic()
        if self._preemption.requested:
            self._preemption_saved = True
            self._collect(block=True)  # a preemption save is durable before save() returns
        else:
            self._collect(block=False)
        return True

    def _collect(self, block: bool) -> None:
        """Account for a finished save: index it, then apply retention (after the commit)."""
        if self._pending is None or (not block and not self._pending[1].done()):
            return
        step, _ = self._pending
        self._pending = None
        self._saver.wait()  # the saver's one in-flight save is this one; raises its failure
        self._scan.records[step] = read_record(self.path(step), step)
        self._apply_retention()

    def _make_room(self, step: int, force: bool) -> None:
        """A corrupt or incomplete directory in the way is moved aside (never deleted)."""
        record = self._scan.records.get(step)
        if record is None or record.status == "committed":
            return
        aside = f"{record.path}.corrupt-{uuid.uuid4().hex[:8]}"
        os.rename(record.path, aside)
        fsync_dir(self.directory)
        warnings.warn(f"statevault: moved damaged {record.path} aside to {aside}", stacklevel=3)
        del self._scan.records[step]

    def _protected(self) -> dict[int, str]:
        protected: dict[int, str] = {}
        latest = self.latest_step()
        if latest is not None:
            protected[latest] = "newest"
        if self._resumed_step is not None and self._resumed_step == latest:
            protected[self._resumed_step] = "resumed from (until a newer one is committed)"
        return protected

    def _own_records(self) -> list[CheckpointRecord]:
        """Checkpoints this run wrote; another run's copied here are never ours to delete."""
        return [r for r in self._scan.records.values() if r.run_id == self.run_id]

    def _apply_retention(self) -> None:
        _, deletable = decide(self._own_records(), self.retention, self._protected())
        for step in deletable:
            record = self._scan.records[step]
            logger.info("statevault: retention deletes %s", record.path)
            commit.delete_committed(record.path)
            del self._scan.records[step]

    def annotate(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Attach metrics (e.g. evaluation results) to a committed checkpoint; they count for
        best-K retention. Stored beside the manifest, which stays untouched."""
        self._check_open()
        record = self._committed_record(step)
        merged = {**read_annotations(record.path), **plain_metrics(metrics)}
        target = os.path.join(record.path, ANNOTATIONS_FILE)
        tmp = f"{target}{commit.TMP_MARKER}{uuid.uuid4().hex[:8]}"
        with LocalStorage().open_write(tmp) as handle:
            handle.write(memoryview(annotations_bytes(merged)))
        os.replace(tmp, target)
        fsync_dir(record.path)
        record.metrics.update(plain_metrics(metrics))
        self._apply_retention()

    # ---- lifecycle -------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the save in flight is durable; raises its error if it failed."""
        self._check_open()
        self._collect(block=True)

    def prepare(self, state: Mapping[str, Any]) -> None:
        """Make async staging memory ready for ``state`` in the background (restore does it)."""
        self._saver.prepare(state)

    def close(self) -> None:
        """Wait for the save in flight, then release the run. Raises a background failure."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._collect(block=True)
        finally:
            self._saver.close()
            self._preemption.uninstall()
            self._lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the manager of {self.directory} is closed")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
