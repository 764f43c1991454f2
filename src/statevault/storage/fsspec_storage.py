"""Any fsspec filesystem (s3://, gs://, abfs://, hdfs://, memory://...) as checkpoint storage.

Objects are written through fsspec's buffered files: s3fs and its peers stream a large file as a
multipart upload of ``PART_BYTES`` parts, never buffering a whole shard. Each upload holds about
three parts at its peak (fsspec's buffer and the client's copies of the part being sent), and at
most ``UPLOAD_CONCURRENCY`` uploads run at once per save (further files wait their turn), so a
save's extra memory is bounded by about ``3 * PART_BYTES * UPLOAD_CONCURRENCY`` (192 MiB),
whatever the size of the state. Reads are ranged (``cat_file(path, start, end)``): a load fetches
the byte ranges it needs, not whole objects.

Errors, two kinds. Transient ones (a dropped connection, a timeout, a throttling reply) are
retried by the filesystem's client; idempotent whole-object operations (listing, sizing,
reading, small puts, deletes) whose error reaches us as a plain ``OSError`` (a connection reset,
an I/O error) are retried once more here, ``RETRY_ATTEMPTS`` times with exponential backoff
(0.2, 0.4, 0.8 s: :func:`retrying`). An error of the client itself (botocore's: an unreachable
endpoint, a timeout) comes after the client's own retries and is not retried again. Every error
that is left, and those that retrying cannot fix (no bucket, access denied, no credentials, a
quota exceeded) at once, is raised as :class:`StorageError` naming the URL, what to do, and the
original error as its cause (:mod:`statevault.storage.faults`). A streamed upload is never
retried piecemeal here: a failed part aborts the multipart upload, and the caller retries the
whole file (replication does) or the save fails with nothing committed.

The retry budget on S3 (s3://, s3a://). Unless ``storage_options`` set them (in
``config_kwargs``; or the environment sets ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``),
statevault gives botocore ``connect_timeout=S3_CONNECT_TIMEOUT_S`` (5 s) and
``retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}`` (3 attempts in all,
the first included, with a random backoff of at most 1 s, then 2 s, between them). So a request
to an unreachable endpoint fails with a StorageError

- within about 3 s when the connection is refused (nothing listens there: the backoff alone);
- within about 3 x 5 + 3 = 18 s when nothing answers at all (a black-holed address, a firewall
  that drops packets).

An endpoint that accepts the connection but never answers waits ``read_timeout`` per attempt
(s3fs's default, 15 s), and s3fs retries such timeouts itself up to 5 times: up to about
4 minutes; lower it with ``storage_options={"config_kwargs": {"read_timeout": ...}}``. A save
or load that fails makes a few more requests while it cleans up (aborting the upload, removing
its temporary), each within the same budget. Example, a tighter budget::

    sv.save(state, "s3://bucket/ckpt", storage_options={
        "config_kwargs": {"connect_timeout": 2, "retries": {"total_max_attempts": 2}}
    })
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import functools
import os
import posixpath
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from statevault.errors import StorageError
from statevault.format.names import MANIFEST_NAME
from statevault.storage.base import CommitsOnExit
from statevault.storage.faults import typed_storage_errors

PART_BYTES = 16 << 20
UPLOAD_CONCURRENCY = int(os.environ.get("STATEVAULT_UPLOAD_CONCURRENCY", "4"))
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.2
S3_CONNECT_TIMEOUT_S = 5
S3_MAX_ATTEMPTS = 3
S3_PROTOCOLS = frozenset({"s3", "s3a"})
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})


def _return_freed_memory() -> None:
    """Give the part buffers an upload freed back to the OS (glibc keeps freed chunks of each
    thread's arena resident, so without this the resident size grows with every writer thread
    that ever uploaded, not with the parts in flight)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


