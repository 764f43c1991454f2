"""Open: one manifest read, local or remote, through the storage layer; no payload read.

On a local disk the checkpoint's directory is opened once and everything is read through that
descriptor (``openat``), so that an overwrite's swap of the directory can never mix two
checkpoints (docs/FORMAT.md section 3.1). Example::

    with open_checkpoint("ckpt/epoch10") as checkpoint:
        print(len(checkpoint.manifest.tensors), "tensors")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from statevault.checkpoint import commit
from statevault.engine.reader import CheckpointReader
from statevault.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from statevault.format.checksum import crc32c_of
from statevault.format.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from statevault.format.names import MANIFEST_NAME
from statevault.storage.local import read_plain_file
from statevault.storage.location import Location, local_directory, resolve

PathLike = str | os.PathLike[str]
# A load or verify that finds its checkpoint replaced or deleted under it (an overwrite, a
# retention) reads the one now at the path, at most this many times in all.
READ_ATTEMPTS = 3


@dataclass
class OpenCheckpoint:
    """A checkpoint whose manifest has been read and validated (no payload read yet).

    On a local disk the checkpoint's directory is opened once (``dir_fd``) and every file is
    read through that descriptor (``openat``): a concurrent ``save(overwrite=True)``, which
    swaps the directory at the path, can never mix the old manifest with the new shards. Close
    it (or use ``with``) when done; an unclosed one closes its descriptor when collected.
    """

    location: Location
    manifest: Manifest
    dir_fd: int | None = None
    manifest_checksum: int = 0  # of the manifest's bytes, to tell whether it was replaced

    @property
    def directory(self) -> str:
        """The checkpoint's path or URL, as messages show it."""
        return self.location.url

    @property
    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.location, self.manifest, self.dir_fd)

    def still_current(self) -> bool:
        """Whether this is still the checkpoint at its path: False once it was replaced or
        deleted while it was being read (its manifest is gone from the directory opened, or
        the object store holds another manifest there now)."""
        if self.dir_fd is not None:
            try:
                os.stat(MANIFEST_NAME, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True
        if self.location.local:
            return True
        try:
            data = _remote_manifest_bytes(self.location)
        except CheckpointError:
            return False
        return crc32c_of(data) == self.manifest_checksum

    def read_ranks(self, ranks: Iterable[int] | None) -> None:
        """Expand a format-3 manifest with the indexes of ``ranks`` (None: every rank), once
        each; nothing to do for formats 1 and 2, whose manifest holds every row."""
        wanted = None if ranks is None else list(ranks)
        if self.manifest.indexes is None or wanted == []:
            return
        from statevault.checkpoint.indexes import with_indexes

        self.manifest = with_indexes(self.location, self.dir_fd, self.manifest, wanted)

    def close(self) -> None:
        fd, self.dir_fd = self.dir_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()  # closing a descriptor: no I/O to wait for


def open_checkpoint(
    path: PathLike | Location,
    storage_options: Mapping[str, Any] | None = None,
    ranks: Iterable[int] | None = None,
) -> OpenCheckpoint:
    """The checkpoint at ``path`` with its manifest parsed and validated (no payload read).

    A format-3 checkpoint's manifest is expanded with the per-rank indexes of ``ranks`` (None:
    all, so the manifest is complete; ``()``: none yet, see :meth:`OpenCheckpoint.read_ranks`)."""
    location = resolve(path, storage_options)
    if commit.is_temporary(location.name):
        # A save in flight (or dead, or the old side of an overwrite): never a checkpoint,
        # even once its manifest is written, until it is renamed to its final name.
        raise CheckpointNotFoundError(f"{location.url} is an unfinished save, not a checkpoint")
    if not location.local:
        for attempt in range(1, READ_ATTEMPTS + 1):
            data = _remote_manifest_bytes(location)
            manifest = parse_manifest(data, location.url)
            opened = OpenCheckpoint(location, manifest, None, crc32c_of(data))
            try:
                opened.read_ranks(ranks)
            except CorruptCheckpointError:
                if attempt == READ_ATTEMPTS or opened.still_current():
                    raise
                continue  # replaced while its indexes were read: read the new one
            return opened
    for attempt in range(1, READ_ATTEMPTS + 1):
        dir_fd = _open_directory(location.path)
        # One owner closes the descriptor: this function until the OpenCheckpoint exists, then
        # the object (closing it here as well would close a number another open may reuse).
        checkpoint: OpenCheckpoint | None = None
        try:
            data = _local_manifest_bytes(dir_fd, location.path)
            manifest = parse_manifest(data, location.path)
            checkpoint = OpenCheckpoint(location, manifest, dir_fd, crc32c_of(data))
            checkpoint.read_ranks(ranks)
        except (CheckpointNotFoundError, CorruptCheckpointError):
            replaced = _replaced(dir_fd, location.path)
            _release(checkpoint, dir_fd)
            if attempt == READ_ATTEMPTS or not replaced:
                raise
            continue  # the directory opened was swapped out and is being deleted: try again
        except BaseException:
            _release(checkpoint, dir_fd)
            raise
        return checkpoint
    raise AssertionError("unreachable")


def _release(opened: OpenCheckpoint | None, dir_fd: int) -> None:
    if opened is not None:
        opened.close()
    else:
        os.close(dir_fd)


def _replaced(dir_fd: int, path: str) -> bool:
    """Whether ``path`` names another directory now than the one open as ``dir_fd``."""
    opened = os.fstat(dir_fd)
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino)


