"""DistributedSaver: every rank saves its share in parallel, rank 0 commits once all are durable.

    agree (collective) -> stage own share -> write own shards + part -> rank 0: collect parts,
    merge, manifest, commit -> settle (collective): every rank learns the outcome

Every rank calls the same API with the same tree. Replicated tensors are dealt out over the
ranks (engine/assignment.py), each rank writes its DTensor chunks and its per-rank values,
fsyncs its files and reports them in a part object. Rank 0 waits for every part (no collective:
it reads them from the storage, so it can do so in the background thread of an async save),
checks the chunk geometry, writes the manifest and commits with the usual protocol. If any rank
fails or dies nothing is committed; the failure is raised on every surviving rank when the save
is settled, within ``timeout_s``. One save in flight, as for :class:`~statevault.saver.Saver`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from statevault.commit import LocalCommit, ObjectCommit, committer_for
from statevault.distributed.coordinator import DEFAULT_TIMEOUT_S, Group, SoloGroup, TorchGroup
from statevault.distributed.group import rank_and_world
from statevault.distributed.parts import Part, merge, part_from_json, per_rank_locals
from statevault.engine.assignment import leaves_to_write
from statevault.engine.layout import assign_files
from statevault.engine.plan import SavePlan, plan_save
from statevault.errors import DistributedSaveError
from statevault.format.manifest import Manifest
from statevault.format.names import part_name, part_rank
from statevault.runinfo import checkpoint_info
from statevault.saver import SaveFuture, Saver, _aligned, _Job, logger
from statevault.storage.location import Location, resolve

_TIMEOUT_ENV = "STATEVAULT_COLLECTIVE_TIMEOUT_S"


def default_timeout_s() -> float:
    """How long ranks wait for each other: ``$STATEVAULT_COLLECTIVE_TIMEOUT_S`` or 600 s."""
    return float(os.environ.get(_TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


@dataclass
class _Proposal:
    """What each rank brings to the agreement; rank 0's also says where the save goes."""

    digest: str = ""
    keys: dict[str, str] = field(default_factory=dict)  # top-level key -> digest
    error: str | None = None
    written: str = ""
    tag: str = ""


@dataclass
class _Pending:
    future: Future[Manifest | None]
    url: str
    job: _Job | None = None  # rank 0's: cleaned up at settle if nothing was committed
    target: Location | None = None


