"""Any fsspec filesystem (s3://, gs://, abfs://, hdfs://, memory://...) as checkpoint storage.

Objects are written through fsspec's buffered files: s3fs and its peers stream a large file as a
multipart upload of ``PART_BYTES`` parts, so memory stays bounded by a part per file being
written, never a whole shard. Reads are ranged (``cat_file(path, start, end)``): a load fetches
the byte ranges it needs, not whole objects. Transient network errors are retried by the
filesystem's client (botocore for S3); errors that retrying cannot fix (no bucket, access
denied) are raised at once as :class:`StorageError` naming the URL.
"""

from __future__ import annotations

import contextlib
import posixpath
from types import TracebackType
from typing import Any

from statevault.errors import StorageError
from statevault.format.names import MANIFEST_NAME

PART_BYTES = 16 << 20
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})


class FsspecWriteHandle:
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage = storage
        self.path = path
        self.file: Any = storage.call(path, storage.fs.open, path, "wb", block_size=PART_BYTES)

    def write(self, data: memoryview) -> None:
        self.storage.call(self.path, self.file.write, data)

    def close(self) -> None:
        """Completes the upload: the object exists, whole, once this returns. If the last part
        fails here, the multipart upload is aborted (it would otherwise linger, billed)."""
        try:
            self.storage.call(self.path, self.file.close)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Abandon the upload (a multipart upload is aborted, nothing is published)."""
        discard = getattr(self.file, "discard", None)
        with contextlib.suppress(Exception):  # best effort: the write already failed
            if callable(discard):
                discard()
                self.file.closed = True  # discarded: its finaliser must not try to upload again
            else:
                self.file.close()
        with contextlib.suppress(Exception):
            self.storage.fs.rm_file(self.path)

    def __enter__(self) -> FsspecWriteHandle:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class FsspecStorage:
    """Storage over an fsspec filesystem; paths are that filesystem's (``bucket/key``)."""

    atomic_rename = False

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path}"

    def call(self, path: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a filesystem call; errors no retry can fix become StorageError naming the URL."""
        try:
            return function(*args, **kwargs)
        except PermissionError as exc:
            raise StorageError(
                f"{self.url(path)}: access denied ({exc}); check the credentials given through "
                "storage_options or the environment"
            ) from exc
        except OSError as exc:
            if "NoSuchBucket" in repr(exc) or "bucket does not exist" in str(exc).lower():
                raise StorageError(f"{self.url(path)}: the bucket does not exist") from exc
            raise

    def _fresh(self, path: str) -> None:
        """Forget cached listings: another process (a dead save, a retention) may have changed
        the prefix, and a stale listing would show a deleted manifest or an old size."""
        self.fs.invalidate_cache(posixpath.dirname(path))
        self.fs.invalidate_cache(path)

    def exists(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.call(path, self.fs.exists, path))

    def is_dir(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.call(path, self.fs.isdir, path))

    def list_dir(self, path: str) -> list[str]:
        try:
            entries = self.call(path, self.fs.ls, path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def size(self, path: str) -> int:
        self._fresh(path)
        return int(self.call(path, self.fs.size, path))

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if not len(view):
            return
        data = self.call(path, self.fs.cat_file, path, start=offset, end=offset + len(view))
        if len(data) != len(view):
            raise EOFError(f"{self.url(path)} ended at byte {offset + len(data)}")
        view[:] = data

    def read_bytes(self, path: str, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(path, offset, memoryview(buffer))
        return bytes(buffer)

    def open_write(self, path: str) -> FsspecWriteHandle:
        return FsspecWriteHandle(self, path)

    def make_dir(self, path: str) -> None:
        if self.protocol in OBJECT_STORES:
            return  # prefixes need no creating; makedirs would even create a missing bucket
        self.call(path, self.fs.makedirs, path, exist_ok=True)

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.call(path, self.fs.rm_file, path)

    def remove_tree(self, path: str) -> None:
        """Delete a checkpoint prefix, its manifest first so it never looks committed."""
        self.remove_file(posixpath.join(path, MANIFEST_NAME))
        with contextlib.suppress(FileNotFoundError):
            self.call(path, self.fs.rm, path, recursive=True)
        self.fs.invalidate_cache(path)
