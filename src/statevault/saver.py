"""The save pipeline, one code path for synchronous and asynchronous saves.

    prepare (plan the tree) -> stage (host copies) -> write shards -> manifest -> commit

A synchronous save stages by viewing host memory in place (the caller is blocked anyway) and
runs every step before returning. An asynchronous save copies the state into a reusable staging
arena and returns; a background thread writes, checksums and commits. Rules:

- one save in flight: ``save`` first waits until the previous save is durable;
- a background failure is raised by the next ``save``, ``wait`` or ``close``, never lost; it is
  also logged when it happens;
- the staging budget bounds host memory: a state larger than the budget is staged in pieces of
  whole files, and every piece but the last is written before ``save`` returns, so training
  waits for (state - budget) bytes of writing: the documented cost of a small budget;
- the background phase runs on a daemon thread (engine/background.py); interpreter exit waits
  for it through the manager's exit hook (manager/closing.py), which may also abandon it
  (:meth:`Saver.abandon`): the writer stops at its next chunk and the save cleans up after
  itself, as a failed save does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from statevault.adapters import adapter_for
from statevault.commit import LocalCommit, ObjectCommit, committer_for
from statevault.engine.arena import StagingArena
from statevault.engine.background import BackgroundWorker
from statevault.engine.cancel import Cancel, shielded
from statevault.engine.layout import assign_files
from statevault.engine.plan import SavePlan, plan_save
from statevault.engine.staging import by_adapter, stage, stage_into
from statevault.engine.writer import PendingTensor, write_files
from statevault.errors import CheckpointError
from statevault.format import dtypes
from statevault.format import manifest as manifest_module
from statevault.format.manifest import FileEntry, Manifest, TensorEntry, serialize_manifest
from statevault.format.names import MANIFEST_NAME, shard_name
from statevault.runinfo import checkpoint_info
from statevault.storage.location import Location, resolve

logger = logging.getLogger("statevault")


def default_staging_budget() -> int:
    """Half of the machine's physical memory."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass
class _Job:
    """One save between its stage and its commit."""

    plan: SavePlan
    target: Location
    overwrite: bool
    extra_info: Mapping[str, Any] | None
    committer: LocalCommit | ObjectCommit
    written: Location  # where the shards go: a temporary directory, or the target itself
    files: list[list[int]]  # leaf indices per shard file
    asynchronous: bool
    timings: dict[str, float] = field(default_factory=dict)
    file_rows: list[FileEntry] = field(default_factory=list)
    tensor_rows: dict[int, TensorEntry] = field(default_factory=dict)
    rank: int = 0  # the process writing these shards (their names carry it)
    cancel: Cancel = field(default_factory=Cancel)

    def abandon_written(self) -> None:
        """Remove what this save wrote (its temporary, or its tagged objects), to the end even
        through a Ctrl-C."""
        shielded(lambda: self.committer.abandon(self.written))

    def write(self, file_indices: Sequence[int], staged: Mapping[int, memoryview]) -> None:
        """Write the shard files ``file_indices`` from staged leaf bytes."""
        plan = self.plan
        batch = [
            (
                shard_name(i, self.rank, tag=self.committer.shard_tag()),
                [
                    PendingTensor(
                        plan.leaves[j].path,
                        plan.leaves[j].adapter.framework,
                        plan.leaves[j].spec.dtype,
                        plan.leaves[j].spec.shape,
                        staged[j],
                        plan.leaves[j].spec.attrs,
                    )
                    for j in self.files[i]
                ],
            )
            for i in file_indices
        ]
        shard_format = "pt" if "torch" in plan.frameworks() else "np"
        rows, tensors = write_files(
            self.written.storage,
            self.written.path,
            batch,
            {"format": shard_format, "writer": "statevault"},
            self.cancel,
        )
        self.file_rows += rows
        for i, written in zip(file_indices, tensors, strict=True):
            for leaf, row in zip(self.files[i], written, strict=True):
                self.tensor_rows[leaf] = row

    def finish(self, started: float) -> Manifest:
        """Write the manifest last, then publish (rename, or nothing more on object stores)."""
        order = sorted(self.file_rows, key=lambda f: f.name)
        tensors = [self.tensor_rows[i] for i in range(len(self.plan.leaves))]
        manifest = Manifest(order, tensors, self.plan.tree, self.plan.metadata)
        mode = "async" if self.asynchronous else "sync"
        manifest.info = checkpoint_info(self.plan, self.timings, self.extra_info, started, mode)
        return self.commit(manifest)

    def commit(self, manifest: Manifest) -> Manifest:
        """Write the manifest, then publish it (the rename, or nothing more on object stores)."""
        data = serialize_manifest(manifest)
        if len(data) > manifest_module.MAX_MANIFEST_BYTES:  # no reader would accept it
            raise CheckpointError(
                f"{self.target.url}: the manifest would be {len(data) / 2**20:.0f} MiB, over the "
                f"{manifest_module.MAX_MANIFEST_BYTES / 2**20:.0f} MiB readers accept (too many "
                "tensors times ranks); save fewer, larger tensors or from fewer ranks"
            )
        self.cancel.check()  # the last moment a save can be abandoned: the manifest commits it
        self.committer.before_manifest(self.target, self.overwrite)
        manifest_path = self.written.join(MANIFEST_NAME).path
        with self.written.storage.open_write(manifest_path) as handle:
            handle.write(memoryview(data))
        started = time.perf_counter()
        self.committer.publish(self.written, self.target, self.overwrite)
        self.timings["commit_s"] = time.perf_counter() - started
        return manifest