class FsspecWriteHandle(CommitsOnExit):
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self.storage = storage
        self.path = path
        storage.uploads.acquire()  # released by close or abort: bounds the parts in memory
        self._slot = True
        self._aborted = False
        try:
            self.file: Any = storage.call(path, storage.fs.open, path, "wb", block_size=PART_BYTES)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._slot:
            self._slot = False
            self.storage.uploads.release()

    def write(self, data: memoryview) -> None:
        # In part-sized pieces, so fsspec's buffer never holds more than about one part.
        for start in range(0, len(data), PART_BYTES):
            self.storage.call(self.path, self.file.write, data[start : start + PART_BYTES])

    def close(self) -> None:
        """Completes the upload: the object exists, whole, once this returns. If the last part
        fails here, the multipart upload is aborted (it would otherwise linger, billed)."""
        try:
            self.storage.call(self.path, self.file.close)
        except BaseException:
            self.abort()
            raise
        finally:
            self._release()
            _return_freed_memory()

    def abort(self) -> None:
        """Abandon the upload (a multipart upload is aborted, nothing is published); once."""
        if self._aborted:
            return
        self._aborted = True
        discard = getattr(self.file, "discard", None)
        with contextlib.suppress(Exception):  # best effort: the write already failed
            if callable(discard):
                discard()
                self.file.closed = True  # discarded: its finaliser must not try to upload again
            else:
                self.file.close()
        with contextlib.suppress(Exception):
            self.storage.fs.rm_file(self.path)
        self._release()


