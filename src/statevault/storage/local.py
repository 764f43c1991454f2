"""Local POSIX storage: large unbuffered writes, one fsync per file, positional reads.

Files are opened with ``O_NOFOLLOW`` for reading so that a symlink planted inside a checkpoint
cannot make a load read outside it, and created with ``O_EXCL`` so that a save never writes into
a file it did not create.

A storage fault (a full, read-only or forbidden disk, an I/O error) raises
:class:`~statevault.errors.StorageError` naming the path (:mod:`statevault.storage.faults`);
``FileNotFoundError`` and ``FileExistsError`` stay as they are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable

from statevault.errors import CorruptCheckpointError
from statevault.format.names import MANIFEST_NAME
from statevault.storage.base import CommitsOnExit
from statevault.storage.faults import typed_storage_errors

_MAX_WRITE = 1 << 30  # per syscall; Linux caps a single write at ~2 GiB anyway
_COPY_BYTES = 16 << 20
# link() refused for what the filesystem is, not for what is wrong: copy instead.
_NO_HARD_LINKS = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
)


class LocalWriteHandle(CommitsOnExit):
    """A file opened for exclusive creation; ``close`` fsyncs it."""

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        with typed_storage_errors(path):
            self.fd: int | None = os.open(path, flags, 0o644)

    def write(self, data: memoryview) -> None:
        assert self.fd is not None, "write after close"
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        with typed_storage_errors(self.path):
            while len(view):
                written = os.write(self.fd, view[:_MAX_WRITE])
                view = view[written:]

    def close(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with typed_storage_errors(self.path):  # NFS and quotas report a full disk here
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        with typed_storage_errors(self.path):
            if self.fd is not None:
                fd, self.fd = self.fd, None
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class LocalStorage:
    """The local filesystem (see :class:`statevault.storage.base.Storage`)."""

    atomic_rename = True

    def remove_file(self, path: str) -> None:
        with typed_storage_errors(path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def list_dir(self, path: str) -> list[str]:
        with typed_storage_errors(path):
            return sorted(os.listdir(path))

    def size(self, path: str) -> int:
        fd = open_read(path)
        try:
            with typed_storage_errors(path):
                return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        fd = open_read(path)
        try:
            with typed_storage_errors(path):
                read_into_fd(fd, offset, buffer)
        finally:
            os.close(fd)

    def read_bytes(self, path: str, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(path, offset, memoryview(buffer))
        return bytes(buffer)

    def open_write(self, path: str) -> LocalWriteHandle:
        return LocalWriteHandle(path)

    def make_dir(self, path: str) -> None:
        with typed_storage_errors(path):
            os.makedirs(path, exist_ok=False)

    def remove_tree(self, path: str) -> None:
        """Delete a checkpoint directory, its manifest first so it never looks committed."""
        with typed_storage_errors(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, MANIFEST_NAME))
            fsync_dir(path)
            shutil.rmtree(path, ignore_errors=False)

    def share_file(self, source: str, target: str) -> bool:
        """A hard link (both names then hold the same blocks: a deletion of either name leaves
        the other whole); a durable copy where the filesystem has no hard links (or the two
        paths are on different filesystems)."""
        with typed_storage_errors(target):
            try:
                os.link(source, target, follow_symlinks=False)
                return True
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
            with open(source, "rb", buffering=0) as reader, LocalWriteHandle(target) as handle:
                while chunk := reader.read(_COPY_BYTES):
                    handle.write(memoryview(chunk))
            return False

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write aside, fsync, rename over ``path``, fsync the directory: all or nothing."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with LocalWriteHandle(tmp) as handle:
            handle.write(memoryview(data))
        try:
            with typed_storage_errors(path):
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # never leave the aside copy behind
            raise
        with typed_storage_errors(path):
            fsync_dir(os.path.dirname(path) or ".")

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            handle = LocalWriteHandle(path)
        except FileExistsError:
            return False
        with handle:
            handle.write(memoryview(data))
        with typed_storage_errors(path):
            fsync_dir(os.path.dirname(path) or ".")
        return True

    def modified(self, path: str) -> float | None:
        with typed_storage_errors(path):
            try:
                newest = os.lstat(path).st_mtime
            except FileNotFoundError:
                return None
            if self.is_dir(path):
                for root, _, files in os.walk(path):
                    for name in files:
                        with contextlib.suppress(FileNotFoundError):
                            newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            return newest


def open_read(path: str, dir_fd: int | None = None) -> int:
    """A read-only descriptor that refuses symlinks (ELOOP); the caller closes it. ``dir_fd``:
    ``path`` is relative to that open directory (``openat``). A storage fault (EACCES, EIO...)
    is a StorageError naming ``path``."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    with typed_storage_errors(path):
        return os.open(path, flags, dir_fd=dir_fd)


def read_plain_file(
    dir_fd: int, directory: str, name: str, check_size: Callable[[int], None]
) -> bytes:
    """The whole of ``name`` in the open directory ``dir_fd`` (``directory`` names it in
    messages), read as a plain file only: a symlink could lead outside the checkpoint, a FIFO
    would block, a device would read anything. ``check_size`` sees the size before the buffer
    is allocated, and raises to refuse it. Raises FileNotFoundError when the file is missing
    (at the stat or the open) and OSError when it cannot be looked at; any other problem is a
    CorruptCheckpointError naming the file."""
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    if not stat.S_ISREG(mode):
        raise CorruptCheckpointError(
            f"{directory}: {name} is not a regular file (a symlink, directory or device); "
            "statevault reads only plain files inside the checkpoint"
        )
    try:
        fd = open_read(name, dir_fd=dir_fd)
    except FileNotFoundError:  # deleted since the stat
        raise
    except OSError as exc:  # ELOOP: a symlink planted since the stat
        raise CorruptCheckpointError(f"{directory}: cannot open {name} ({exc})") from None
    try:
        size = os.fstat(fd).st_size
        check_size(size)
        data = bytearray(size)
        read_into_fd(fd, 0, memoryview(data))
        return bytes(data)
    except (OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"{directory}: cannot read {name} ({exc})") from None
    finally:
        os.close(fd)


def read_into_fd(fd: int, offset: int, buffer: memoryview) -> None:
    """``pread`` until ``buffer`` is full; EOFError if the file ends first."""
    view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
    while len(view):
        count = os.preadv(fd, [view[:_MAX_WRITE]], offset)
        if count == 0:
            raise EOFError(f"file ended at byte {offset}")
        view = view[count:]
        offset += count


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