class SaveFuture:
    """A save in progress; ``result()`` blocks until it is durable and returns its manifest."""

    def __init__(self, directory: str, future: Future[Manifest], timings: dict[str, float]):
        self.directory = directory
        self.timings = timings
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def failed(self) -> bool:
        """Done, with an error (which ``result()`` raises)."""
        return self._future.done() and self._future.exception() is not None

    def result(self, timeout: float | None = None) -> Manifest:
        return self._future.result(timeout)


class Saver:
    """Runs saves, synchronously or in the background, one at a time (see the module doc)."""

    def __init__(self, *, asynchronous: bool, staging_budget_bytes: int | None = None) -> None:
        self.asynchronous = asynchronous
        self.budget = staging_budget_bytes or default_staging_budget()
        self.arena = StagingArena(self.budget)
        self._pool: BackgroundWorker | None = None
        self._in_flight: SaveFuture | None = None
        self._in_flight_job: _Job | None = None
        self._delegate: Saver | None = None  # for sharded states (DTensors) in one process

    def prepare(self, state: Any, reserve_optimizer_moments: bool = False) -> None:
        """Get staging memory ready for ``state`` in the background, off the training path.

        ``reserve_optimizer_moments``: also make room for the moments an optimizer in ``state``
        has not grown yet (see :func:`unborn_moment_bytes`)."""
        if not self.asynchronous:
            return
        plan = plan_save(state)
        for adapter, indices in by_adapter(plan).items():
            adapter.prepare_staging([plan.leaves[i].value for i in indices], self.arena)
        wanted = plan.total_bytes
        if reserve_optimizer_moments and isinstance(state, Mapping):
            wanted += unborn_moment_bytes(state)
        self.arena.prewarm(min(wanted, self.budget) + 64 * len(plan.leaves))

    def save(
        self,
        state: Any,
        directory: str | Location,
        *,
        metadata: Any = None,
        overwrite: bool = False,
        extra_info: Mapping[str, Any] | None = None,
    ) -> SaveFuture:
        self.wait()
        started = time.perf_counter()
        target = resolve(directory)
        committer = committer_for(target)
        committer.check_target(target, overwrite)
        plan = plan_save(state, metadata)
        if any(leaf.shard is not None for leaf in plan.leaves):  # DTensors, in one process
            return self._sharded_saver().save(
                state, directory, metadata=metadata, overwrite=overwrite, extra_info=extra_info
            )
        timings = {"prepare_s": time.perf_counter() - started}
        sizes = [leaf.spec.nbytes for leaf in plan.leaves]
        files = _aligned(
            plan,
            assign_files(sizes, max_file_bytes=self.budget // 2 if self.asynchronous else None),
        )
        job = _Job(
            plan,
            target,
            overwrite,
            extra_info,
            committer,
            committer.begin(target),
            files,
            self.asynchronous,
            timings,
        )
        try:
            last_piece, staged = self._stage(job)
        except BaseException:
            job.abandon_written()
            raise
        timings["blocked_s"] = time.perf_counter() - started
        future: Future[Manifest]
        self._in_flight_job = job
        if self.asynchronous:
            future = self._executor().submit(self._persist, job, last_piece, staged, started)
        else:
            future = Future()
            future.set_result(self._persist(job, last_piece, staged, started))
        self._in_flight = SaveFuture(target.url, future, timings)
        return self._in_flight

    def _stage(self, job: _Job) -> tuple[list[int], dict[int, memoryview]]:
        """Stage the state; pieces beyond the budget are written first (async only)."""
        started = time.perf_counter()
        if not self.asynchronous:
            views = stage(job.plan)
            job.timings["stage_s"] = time.perf_counter() - started
            return list(range(len(job.files))), dict(enumerate(views))
        pieces = _pieces(job, self.budget)
        for piece in pieces[:-1]:
            self.arena.reset()
            job.write(piece, self._stage_files(job, piece))
        self.arena.reset()
        staged = self._stage_files(job, pieces[-1])
        job.timings["stage_s"] = time.perf_counter() - started
        return pieces[-1], staged

    def _stage_files(self, job: _Job, file_indices: Sequence[int]) -> dict[int, memoryview]:
        leaves = sorted(j for i in file_indices for j in job.files[i])
        return dict(zip(leaves, stage_into(job.plan, leaves, self.arena), strict=True))

    def _persist(
        self, job: _Job, files: list[int], staged: dict[int, memoryview], started: float
    ) -> Manifest:
        try:
            write_started = time.perf_counter()
            job.write(files, staged)
            job.timings["write_s"] = time.perf_counter() - write_started
            manifest = job.finish(started)
        except BaseException as exc:
            job.abandon_written()
            logger.error("statevault: save of %s failed: %r", job.target.url, exc)
            raise
        job.timings["durable_s"] = time.perf_counter() - started
        info = manifest.info.get("save", {})
        logger.info(
            "statevault: saved %s: %.3f GiB, training blocked %.3f s, durable after %.3f s",
            job.target.url,
            info.get("bytes", 0) / 2**30,
            job.timings.get("blocked_s", 0.0),
            job.timings["durable_s"],
        )
        return manifest

    def _sharded_saver(self) -> Saver:
        """The saver of sharded states (distributed/saver.py), here for a job of one process."""
        if self._delegate is None:
            from statevault.distributed.coordinator import SoloGroup
            from statevault.distributed.saver import DistributedSaver

            self._delegate = DistributedSaver(
                asynchronous=self.asynchronous, staging_budget_bytes=self.budget, group=SoloGroup()
            )
        return self._delegate

    def idle(self) -> bool:
        """True when no save is in flight here (the background phase has ended)."""
        delegate_idle = self._delegate is None or self._delegate.idle()
        return delegate_idle and (self._in_flight is None or self._in_flight.done())

    def abandon(self, reason: str) -> None:
        """Make the save in flight stop before its commit (see the module docstring); its
        failure, SaveAbandoned, is raised by the next ``wait``."""
        if self._delegate is not None:
            self._delegate.abandon(reason)
        if self._in_flight_job is not None:
            self._in_flight_job.cancel.set(reason)

    def settle_alone(self) -> Manifest | None:
        """:meth:`wait` without any collective (at exit); for one process, the same thing."""
        return self.wait()

    def wait(self) -> Manifest | None:
        """Block until the save in flight is durable; raise its error if it failed."""
        if self._delegate is not None:
            delegated = self._delegate.wait()
            if delegated is not None:
                return delegated
        future = self._in_flight
        if future is None:
            return None
        try:
            manifest = future.result()
        except KeyboardInterrupt:
            raise  # still in flight: the next wait (or the exit hook) waits for it again
        except BaseException:
            self._in_flight, self._in_flight_job = None, None
            raise
        self._in_flight, self._in_flight_job = None, None
        return manifest

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._delegate is not None:
                self._delegate.close()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self.arena.release()

    def _executor(self) -> BackgroundWorker:
        if self._pool is None:
            self._pool = BackgroundWorker("statevault-persist")
        return self._pool


def _aligned(plan: SavePlan, files: list[list[int]]) -> list[list[int]]:
    """Order each file's leaves by item size, largest first: every size is a multiple of its
    (power of two) item size, so each tensor starts aligned to it, and views need no copy."""
    itemsize = {i: dtypes.lookup(leaf.spec.dtype).itemsize for i, leaf in enumerate(plan.leaves)}
    return [sorted(members, key=lambda i: (-itemsize[i], i)) for members in files]


def _pieces(job: _Job, budget: int) -> list[list[int]]:
    """Consecutive groups of whole files, each within the budget (a lone big file excepted)."""
    pieces: list[list[int]] = [[]]
    used = 0
    for index, members in enumerate(job.files):
        size = sum(job.plan.leaves[j].spec.nbytes + 64 for j in members)
        if pieces[-1] and used + size > budget:
            pieces.append([])
            used = 0
        pieces[-1].append(index)
        used += size
    return pieces


def unborn_moment_bytes(state: Mapping[str, Any]) -> int:
    """What the state will grow by at its first save: an optimizer that has not stepped yet has
    no moments; count two per parameter (Adam's), which is what most optimizers grow to."""
    total = 0
    for value in state.values():
        groups = getattr(value, "param_groups", None)
        if isinstance(groups, list) and not getattr(value, "state", True):
            params = [p for group in groups for p in group.get("params", [])]
            total += 2 * sum(_array_bytes(p) for p in params)
    return total


def _array_bytes(value: Any) -> int:
    adapter = adapter_for(value)
    if adapter is None:
        return 0
    local_shard = getattr(adapter, "local_shard", None)
    sharded = local_shard(value, "") if local_shard is not None else None
    if sharded is not None:  # a DTensor: this rank stages only its piece
        value = sharded[0]
    return adapter.describe(value, "").nbytes
