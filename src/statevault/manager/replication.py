"""Two tiers: committed checkpoints of the fast local tier copied to a durable replica.

The replication protocol, for one committed local checkpoint ``<local>/step_N``:

1. verify it (every checksum; a damaged local checkpoint is never replicated: the failure is
   raised to the trainer);
2. if ``<replica>/step_N/manifest.json`` exists, it is already there: done. Objects under that
   prefix without a manifest are the remains of a dead replication (or of a dead save): they
   are deleted, unless one is not a statevault file, which is refused;
3. write the marker (checkpoint/commit.py: the prefix is statevault's from then on, whatever
   happens), then copy every shard file in ``part_bytes`` pieces (a streamed multipart upload;
   memory holds a piece or two, never a file). A transient failure aborts that upload and
   retries the file with backoff (:func:`statevault.storage.fsspec_storage.retrying`); a
   permanent one (access denied, no bucket, quota) fails at once. Each copied object's size is
   checked against the manifest; the bytes are protected in transit by the S3 client's
   per-request checksums;
4. ``annotations.json`` if any, then the manifest, byte for byte, last: the object-store commit.
   A replica on a local path (a shared filesystem) is written under a temporary name and
   renamed, as every local save is.

A replication failure leaves no committed replica (no manifest) and is raised on the
manager's next ``save``, ``wait`` or ``close``. The thread (a daemon: the exit hook waits for
it, manager/closing.py) runs no collectives. :meth:`Replicator.abandon` stops the copies before
their next part (at exit, past the grace or on Ctrl-C): the upload is aborted, no manifest is
written, and the prefix is swept later like any dead save's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future

from statevault.checkpoint import commit, open_checkpoint
from statevault.checkpoint.verify import verify
from statevault.engine.background import BackgroundWorker
from statevault.engine.cancel import Cancel
from statevault.errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    StorageError,
)
from statevault.format.indexed import metadata_names
from statevault.format.manifest import FileEntry, Manifest
from statevault.format.names import MANIFEST_NAME, is_shard_name, marker_name
from statevault.manager.index import CheckpointRecord, RunScan, read_record, scan_run
from statevault.manager.naming import ANNOTATIONS_FILE, step_dir_name
from statevault.manager.retention import RetentionPolicy, decide
from statevault.storage.fsspec_storage import PART_BYTES, retrying
from statevault.storage.local import open_read, read_into_fd
from statevault.storage.location import Location

logger = logging.getLogger("statevault")


# A shard file's identity for replication: its size, header checksum and content hashes (the
# rows of an incremental save have them). Equal keys mean equal bytes.
BlobKey = tuple[int, str, tuple[str, ...]]


def blob_keys(manifest: Manifest) -> dict[str, BlobKey]:
    """The key of every file of ``manifest`` whose tensors all carry a content hash."""
    hashes: dict[str, list[tuple[int, str | None]]] = {}
    for row in manifest.tensors:
        hashes.setdefault(row.file, []).append((row.offset, row.hash))
    keys = {}
    for entry in manifest.files:
        found = sorted(hashes.get(entry.name, []))
        if found and all(h is not None for _, h in found):
            keys[entry.name] = (entry.size, entry.header_checksum, tuple(str(h) for _, h in found))
    return keys


def copy_checkpoint(
    source: str,
    target: Location,
    part_bytes: int = PART_BYTES,
    cancel: Cancel | None = None,
    blobs: dict[BlobKey, Location] | None = None,
) -> bool:
    """Replicate the committed local checkpoint ``source`` to ``target`` (protocol above).

    ``blobs``: files already on the replica, by key (:func:`blob_keys`): a file of ``source``
    with one of those keys is copied server-side from it, not uploaded again, and the files
    this copy uploads are added. Returns False when ``target`` already held it. Example::

        copy_checkpoint("/scratch/run/step_000001000", resolve("s3://b/run/step_000001000"))
    """
    checkpoint = open_checkpoint(source)
    report = verify(source)
    if not report.ok:
        raise CorruptCheckpointError(
            f"{source} is damaged; not replicating it: {report.problems[0]}", report.problems
        )
    if target.storage.exists(target.join(MANIFEST_NAME).path):
        return False
    metadata = metadata_names(checkpoint.manifest)  # format 3: the index table and indexes
    _clear_dead_copy(target, {entry.name for entry in checkpoint.manifest.files} | set(metadata))
    # A local replica (a shared filesystem) commits by rename like any local save; an object
    # store by writing the manifest last. Either way the marker goes first.
    if target.local:
        tmp = commit.begin(target.path)
        written = Location(target.storage, tmp, tmp)
    else:
        target.storage.make_dir(target.path)
        _copy_marker(source, target)
        written = target
    keys = blob_keys(checkpoint.manifest)
    known = blobs if blobs is not None else {}
    try:
        _copy_files(
            source,
            checkpoint.manifest.files,
            written,
            part_bytes,
            cancel or Cancel(),
            keys,
            known,
            metadata,
        )
        if target.local:
            commit.publish(written.path, target.path, overwrite=False)
    except BaseException:
        if target.local:
            commit.abandon(written.path)
        raise
    known.update({key: target.join(name) for name, key in keys.items()})
    return True


def _copy_marker(source: str, target: Location) -> None:
    """The local checkpoint's marker, byte for byte (a fresh one if it predates markers)."""
    try:
        with open(os.path.join(source, marker_name()), "rb") as handle:
            data = handle.read(4096)
    except FileNotFoundError:
        data = commit.marker_bytes()
    target.storage.write_bytes(target.join(marker_name()).path, data)