class FsspecStorage:
    """Storage over an fsspec filesystem; paths are that filesystem's (``bucket/key``)."""

    atomic_rename = False

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.uploads = threading.BoundedSemaphore(max(1, UPLOAD_CONCURRENCY))

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path}"

    def call(self, path: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a filesystem call; a storage fault becomes a StorageError naming the URL."""
        with typed_storage_errors(self.url(path)):
            return function(*args, **kwargs)

    def call_retrying(self, path: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """:meth:`call` for idempotent operations, retried on transient errors with backoff;
        the error left after the last attempt is typed."""
        with typed_storage_errors(self.url(path)):
            return retrying(lambda: function(*args, **kwargs))

    def _fresh(self, path: str) -> None:
        """Forget cached listings: another process (a dead save, a retention) may have changed
        the prefix, and a stale listing would show a deleted manifest or an old size."""
        self.fs.invalidate_cache(posixpath.dirname(path))
        self.fs.invalidate_cache(path)

    def exists(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.call_retrying(path, self.fs.exists, path))

    def is_dir(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.call(path, self.fs.isdir, path))

    def list_dir(self, path: str) -> list[str]:
        try:
            entries = self.call_retrying(path, self.fs.ls, path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def size(self, path: str) -> int:
        self._fresh(path)
        return int(self.call_retrying(path, self.fs.size, path))

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if not len(view):
            return
        data = self.call_retrying(
            path, self.fs.cat_file, path, start=offset, end=offset + len(view)
        )
        if len(data) != len(view):
            raise EOFError(f"{self.url(path)} ended at byte {offset + len(data)}")
        view[:] = data

    def read_range(self, path: str, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` in one ranged request, as the filesystem returned
        them (no copy); EOFError when the object is shorter."""
        if size <= 0:
            return b""
        data = self.call_retrying(path, self.fs.cat_file, path, start=offset, end=offset + size)
        if len(data) != size:
            raise EOFError(f"{self.url(path)} ended at byte {offset + len(data)}")
        return bytes(data) if not isinstance(data, bytes) else data

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
            self.call_retrying(path, self.fs.rm_file, path)

    def remove_tree(self, path: str) -> None:
        """Delete a checkpoint prefix, its manifest first so it never looks committed."""
        self.remove_file(posixpath.join(path, MANIFEST_NAME))
        with contextlib.suppress(FileNotFoundError):
            self.call(path, self.fs.rm, path, recursive=True)
        self.fs.invalidate_cache(path)

    def share_file(self, source: str, target: str) -> bool:
        """A server-side copy (S3 CopyObject / UploadPartCopy through fsspec's ``copy``): no
        byte passes through this process; the store holds a second copy of them."""
        self.call_retrying(target, self.fs.copy, source, target)
        self._fresh(target)
        return True

    def write_bytes(self, path: str, data: bytes) -> None:
        """One PUT (an object store publishes it whole or not at all)."""
        self.call_retrying(path, self.fs.pipe_file, path, data)
        self._fresh(path)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A conditional create (S3 ``If-None-Match: *``, memory://); NotImplementedError where
        the filesystem has none. A store that ignores the condition is caught by the caller's
        read-back (see manager/lease.py)."""
        try:
            self.call(path, self.fs.pipe_file, path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError) as exc:
            raise NotImplementedError(f"{self.url(path)}: no conditional create ({exc})") from exc
        finally:
            self._fresh(path)
        return True

    def modified(self, path: str) -> float | None:
        self._fresh(path)
        try:
            found = self.call_retrying(path, self.fs.find, path, detail=True, withdirs=False)
        except FileNotFoundError:
            return None
        times = [t for t in (_timestamp(info) for info in found.values()) if t is not None]
        if not times and found:
            return 0.0  # exists, but the store keeps no times: old enough for anything
        return max(times) if times else None

    def abort_stale_uploads(
        self, path: str, older_than_s: float, owned: Callable[[str], bool] = lambda key: True
    ) -> int:
        """Abort multipart uploads under ``path`` begun more than ``older_than_s`` ago (those
        of a killed writer: invisible to listings, billed until aborted) whose key relative to
        ``path`` is ``owned`` (another tool's uploads are not ours to abort). S3 only; returns
        how many were aborted."""
        call_s3 = getattr(self.fs, "call_s3", None)
        if call_s3 is None:
            return 0
        bucket, _, key = path.partition("/")
        prefix = key.rstrip("/") + "/"
        listing = self.call_retrying(
            path, call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix
        )
        aborted = 0
        cutoff = time.time() - older_than_s
        for upload in listing.get("Uploads", []):
            started = upload.get("Initiated")
            if isinstance(started, datetime.datetime) and started.timestamp() > cutoff:
                continue
            if not owned(str(upload["Key"])[len(prefix) :]):
                continue
            self.call_retrying(
                path,
                call_s3,
                "abort_multipart_upload",
                Bucket=bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )
            aborted += 1
        return aborted


def _timestamp(info: dict[str, Any]) -> float | None:
    for key in ("LastModified", "mtime", "created", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: network and server hiccups, not a refusal or a missing key.

    An error of the client library itself (botocore's timeouts and connection errors) comes
    after the client's own bounded retries: retrying it here would multiply that budget. A
    StorageError is transient when what it types is (a connection reset in an upload)."""
    if isinstance(exc, StorageError):
        cause = exc.__cause__
        return cause is not None and not isinstance(cause, StorageError) and is_transient(cause)
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    if type(exc).__module__.split(".", 1)[0] in _CLIENT_LIBRARIES:
        return False
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


_CLIENT_LIBRARIES = frozenset({"botocore", "aiobotocore", "urllib3", "requests"})
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def with_retry_budget(protocol: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` for fsspec, with the bounded S3 retry budget of the module docstring added
    where the caller (or the environment) has not chosen one; ``options`` is not modified."""
    merged = dict(options or {})
    if protocol not in S3_PROTOCOLS:
        return merged
    config = dict(merged.get("config_kwargs") or {})
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    if "AWS_MAX_ATTEMPTS" not in os.environ and "AWS_RETRY_MODE" not in os.environ:
        config.setdefault("retries", {"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
    merged["config_kwargs"] = config
    return merged


def retrying(
    function: Callable[[], Any],
    attempts: int = RETRY_ATTEMPTS,
    base_delay_s: float = RETRY_BASE_DELAY_S,
) -> Any:
    """``function()``, retried on transient errors with exponential backoff (0.2, 0.4, 0.8 s).

    Example::

        data = retrying(lambda: fs.cat_file(path))
    """
    for attempt in range(attempts):
        try:
            return function()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            time.sleep(base_delay_s * (2**attempt))
    raise AssertionError("unreachable")
