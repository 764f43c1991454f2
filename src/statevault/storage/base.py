"""The storage protocol: the few operations the engine needs from a place that holds bytes.

Call order for one save (paths are ``/``-separated strings under one checkpoint directory)::

    storage.make_dir(tmp)
    h = storage.open_write(f"{tmp}/data-...safetensors"); h.write(view) ...; h.close()  # durable
    ... the manifest last, the same way ...
    checkpoint/commit.py then publishes ``tmp`` under its final name (rename, or nothing more on
    object stores)

and for a load: ``size`` of every file, then ``read_into`` of the byte ranges needed. Example::

    storage = LocalStorage()
    with storage.open_write("/tmp/run/x.bin") as handle:
        handle.write(memoryview(b"payload"))
    buffer = bytearray(7)
    storage.read_into("/tmp/run/x.bin", 0, memoryview(buffer))
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, TypeVar


class WriteHandle(Protocol):
    """A file being written sequentially. ``close()`` returns only once the bytes are durable."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def __enter__(self) -> WriteHandle: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


_Handle = TypeVar("_Handle", bound="CommitsOnExit")


class CommitsOnExit:
    """``with`` support for write handles: ``close()`` (durable) on success, ``abort()`` when
    the block raised, or when ``close()`` itself failed (a full disk reported at fsync): a file
    that is not durable is never left behind."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


class Storage(Protocol):
    """Byte storage. Implementations: LocalStorage (POSIX fast path), FsspecStorage (URLs).

    ``atomic_rename`` says which commit protocol applies (checkpoint/commit.py): rename a finished
    temporary directory, or write the manifest last.
    """

    atomic_rename: bool

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[str]: ...

    def size(self, path: str) -> int: ...

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``; EOFError when the file is shorter."""

    def read_bytes(self, path: str, offset: int, size: int) -> bytes: ...

    def open_write(self, path: str) -> WriteHandle: ...

    def make_dir(self, path: str) -> None: ...

    def remove_file(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def share_file(self, source: str, target: str) -> bool:
        """Make ``target`` (which must not exist) hold the bytes of ``source`` without sending
        them through this process where the storage can: a hard link on a local disk, a
        server-side copy on an object store. True when shared that way, False when the bytes
        were copied through this process instead (a filesystem without hard links)."""

    # Small whole objects (run.json, annotations, the run lease) and ages, for the manager.

    def write_bytes(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` all at once: readers see the old or the new bytes."""

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` only if nothing is there: True if created, False if
        something was. NotImplementedError where the store has no conditional create."""

    def modified(self, path: str) -> float | None:
        """When ``path`` (a file, or the newest file under a directory / prefix) was last
        written, as a POSIX timestamp; None when nothing is there."""