def _clear_dead_copy(target: Location, names: set[str]) -> None:
    """Remove what a dead copy left under ``target``; refuse if anything there is foreign."""
    storage = target.storage
    leftovers = storage.list_dir(target.path) if storage.exists(target.path) else []
    foreign = [n for n in leftovers if n not in names and n != ANNOTATIONS_FILE]
    foreign = [n for n in foreign if not is_shard_name(n)]
    if foreign:
        raise CheckpointExistsError(
            f"{target.url} holds objects that are not a statevault checkpoint "
            f"({', '.join(foreign[:3])}); refusing to replicate over them"
        )
    if leftovers:
        commit.remove_checkpoint(target)


def _copy_files(
    source: str,
    files: list[FileEntry],
    written: Location,
    part_bytes: int,
    cancel: Cancel,
    keys: dict[str, BlobKey],
    known: dict[BlobKey, Location],
    metadata: list[str],
) -> None:
    """Every shard (server-side from the replica itself where it holds the same bytes), the
    per-rank indexes and their table, then the annotations, then the manifest (the
    object-store commit)."""
    for entry in files:
        there = known.get(keys[entry.name]) if entry.name in keys else None
        if there is not None and written.storage.exists(there.path):
            written.storage.share_file(there.path, written.join(entry.name).path)
            continue
        retrying(
            lambda e=entry: _copy_file(  # type: ignore[misc]
                os.path.join(source, e.name), written.join(e.name), e.size, part_bytes, cancel
            )
        )
    for name in metadata:  # format 3: the index table and every rank's index
        size = os.path.getsize(os.path.join(source, name))
        retrying(
            lambda n=name, z=size: _copy_file(  # type: ignore[misc]
                os.path.join(source, n), written.join(n), z, part_bytes, cancel
            )
        )
    cancel.check()
    storage = written.storage
    annotations = os.path.join(source, ANNOTATIONS_FILE)
    if os.path.isfile(annotations):
        with open(annotations, "rb") as handle:
            data = handle.read(1 << 20)
        storage.write_bytes(written.join(ANNOTATIONS_FILE).path, data)
    with open(os.path.join(source, MANIFEST_NAME), "rb") as handle:
        manifest = handle.read()
    storage.write_bytes(written.join(MANIFEST_NAME).path, manifest)


def _copy_file(source: str, target: Location, size: int, part_bytes: int, cancel: Cancel) -> None:
    """Stream one file in ``part_bytes`` pieces; check the object's size afterwards."""
    buffer = bytearray(min(part_bytes, max(size, 1)))
    fd = open_read(source)
    try:
        if os.fstat(fd).st_size != size:
            raise CorruptCheckpointError(f"{source}: size differs from its manifest")
        with target.storage.open_write(target.path) as handle:
            offset = 0
            while offset < size:
                count = min(len(buffer), size - offset)
                view = memoryview(buffer)[:count]
                cancel.check()  # SaveAbandoned: the upload is aborted by the with block
                read_into_fd(fd, offset, view)
                handle.write(view)
                offset += count
    finally:
        os.close(fd)
    copied = target.storage.size(target.path)
    if copied != size:
        raise StorageError(f"{target.url}: {copied} bytes arrived of {size}")