class DistributedSaver(Saver):
    """A :class:`Saver` for the ranks of a job (see the module docstring). ``group`` defaults to
    every rank of the initialized default process group."""

    def __init__(
        self,
        *,
        asynchronous: bool,
        staging_budget_bytes: int | None = None,
        timeout_s: float | None = None,
        group: Group | None = None,
    ) -> None:
        super().__init__(asynchronous=asynchronous, staging_budget_bytes=staging_budget_bytes)
        self.timeout_s = timeout_s if timeout_s is not None else default_timeout_s()
        self._group = group
        self._pending: _Pending | None = None
        self._assignments: dict[tuple[str, int, int], list[int]] = {}
        # Whether ranks other than 0 read the committed manifest back to return it (sv.save
        # does; the manager, which needs no manifest there, does not).
        self.read_back_manifest = True

    @property
    def group(self) -> Group:
        if self._group is None:
            self._group = TorchGroup(self.timeout_s) if rank_and_world()[1] > 1 else SoloGroup()
        return self._group

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
        group = self.group
        target = resolve(directory)
        committer = committer_for(target)
        plan, proposal, own_error = self._propose(
            state, metadata, target, committer, overwrite, group
        )
        replies = group.all_gather(proposal)
        written = self._check_agreement(replies, target, committer, own_error, group)
        assert plan is not None  # planning errors were raised by the agreement
        info = {**(extra_info or {}), "world_size": group.size}
        job = _Job(
            plan,
            target,
            overwrite,
            info,
            committer,
            written,
            self._files(plan, proposal.digest, group),
            self.asynchronous,
            {"prepare_s": time.perf_counter() - started},
            rank=group.rank,
        )
        self._in_flight_job = job
        future: Future[Manifest | None] = Future()
        try:
            last_piece, staged = self._stage(job)
            job.timings["blocked_s"] = time.perf_counter() - started
        except BaseException as exc:
            self._report_failure(job, exc)
            future.set_exception(exc)
        else:
            if self.asynchronous:
                future = self._executor().submit(self._share, job, last_piece, staged, started)
            else:
                _run_into(future, lambda: self._share(job, last_piece, staged, started))
        self._pending = _Pending(future, target.url, job if group.rank == 0 else None, target)
        result: Future[Manifest] = Future()
        if not self.asynchronous:
            result.set_result(self._settle())  # type: ignore[arg-type]  # None: see read_back
        return SaveFuture(
            target.url, result if not self.asynchronous else _as_manifest(future), job.timings
        )

    def _propose(
        self,
        state: Any,
        metadata: Any,
        target: Location,
        committer: LocalCommit | ObjectCommit,
        overwrite: bool,
        group: Group,
    ) -> tuple[SavePlan | None, _Proposal, BaseException | None]:
        proposal = _Proposal()
        try:
            plan = plan_save(state, metadata, per_rank=group.size > 1)
            proposal.digest, proposal.keys = plan_digest(plan)
            if group.rank == 0:
                committer.check_target(target, overwrite)
                written = committer.begin(target)
                proposal.written, proposal.tag = written.path, committer.shard_tag()
            return plan, proposal, None
        except Exception as exc:  # every rank must still take part in the agreement
            proposal.error = f"{type(exc).__name__}: {exc}"
            return None, proposal, exc

    def _check_agreement(
        self,
        replies: list[_Proposal],
        target: Location,
        committer: LocalCommit | ObjectCommit,
        own_error: BaseException | None,
        group: Group,
    ) -> Location:
        leader = replies[0]
        failed = [(rank, p.error) for rank, p in enumerate(replies) if p.error]
        differing = sorted(
            {key for p in replies for key in set(p.keys) ^ set(leader.keys)}
            | {key for p in replies for key, d in p.keys.items() if leader.keys.get(key, d) != d}
        )
        mismatch = any(p.digest != leader.digest for p in replies)
        if not failed and not mismatch:
            if group.rank != 0 and isinstance(committer, ObjectCommit):
                committer.tag = leader.tag.removeprefix("-")
            if leader.written == target.path:
                return target
            return Location(target.storage, leader.written, leader.written)
        if group.rank == 0 and leader.written:
            committer.abandon(
                target
                if leader.written == target.path
                else Location(target.storage, leader.written, leader.written)
            )
        if own_error is not None:
            raise own_error
        if failed:
            raise DistributedSaveError(
                f"save of {target.url} refused on rank {failed[0][0]}: {failed[0][1]}",
                [rank for rank, _ in failed],
            )
        raise DistributedSaveError(
            f"save of {target.url}: the ranks passed different states (keys {differing or '?'}"
            " differ). Every rank must save the same tree: tensors replicated or DTensors, "
            "plain values equal; wrap values that differ per rank in sv.PerRank(...)"
        )

    def _files(self, plan: SavePlan, digest: str, group: Group) -> list[list[int]]:
        """This rank's leaves grouped into shard files; reused while the plan is unchanged."""
        key = (digest, group.rank, group.size)
        if key not in self._assignments:
            if len(self._assignments) > 8:
                self._assignments.clear()
            self._assignments[key] = leaves_to_write(plan, group.rank, group.size)
        mine = self._assignments[key]
        sizes = [plan.leaves[i].spec.nbytes for i in mine]
        budget = self.budget // 2 if self.asynchronous else None
        groups = assign_files(sizes, max_file_bytes=budget)
        return _aligned(plan, [[mine[j] for j in members] for members in groups])

    def _share(
        self, job: _Job, files: list[int], staged: dict[int, memoryview], started: float
    ) -> Manifest | None:
        """Write this rank's shards and report them; rank 0 then commits the whole."""
        try:
            write_started = time.perf_counter()
            job.write(files, staged)
            job.timings["write_s"] = time.perf_counter() - write_started
            part = _part_of(job)
        except BaseException as exc:
            self._report_failure(job, exc)
            raise
        if job.rank != 0:
            _write_part(job, part)
            return None
        try:
            parts = [part, *_collect_parts(job, self.group.size, self.timeout_s)]
            manifest = merge(job.plan, parts, job.target.url)
            _remove_parts(job, self.group.size)
            mode = "async" if job.asynchronous else "sync"
            manifest.info = checkpoint_info(job.plan, job.timings, job.extra_info, started, mode)
            manifest.info["save"]["bytes"] = sum(t.nbytes for t in manifest.tensors)
            manifest.info["save"]["slowest_rank_write_s"] = max(
                p.timings.get("write_s", 0.0) for p in parts
            )
            manifest = job.commit(manifest)
        except BaseException as exc:
            if self.group.size == 1:
                job.abandon_written()
            # else: other ranks may still be writing; the temporary goes at settle
            logger.error("statevault: save of %s failed: %r", job.target.url, exc)
            raise
        job.timings["durable_s"] = time.perf_counter() - started
        return manifest

    def _report_failure(self, job: _Job, exc: BaseException) -> None:
        """Tell rank 0 at once (so it does not wait out the timeout); rank 0 cleans up."""
        if job.rank == 0:
            if self.group.size == 1:
                job.abandon_written()
            return  # other ranks may still be writing: the temporary goes at settle
        try:
            _write_part(job, Part(job.rank, error=f"{type(exc).__name__}: {exc}"))
        except Exception as report_error:  # the save fails anyway; say why rank 0 may wait
            logger.error(
                "statevault: rank %d could not report its failure: %r", job.rank, report_error
            )

    def idle(self) -> bool:
        """True when this rank's share of the save in flight is written (or failed); settling
        it with the other ranks is still to come (``wait``)."""
        return self._pending is None or self._pending.future.done()

    def wait(self) -> Manifest | None:
        """Settle the save in flight: wait for this rank's share, then learn every rank's
        outcome (a collective call: every rank calls it at the same point)."""
        return self._settle()

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

    def _settle(self) -> Manifest | None:
        pending = self._take_pending()
        if pending is None:
            return None
        try:
            return self._settle_outcomes(pending)
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
        if manifest is not None or not self.read_back_manifest:
            return manifest
        from statevault.checkpoint import open_checkpoint  # (checkpoint imports this module)

        return open_checkpoint(pending.target or pending.url).manifest


