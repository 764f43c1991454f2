"""The files of a checkpoint as a reader opens them: a local shard (a descriptor, opened only if
it is a regular file, never through a symlink, through the checkpoint's directory when one is
open) or an object of a store (sized once, read by byte ranges)."""

from __future__ import annotations

import os
import stat

from statevault.storage.base import Storage
from statevault.storage.local import open_read, read_into_fd


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is instead."""
    if stat.S_ISREG(mode):
        return None
    return (
        "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) else "special file"
    )


class LocalFile:
    """A shard on the local disk, opened without following symlinks and only if regular;
    through the checkpoint's open directory (``dir_fd``) when there is one."""

    def __init__(self, path: str, dir_fd: int | None = None) -> None:
        # lstat first: opening a FIFO would block, a symlink may lead outside.
        name = os.path.basename(path) if dir_fd is not None else path
        kind = _file_kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        if kind is not None:
            raise NotAFile(f"is a {kind}, not a regular file")
        self.fd = open_read(name, dir_fd=dir_fd)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise NotAFile("is not a regular file")

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_into(self, offset: int, view: memoryview) -> None:
        read_into_fd(self.fd, offset, view)

    def close(self) -> None:
        os.close(self.fd)


class RemoteFile:
    """An object in an fsspec store: sized once, read by byte ranges."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage = storage
        self.path = path
        self._size: int | None = None

    def size(self) -> int:
        """The object's size (one HEAD request, the first time): reads do not need it, a
        ranged read past the end fails on its own."""
        if self._size is None:
            self._size = self.storage.size(self.path)
        return self._size

    def read_into(self, offset: int, view: memoryview) -> None:
        self.storage.read_into(self.path, offset, view)

    def read_range(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        """The ``size`` bytes at ``offset``, in one request where the storage can."""
        if size == 0:
            return b""
        read_range = getattr(self.storage, "read_range", None)
        if callable(read_range):
            data: bytes | bytearray | memoryview = read_range(self.path, offset, size)
            if len(data) != size:
                raise EOFError(f"{self.path} ended at byte {offset + len(data)}")
            return data
        buffer = bytearray(size)
        self.storage.read_into(self.path, offset, memoryview(buffer))
        return buffer

    def close(self) -> None:
        return None


class NotAFile(Exception):
    pass