class Replicator:
    """Copies committed checkpoints to the replica tier in one background thread, and applies
    the replica's own retention after each copy (see the module docstring)."""

    def __init__(
        self,
        replica: Location,
        retention: list[RetentionPolicy],
        run_id: str,
        part_bytes: int = PART_BYTES,
    ) -> None:
        self.replica = replica
        self.retention = retention
        self.run_id = run_id
        self.part_bytes = part_bytes
        self.scan: RunScan = scan_run(replica)
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._futures: list[Future[None]] = []
        # Files on the replica by content (blob_keys): each is uploaded once, then copied
        # server-side. Seeded from the replica's newest checkpoint at the first copy.
        self._blobs: dict[BlobKey, Location] | None = None
        self._pool: BackgroundWorker | None = None
        self._cancel = Cancel()

    def submit(self, step: int, source: str) -> None:
        """Replicate ``source`` (the committed local checkpoint of ``step``) in the background."""
        self.raise_failures()
        with self._lock:
            self._busy.add(step)
        if self._pool is None:
            self._pool = BackgroundWorker("statevault-replicate")
        self._futures.append(self._pool.submit(self._replicate, step, source))

    def idle(self) -> bool:
        """True when no copy is queued or running."""
        return all(future.done() for future in self._futures)

    def abandon(self, reason: str) -> None:
        """Stop the copies in flight before their next part, and every later one."""
        self._cancel.set(reason)

    def busy_steps(self) -> set[int]:
        """Steps queued or being copied: the local tier must keep them meanwhile."""
        with self._lock:
            return set(self._busy)

    def committed(self) -> list[CheckpointRecord]:
        with self._lock:
            return self.scan.committed()

    def records(self) -> dict[int, CheckpointRecord]:
        with self._lock:
            return dict(self.scan.records)

    def forget(self, step: int, record: CheckpointRecord) -> None:
        with self._lock:
            self.scan.records[step] = record

    def raise_failures(self) -> None:
        """Raise the error of a finished replication that failed (each error once)."""
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()

    def wait(self) -> None:
        """Block until every queued replication is committed; raise the first failure."""
        futures, self._futures = self._futures, []
        errors: list[BaseException] = []
        for future in futures:
            try:
                future.result()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _replicate(self, step: int, source: str) -> None:
        started = time.perf_counter()
        target = self.replica.join(step_dir_name(step))
        try:
            copied = copy_checkpoint(
                source, target, self.part_bytes, self._cancel, self._known_blobs()
            )
            record = read_record(target, step)
            with self._lock:
                self.scan.records[step] = record
            if copied:
                logger.info(
                    "statevault: replicated %s to %s in %.2f s",
                    source,
                    target.url,
                    time.perf_counter() - started,
                )
            self._apply_retention()
        except BaseException as exc:
            logger.error("statevault: replication of %s failed: %r", source, exc)
            raise
        finally:
            with self._lock:
                self._busy.discard(step)

    def _known_blobs(self) -> dict[BlobKey, Location]:
        """The replica's files by content: what this replicator copied, and after a restart
        the files of the replica's newest committed checkpoint."""
        if self._blobs is None:
            self._blobs = {}
            committed = self.committed()
            if committed:
                newest = self.replica.join(step_dir_name(committed[-1].step))
                try:
                    with open_checkpoint(newest) as checkpoint:
                        keys = blob_keys(checkpoint.manifest)
                except CheckpointError:
                    keys = {}  # unreadable: everything is uploaded again
                self._blobs = {key: newest.join(name) for name, key in keys.items()}
        return self._blobs

    def _apply_retention(self) -> None:
        with self._lock:
            records = list(self.scan.records.values())
        own = [r for r in records if r.run_id == self.run_id]
        committed = sorted(r.step for r in own if r.status == "committed")
        protected: dict[int, str] = {committed[-1]: "newest"} if committed else {}
        _, deletable = decide(own, self.retention, protected)
        for step in deletable:
            path = self.replica.join(step_dir_name(step))
            logger.info("statevault: replica retention deletes %s", path.url)
            if path.local:
                commit.delete_committed(path.path)
            else:
                commit.remove_checkpoint(path)
            with self._lock:
                self.scan.records.pop(step, None)