def plan_digest(plan: SavePlan) -> tuple[str, dict[str, str]]:
    """A digest of what must be equal on every rank: the tree (per-rank branches left out) and
    each shared leaf's dtype and global shape; and one digest per top-level key, to name the
    keys that differ."""
    shapes = [
        (leaf.spec.dtype, leaf.shard.global_shape if leaf.shard else leaf.spec.shape)
        for leaf in plan.leaves[: plan.shared_count]
    ]
    tree = _without_rank_branches(plan.tree)
    whole = json.dumps([tree, shapes], sort_keys=True, default=str).encode()
    keys = {}
    if type(tree) is dict and type(tree.get("v")) is dict:
        keys = {
            key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for key, value in tree["v"].items()
        }
    return hashlib.sha256(whole).hexdigest(), keys


def _without_rank_branches(node: Any) -> Any:
    if type(node) is list:
        return [_without_rank_branches(v) for v in node]
    if type(node) is not dict:
        return node
    if node.get("$") == "per_rank":
        return {"$": "per_rank"}
    return {k: _without_rank_branches(v) for k, v in node.items()}


def _part_of(job: _Job) -> Part:
    chunks = {
        leaf: {"offsets": list(job.plan.leaves[leaf].shard.offsets)}  # type: ignore[union-attr]
        for leaf in job.tensor_rows
        if job.plan.leaves[leaf].shard is not None
    }
    return Part(
        job.rank,
        files=list(job.file_rows),
        rows=dict(job.tensor_rows),
        chunks=chunks,
        per_rank=per_rank_locals(job.plan.tree),
        timings=dict(job.timings),
    )


def _write_part(job: _Job, part: Part) -> None:
    path = job.written.join(part_name(part.rank, job.committer.shard_tag())).path
    job.written.storage.write_bytes(path, part.to_json())  # appears whole: rank 0 polls for it


def _collect_parts(job: _Job, world: int, timeout_s: float) -> list[Part]:
    """Every other rank's part, read from the storage as it appears; a failed rank's part or
    the timeout ends the wait with DistributedSaveError."""
    tag = job.committer.shard_tag()
    storage, directory = job.written.storage, job.written.path
    found: dict[int, Part] = {}
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    while len(found) < world - 1:
        for name in storage.list_dir(directory):
            rank = part_rank(name, tag)
            if rank is None or rank in found or not 0 < rank < world:
                continue
            path = job.written.join(name).path
            part = part_from_json(storage.read_bytes(path, 0, storage.size(path)), rank)
            if part.error is not None:
                raise DistributedSaveError(f"rank {rank} failed: {part.error}", [rank])
            found[rank] = part
        if len(found) < world - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, world)) - set(found))
                raise DistributedSaveError(
                    f"ranks {missing[:16]} did not finish their share within {timeout_s:.0f} s "
                    "(dead or stuck); nothing was committed",
                    missing,
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
    return [found[rank] for rank in range(1, world)]


def _remove_parts(job: _Job, world: int) -> None:
    tag = job.committer.shard_tag()
    for rank in range(1, world):
        job.written.storage.remove_file(job.written.join(part_name(rank, tag)).path)


def _run_into(future: Future[Manifest | None], call: Any) -> None:
    try:
        future.set_result(call())
    except BaseException as exc:
        future.set_exception(exc)


def _as_manifest(future: Future[Manifest | None]) -> Future[Manifest]:
    return future  # type: ignore[return-value]  # rank 0's result; others settle via wait()


def new_saver(
    *, asynchronous: bool, staging_budget_bytes: int | None = None, collective: bool = True
) -> Saver:
    """The saver for this process: a :class:`DistributedSaver` inside a job of several ranks
    (unless ``collective`` is False: this process saves alone), else a plain :class:`Saver`
    (which hands sharded states to a one-rank DistributedSaver)."""
    if collective and rank_and_world()[1] > 1:
        return DistributedSaver(
            asynchronous=asynchronous, staging_budget_bytes=staging_budget_bytes
        )
    return Saver(asynchronous=asynchronous, staging_budget_bytes=staging_budget_bytes)


def _committed(pending: _Pending) -> bool:
    future = pending.future
    return future.done() and future.exception() is None and future.result() is not None


def _abandon_when_quiet(job: _Job) -> None:
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
