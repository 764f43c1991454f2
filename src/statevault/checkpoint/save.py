"""Save: one :class:`Saver` over a process group; a single process is a group of one.

    agree (agree.py) -> stage (stage.py) -> write this rank's shards (job.py)
    -> rank 0: collect every rank's part, merge, manifest last, commit (parts.py, commit.py)
    -> settle: every rank learns the outcome (one collective; nothing to say for a group of one)

Every rank calls the same API with the same tree. Replicated tensors are dealt out over the
ranks (engine/assignment.py), each rank writes its DTensor chunks and its per-rank values and
reports its files in a part object; rank 0 reads the parts from the storage (no collective: it
can run in the background thread of an asynchronous save), checks the chunk geometry, writes the
manifest and commits. If any rank fails or dies nothing is committed, and the failure is raised
on every surviving rank when the save is settled, within ``timeout_s``. Rules:

- one save in flight: ``save`` first settles the previous one;
- synchronous saves view host memory in place; asynchronous ones copy into the staging arena and
  write on a daemon thread (engine/background.py), which the exit hook of a manager waits for
  and may abandon (:meth:`Saver.abandon`: the writers stop at their next chunk and the save
  cleans up after itself, as a failed save does);
- a background failure is raised by the next ``save``, ``wait`` or ``close``, never lost.

Example::

    saver = Saver(asynchronous=True)
    saver.save(state, "runs/exp1/step_000000100")  # returns once staged
    saver.wait()                                    # durable (and settled with every rank)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from statevault.checkpoint.agree import check_agreement, propose
from statevault.checkpoint.commit import committer_for
from statevault.checkpoint.job import SaveJob
from statevault.checkpoint.merged import merged_manifest, rank_part
from statevault.checkpoint.open import PathLike, open_checkpoint
from statevault.checkpoint.parts import (
    Part,
    collect_parts,
    remove_parts,
    write_part,
)
from statevault.checkpoint.rank_files import RankFiles
from statevault.checkpoint.stage import default_staging_budget, prepare_staging, stage_job
from statevault.distributed.coordinator import DEFAULT_TIMEOUT_S, Group, SoloGroup, TorchGroup
from statevault.distributed.group import rank_and_world
from statevault.engine.arena import StagingArena
from statevault.engine.background import BackgroundWorker
from statevault.errors import DistributedSaveError
from statevault.format.manifest import Manifest
from statevault.storage.location import Location, resolve

logger = logging.getLogger("statevault")
_TIMEOUT_ENV = "STATEVAULT_COLLECTIVE_TIMEOUT_S"


def save(
    state: Any,
    path: PathLike,
    *,
    metadata: Any = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    collective: bool = True,
) -> Manifest:
    """Save ``state`` as a committed checkpoint at ``path`` (a path or any fsspec URL).

    Returns its manifest. ``storage_options`` go to fsspec (endpoint, credentials). Inside a
    ``torch.distributed`` job every rank calls ``save`` and each writes its share
    (docs/distributed.md); ``collective=False`` saves from this process alone (say, only on
    rank 0, with full tensors), no other rank taking part. Example::

        sv.save({"epoch": 10, "model": model, "optimizer": opt, "loss": 0.02}, "ckpt/epoch10")
    """
    target = resolve(path, storage_options)
    return save_checkpoint(
        state, target, metadata=metadata, overwrite=overwrite, collective=collective
    )


def save_checkpoint(
    state: Any,
    directory: str | Location,
    *,
    metadata: Any = None,
    overwrite: bool = False,
    extra_info: Mapping[str, Any] | None = None,
    collective: bool = True,
) -> Manifest:
    """:func:`save` for callers that add manifest info (the manager: run id, step, metrics)."""
    saver = Saver(asynchronous=False, group=None if collective else SoloGroup())
    future = saver.save(
        state, directory, metadata=metadata, overwrite=overwrite, extra_info=extra_info
    )
    return future.result()


def default_timeout_s() -> float:
    """How long ranks wait for each other: ``$STATEVAULT_COLLECTIVE_TIMEOUT_S`` or 600 s."""
    return float(os.environ.get(_TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


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


@dataclass
class _Pending:
    future: Future[Manifest | None]
    url: str
    job: SaveJob | None = None  # rank 0's: cleaned up at settle if nothing was committed
    target: Location | None = None
    own: SaveJob | None = None  # this rank's: the baseline of the next incremental save


class Saver:
    """Runs saves, synchronously or in the background, one at a time, over ``group`` (default:
    every rank of the initialized default process group; one process alone outside a job).

    ``read_back_manifest``: whether ranks other than 0 read the committed manifest back to
    return it (``sv.save`` does; the manager, which needs no manifest there, does not).
    ``incremental``: record content hashes, and share with the checkpoint given as ``reuse``
    what a save would write again byte for byte (checkpoint/reuse.py)."""

    def __init__(
        self,
        *,
        asynchronous: bool,
        staging_budget_bytes: int | None = None,
        timeout_s: float | None = None,
        group: Group | None = None,
        read_back_manifest: bool = True,
        incremental: bool = False,
    ) -> None:
        self.asynchronous = asynchronous
        self.incremental = incremental
        self.budget = staging_budget_bytes or default_staging_budget()
        self.rank_files = RankFiles(self.budget // 2 if asynchronous else None, incremental)
        self.arena = StagingArena(self.budget)
        self.timeout_s = timeout_s if timeout_s is not None else default_timeout_s()
        self.read_back_manifest = read_back_manifest
        self._group = group
        self._pool: BackgroundWorker | None = None
        self._pending: _Pending | None = None
        self._in_flight_job: SaveJob | None = None

    @property
    def group(self) -> Group:
        if self._group is None:
            self._group = TorchGroup(self.timeout_s) if rank_and_world()[1] > 1 else SoloGroup()
        return self._group

    def prepare(self, state: Any, reserve_optimizer_moments: bool = False) -> None:
        """Get staging memory ready for ``state`` in the background, off the training path.

        ``reserve_optimizer_moments``: also make room for the moments an optimizer in ``state``
        has not grown yet (stage.unborn_moment_bytes)."""
        if self.asynchronous:
            prepare_staging(state, self.arena, self.budget, reserve_optimizer_moments)

    def save(
        self,
        state: Any,
        directory: str | Location,
        *,
        metadata: Any = None,
        overwrite: bool = False,
        extra_info: Mapping[str, Any] | None = None,
        reuse: Location | None = None,
    ) -> SaveFuture:
        """Save ``state`` to ``directory``; returns once it is staged (asynchronous) or committed.
        ``reuse``: the run's newest committed checkpoint, for an incremental save."""
        self.wait()
        started = time.perf_counter()
        group = self.group
        target = resolve(directory)
        committer = committer_for(target)
        plan, proposal, own_error = propose(state, metadata, target, committer, overwrite, group)
        replies = group.all_gather(proposal)
        written = check_agreement(replies, target, committer, own_error, group)
        assert plan is not None  # planning errors were raised by the agreement
        baseline = self.rank_files.baseline_for(reuse, group.rank)
        layout = self.rank_files.layout(plan, proposal.digest, group, baseline)
        job = SaveJob(
            plan,
            target,
            overwrite,
            {**(extra_info or {}), "world_size": group.size},
            committer,
            written,
            layout.files,
            self.asynchronous,
            {"prepare_s": time.perf_counter() - started},
            rank=group.rank,
            baseline=baseline,
            candidates=layout.candidates,
            hashed=layout.hashed,
        )
        self._in_flight_job = job
        future: Future[Manifest | None] = Future()
        try:
            last_piece, staged = stage_job(job, self.arena, self.budget)
            job.timings["blocked_s"] = time.perf_counter() - started
        except BaseException as exc:
            self._report_failure(job, exc)
            future.set_exception(exc)
        else:
            if self.asynchronous:
                future = self._executor().submit(self._share, job, last_piece, staged, started)
            else:
                _run_into(future, lambda: self._share(job, last_piece, staged, started))
        self._pending = _Pending(
            future, target.url, job if group.rank == 0 else None, target, own=job
        )
        if self.asynchronous:
            return SaveFuture(target.url, future, job.timings)  # type: ignore[arg-type]
        result: Future[Manifest] = Future()
        result.set_result(self._settle())  # type: ignore[arg-type]  # None: see read_back
        return SaveFuture(target.url, result, job.timings)

    def _share(
        self, job: SaveJob, files: list[int], staged: dict[int, memoryview], started: float
    ) -> Manifest | None:
        """Write this rank's shards and report them; rank 0 then commits the whole."""
        try:
            write_started = time.perf_counter()
            job.write(files, staged)
            job.timings["write_s"] = time.perf_counter() - write_started
            part = rank_part(job, self.group.size)
        except BaseException as exc:
            self._report_failure(job, exc)
            raise
        if job.rank != 0:
            write_part(job, part)
            return None
        try:
            manifest = self._commit(job, part, started)
        except BaseException as exc:
            if self.group.size == 1:
                job.abandon_written()
            # else: other ranks may still be writing; the temporary goes at settle
            logger.error("statevault: save of %s failed: %r", job.target.url, exc)
            raise
        job.timings["durable_s"] = time.perf_counter() - started
        _log_saved(job, manifest)
        return manifest

    def _commit(self, job: SaveJob, own: Part, started: float) -> Manifest:
        """Rank 0: every rank's part, merged into one manifest, written last."""
        parts = [own, *collect_parts(job, self.group.size, self.timeout_s)]
        manifest = merged_manifest(job, parts, started, self.incremental)
        remove_parts(job, self.group.size)
        return job.commit(manifest)

    def _report_failure(self, job: SaveJob, exc: BaseException) -> None:
        """Tell rank 0 at once (so it does not wait out the timeout); rank 0 cleans up."""
        if job.rank == 0:
            if self.group.size == 1:
                job.abandon_written()
            return  # other ranks may still be writing: the temporary goes at settle
        try:
            write_part(job, Part(job.rank, error=f"{type(exc).__name__}: {exc}"))
        except Exception as report_error:  # the save fails anyway; say why rank 0 may wait
            logger.error(
                "statevault: rank %d could not report its failure: %r", job.rank, report_error
            )

    # ---- the save in flight ------------------------------------------------------------------

    def idle(self) -> bool:
        """True when this rank's share of the save in flight is written (or failed); settling
        it with the other ranks is still to come (``wait``)."""
        return self._pending is None or self._pending.future.done()

    def abandon(self, reason: str) -> None:
        """Make the save in flight stop before its commit (see the module docstring); its
        failure, SaveAbandoned, is raised when it is settled."""
        if self._in_flight_job is not None:
            self._in_flight_job.cancel.set(reason)

    def wait(self) -> Manifest | None:
        """Settle the save in flight: wait for this rank's share, then learn every rank's
        outcome (a collective call: every rank calls it at the same point). Raises its failure;
        an interrupt (Ctrl-C) meanwhile leaves it in flight."""
        pending = self._take_pending()
        if pending is None:
            return None
        try:
            manifest = self._settle_outcomes(pending)
        finally:
            self._clean_up(pending)
        if self.incremental and pending.own is not None:  # committed: the next save's baseline
            self.rank_files.baseline = pending.own.next_baseline()
        return manifest

    _settle = wait

    def settle_alone(self) -> Manifest | None:
        """This rank's share of the save in flight, without the collective that tells every
        rank the outcome: at interpreter exit the ranks may be out of step. Rank 0 commits on
        its own once every rank reported its share (or fails after ``timeout_s``)."""
        pending = self._take_pending()
        if pending is None:
            return None
        try:
            return pending.future.result()
        finally:
            self._clean_up(pending)

    def _take_pending(self) -> _Pending | None:
        """The save in flight, once this rank's share of it has ended; a Ctrl-C meanwhile
        leaves it in flight (the exit hook waits for it again)."""
        pending = self._pending
        if pending is None:
            return None
        with contextlib.suppress(Exception):  # its failure is settled by the caller
            pending.future.exception()
        self._pending, self._in_flight_job = None, None
        return pending

    def _clean_up(self, pending: _Pending) -> None:
        if pending.job is not None and self.group.size > 1 and not _committed(pending):
            _abandon_when_quiet(pending.job)

    def _settle_outcomes(self, pending: _Pending) -> Manifest | None:
        manifest: Manifest | None = None
        error: BaseException | None = None
        try:
            manifest = pending.future.result()
        except BaseException as exc:
            error = exc
        if self.group.size == 1:  # nothing to agree on: the failure as it happened
            if error is not None:
                raise error
            return manifest
        # Each rank names the ranks its failure came from: itself, or the ones it waited for.
        # O(1) bytes per rank: the manifest itself never travels (it can be 100s of MiB).
        culprits = error.ranks if isinstance(error, DistributedSaveError) and error.ranks else []
        reply = (None if error is None else f"{type(error).__name__}: {error}", culprits)
        try:
            replies = self.group.all_gather(reply)
        except DistributedSaveError as exc:
            if manifest is not None:
                raise DistributedSaveError(f"{pending.url} was committed, but {exc}") from None
            raise DistributedSaveError(f"save of {pending.url} was not committed: {exc}") from error
        failures = [(rank, r[0], r[1]) for rank, r in enumerate(replies) if r[0] is not None]
        if failures:
            detail = "; ".join(f"rank {rank}: {text}" for rank, text, _ in failures[:4])
            ranks = sorted({c for rank, _, named in failures for c in (named or [rank])})
            raise DistributedSaveError(
                f"save of {pending.url} was not committed: {detail}", ranks
            ) from error
        indexed = manifest is None or manifest.indexes is not None
        if not (indexed and self.read_back_manifest):
            return manifest
        # Format 3: as readers see it, with this rank's own rows (its index); not every
        # rank's, which at scale would be every rank reading every index.
        where = pending.target or pending.url
        with open_checkpoint(where, ranks=[self.group.rank]) as committed:
            return committed.manifest

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self.arena.release()

    def _executor(self) -> BackgroundWorker:
        if self._pool is None:
            self._pool = BackgroundWorker("statevault-persist")
        return self._pool


def _log_saved(job: SaveJob, manifest: Manifest) -> None:
    info = manifest.info.get("save", {})
    logger.info(
        "statevault: saved %s: %.3f GiB, training blocked %.3f s, durable after %.3f s",
        job.target.url,
        info.get("bytes", 0) / 2**30,
        job.timings.get("blocked_s", 0.0),
        job.timings["durable_s"],
    )


def _run_into(future: Future[Manifest | None], call: Any) -> None:
    try:
        future.set_result(call())
    except BaseException as exc:
        future.set_exception(exc)


def _committed(pending: _Pending) -> bool:
    future = pending.future
    return future.done() and future.exception() is None and future.result() is not None


def _abandon_when_quiet(job: SaveJob) -> None:
    """Remove an uncommitted save's temporary. Every live rank has finished writing by the time
    it settles, but a rank that settles early (a dead peer, an exit) may race with a late
    writer: retry, and on an object store keep the marker, so that what a late writer adds
    stays statevault's to sweep."""
    for attempt in range(5):
        try:
            job.committer.abandon(job.written, keep_marker=True)
            return
        except OSError as exc:
            if attempt == 4:
                logger.error("statevault: could not remove %s: %r", job.written.url, exc)
            time.sleep(0.2 * (attempt + 1))