def _open_directory(directory: str) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(f"no committed checkpoint at {directory}") from None
    except OSError as exc:
        raise _cannot_tell(directory, "open the directory", exc) from exc


def _cannot_tell(directory: str, what: str, exc: OSError) -> CheckpointError:
    """EACCES, ESTALE: there may well be a checkpoint there; say so, never "none"."""
    return CheckpointError(
        f"{directory}: cannot {what} ({exc.strerror or exc}); check the permissions and the mount"
    )


def _local_manifest_bytes(dir_fd: int, directory: str) -> bytes:
    """manifest.json read through the directory's descriptor, as a plain file only."""

    def refuse_implausible(size: int) -> None:  # before allocating
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{directory}: manifest.json is implausibly large ({size} B)"
            )

    try:
        return read_plain_file(dir_fd, directory, MANIFEST_NAME, refuse_implausible)
    except FileNotFoundError:  # also deleted since the stat: an overwrite's old side, a retention
        raise CheckpointNotFoundError(f"no committed checkpoint at {directory}") from None
    except OSError as exc:
        raise _cannot_tell(directory, "look for manifest.json", exc) from exc


def _remote_manifest_bytes(location: Location) -> bytes:
    manifest = location.join(MANIFEST_NAME)
    try:
        size = location.storage.size(manifest.path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {location.url}") from None
    if size > MAX_MANIFEST_BYTES:  # refuse before allocating
        raise CorruptCheckpointError(f"{location.url}: manifest.json is implausibly large")
    try:
        return location.storage.read_bytes(manifest.path, 0, size)
    except FileNotFoundError:  # deleted since it was sized: a retention or an overwrite
        raise CheckpointNotFoundError(f"no committed checkpoint at {location.url}") from None
    except EOFError as exc:
        raise CorruptCheckpointError(f"{location.url}: cannot read manifest.json ({exc})") from None


def local_path(path: PathLike) -> str:
    """The local directory a path or ``file://`` URL names, for what works on local disks only
    (the manager, the run commands of the CLI); other URL schemes are refused."""
    directory = local_directory(path)
    if directory is None:
        scheme = os.fspath(path).split("://", 1)[0]
        raise CheckpointError(
            f"{scheme}:// is not supported here yet: run directories must be local paths "
            "(sv.save, sv.load and sv.verify accept URLs)"
        )
    return directory
