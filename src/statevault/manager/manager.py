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
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from statevault.checkpoint.save import SaveFuture, Saver
from statevault.errors import CheckpointError
from statevault.manager import closing
from statevault.manager import options as check
from statevault.manager.config import (
    DEFAULT_MAX_TO_KEEP,
    Replica,
    RunOptions,
    as_replica,
    retention_policies,
)
from statevault.manager.index import (
    CheckpointRecord,
    RunScan,
    annotations_bytes,
    encode_metrics,
    plain_metrics,
    read_annotations,
    read_record,
)
from statevault.manager.lifecycle import RunLifecycle
from statevault.manager.naming import ANNOTATIONS_FILE
from statevault.manager.preemption import PreemptionWatcher
from statevault.manager.queries import RunQueries
from statevault.manager.replication import Replicator
from statevault.manager.restoring import RunRestore
from statevault.manager.retention import (
    RetentionPolicy,
    decide,
)
from statevault.manager.role import Role
from statevault.manager.run import new_run, new_session, read_run, write_run
from statevault.manager.rundir import RunDir
from statevault.storage.location import Location

logger = logging.getLogger("statevault")


class CheckpointManager(RunQueries, RunRestore, RunLifecycle):
    """Manages the checkpoints of one run directory (see the module docstring).

    ``directory``: a local path (the fast path) or any fsspec URL (``s3://bucket/run``,
    ``memory://...``); ``storage_options`` reach fsspec (endpoint, credentials). Retention:
    the shortcuts ``max_to_keep`` (default 3; None keeps all), ``keep_every_n_steps`` and
    ``best_metric`` with ``best_mode`` (the best one; ``sv.KeepBest`` keeps more), or a list
    of policies as
    ``retention=``, not both. ``replicate_to``: a second, durable tier (an ``sv.Replica``, or
    its URL; ``directory`` must then be local): copies in the background, its own retention;
    ``restore`` picks the newest valid checkpoint of either tier. ``options``: an
    ``sv.RunOptions`` (run name and metadata, staging budget, lease and sweep timings).
    ``incremental`` (default True): a save writes only the files whose tensors changed since
    the newest checkpoint and shares the others with it (hard links on a local disk,
    server-side copies on an object store); every checkpoint stays whole (README
    "Incremental checkpoints").
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = DEFAULT_MAX_TO_KEEP,
        keep_every_n_steps: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        retention: Sequence[RetentionPolicy] | None = None,
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        save_on_preemption: bool = True,
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        replicate_to: Replica | str | os.PathLike[str] | None = None,
        options: RunOptions | None = None,
        incremental: bool = True,
    ) -> None:
        self.save_interval_steps = check.count_or_none(
            "save_interval_steps", save_interval_steps, "save at every step"
        )
        self.save_interval_seconds = check.seconds_or_none(
            "save_interval_seconds", save_interval_seconds
        )
        self.retention = retention_policies(
            max_to_keep, keep_every_n_steps, best_metric, best_mode, 1, retention
        )
        if not isinstance(incremental, bool):
            raise TypeError(f"incremental must be True or False, got {incremental!r}")
        run_options = options if options is not None else RunOptions()
        if not isinstance(run_options, RunOptions):
            raise TypeError(f"options takes an sv.RunOptions, got {type(options).__name__}")
        replica = as_replica(replicate_to)
        stale = run_options.stale_after_seconds
        self._dir = RunDir(directory, storage_options, stale)
        self.directory = self._dir.url
        closing.close_dropped(self.directory)  # a manager of this run let go of, not closed
        self._replica: RunDir | None = None
        if replica is not None:
            if not self._dir.local:
                raise ValueError("replicate_to needs a local directory as the fast tier")
            replica_options = replica.storage_options or storage_options
            self._replica = RunDir(replica.url, replica_options, stale)
        self.replicate_every = replica.every if replica is not None else 1
        self._closed = False
        self._replicator: Replicator | None = None
        # Followers need no manifest back: the leader alone indexes the run.
        self._saver = Saver(
            asynchronous=async_save,
            staging_budget_bytes=run_options.staging_budget_bytes,
            read_back_manifest=False,
            incremental=incremental,
        )
        self._role = Role(self._saver)
        error: BaseException | None = None
        if self._role.leader:
            try:
                policies = replica.policies() if replica is not None else []
                self._open_as_leader(run_options, policies)
            except BaseException as exc:
                self._closed = True
                error = exc
        try:
            self._role.raise_leader_error(error)
        except BaseException:
            self._closed = True
            self._saver.close()
            raise
        if not self._role.leader:  # followers read what the leader set up
            self._run = {"run_id": self._role.share(None)}
            self._session: dict[str, Any] = {}
            self._scan = self._dir.scan()
        else:
            self._role.share(self.run_id)
        self._pending: tuple[int, SaveFuture] | None = None
        self._saves_collected = 0
        self._resumed_step: int | None = None
        self._last_save_time = time.monotonic()
        self._preemption = PreemptionWatcher()
        self._preemption_saved = False
        if save_on_preemption:
            self._preemption.install()
        closing.track(self)

    # ---- run bookkeeping -------------------------------------------------------------------

    def _open_as_leader(
        self, run_options: RunOptions, replica_policies: list[RetentionPolicy]
    ) -> None:
        self._dir.create()
        try:
            self._acquire_locks(run_options.lease_seconds)
            self._run = self._open_run(run_options.name, run_options.metadata)
            self._dir.sweep()
            self._scan: RunScan = self._dir.scan()
            if self._replica is not None:
                self._replica.sweep()
                self._replicator = Replicator(self._replica.location, replica_policies, self.run_id)
        except BaseException:
            self._release_locks()
            raise

    def _acquire_locks(self, lease_seconds: float) -> None:
        self._dir.acquire(lease_seconds)
        if self._replica is not None:
            self._replica.create()
            self._replica.acquire(lease_seconds)

    def _release_locks(self) -> None:
        try:
            if self._replica is not None:
                self._replica.release()
        finally:
            self._dir.release()

    def _open_run(self, name: str | None, run_metadata: Any) -> dict[str, Any]:
        """run.json of the run: this tier's, else the replica's (a new node whose local tier
        is empty continues the same run), else a new one."""
        run = read_run(self._dir.location)
        if run is None and self._replica is not None:
            run = read_run(self._replica.location)
        if run is None:
            run = new_run(self._dir.location, name, run_metadata)
        self._session = new_session()
        run["sessions"].append(self._session)
        self._run = run
        self._write_run()
        return run

    def _write_run(self) -> None:
        write_run(self._dir.location, self._run)
        if self._replica is not None:
            write_run(self._replica.location, self._run)

    # ---- save ------------------------------------------------------------------------------

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

        Retention runs only after the new checkpoint is committed. Raises the failure of an
        earlier background save or replication.
        """
        self._check_open()
        step = check.as_step(step)
        # One agreement, used for both decisions: a signal landing after it on one rank must
        # not make that rank alone block in a preemption save (the collectives would pair up
        # wrongly); it is honoured at the next step.
        due, preempting = self._agree(step)
        if not force and not due:
            return False
        self._collect(block=True)  # one save in flight; raises a previous background failure
        if self._replicator is not None:
            self._replicator.raise_failures()
        overwrite = force  # followers: the leader alone checks the target (it commits)
        if self._role.leader:
            self._dir.check_lock()
            overwrite = self._make_room(step, force)
        extra = {
            "run_id": self.run_id,
            "step": step,
            "metrics": encode_metrics(metrics),
        }
        future = self._saver.save(
            state,
            self._dir.target(step),
            metadata=metadata,
            overwrite=overwrite,
            extra_info=extra,
            reuse=self._newest_committed(),
        )
        self._pending = (step, future)
        self._last_save_time = time.monotonic()
        if preempting:
            self._collect(block=True)  # a preemption save is durable before save() returns
            if self._replicator is not None:
                self._replicator.wait()  # ... on the replica too: the node may not come back
            self._preemption_saved = True
        else:
            self._collect(block=False)
        return True

    def _newest_committed(self) -> Location | None:
        """The checkpoint an incremental save shares unchanged files with."""
        committed = self._scan.committed()
        return self._dir.checkpoint(committed[-1].step) if committed else None

    def _collect(self, block: bool) -> None:
        """Account for a finished save: index it, replicate it if due, then apply retention
        (after the commit)."""
        if self._pending is None or (not block and not self._pending[1].done()):
            return
        if not block and self._pending[1].failed():
            return  # a background failure is raised by the next save, wait or close
        if not block and self._role.distributed and self._saver.asynchronous:
            return  # settling is collective: only where every rank blocks (save, wait, close)
        step, _ = self._pending
        try:
            self._saver.wait()  # the saver's one in-flight save is this one; raises its failure
        except KeyboardInterrupt:
            raise  # still pending: waited for again by close() or the exit hook
        except BaseException:
            self._pending = None
            raise
        self._pending = None
        if not self._role.leader:  # committed (the save settled); details are the leader's
            self._scan.records[step] = CheckpointRecord(step, self.path(step), "committed")
            return  # retention and replication are the leader's
        self._scan.records[step] = read_record(self._dir.checkpoint(step), step)
        self._saves_collected += 1
        if self._replicator is not None and self._scan.records[step].status == "committed":
            due = self._saves_collected % self.replicate_every == 0
            if due or self._preemption.requested:
                self._replicator.submit(step, self.path(step))
        self._apply_retention()

    def _make_room(self, step: int, force: bool) -> bool:
        """A corrupt or incomplete directory of statevault's in the way is moved aside (never
        deleted) on a local disk; on an object store the save replaces it. Another tool's
        directory is left as it is: the save refuses to write over it. Returns the overwrite
        flag."""
        record = self._scan.records.get(step)
        if record is None or record.status not in ("corrupt", "incomplete"):
            return force
        if self._dir.move_aside(record.path) is None:
            del self._scan.records[step]
            return force or record.status == "corrupt"
        del self._scan.records[step]
        return force

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due: an interval is reached, or a preemption signal arrived. In a
        distributed job every rank gets the same answer (role.py): one small collective."""
        return self._agree(check.as_step(step))[0]

    def _agree(self, step: int) -> tuple[bool, bool]:
        """(due, a preemption save) for ``step``, the same on every rank."""
        wanted = super().should_save(step)
        pending_preemption = self._preemption.requested and not self._preemption_saved
        due, preempting = self._role.agree_to_save(wanted, pending_preemption)
        if preempting and not self._preemption.requested:
            self._preemption.request()  # another rank was signalled: save together, then stop
        return due, preempting

    def _apply_retention(self) -> None:
        if not self._role.leader:
            return
        _, deletable = decide(self._own_records(), self.retention, self._protected())
        for step in deletable:
            record = self._scan.records[step]
            logger.info("statevault: retention deletes %s", record.path)
            self._dir.delete(record.path)
            del self._scan.records[step]

    def annotate(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Attach metrics (e.g. evaluation results) to a committed checkpoint; they count for
        best-K retention. Stored beside the manifest, which stays untouched."""
        self._check_open()
        step = check.as_step(step)
        if not self._role.leader:
            return  # the leader writes the run's side files
        record = self._committed_record(step)
        where = self._dir.checkpoint(step)
        merged = {**read_annotations(where), **plain_metrics(metrics)}
        self._dir.write_side_file(record.path, ANNOTATIONS_FILE, annotations_bytes(merged))
        record.metrics.update(plain_metrics(metrics))
        self._apply_retention()

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
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self._close_at_exit()  # Ctrl-C: say what is awaited; another Ctrl-C abandons it
        else:
            self.close()

    def __del__(self) -> None:
        # Never I/O in a finalizer (at interpreter teardown the storage clients are gone): the
        # exit hook, or the next manager of this run, closes it (closing.py).
        if not getattr(self, "_closed", True):
            closing.adopt(self)
