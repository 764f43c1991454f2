"""Ranged reads of parts of stored tensors, verified block by block.

A load into another layout (resharding) or of a subtree needs only some bytes of a tensor. The
writer records the running CRC32C of every tensor at each ``BLOCK_BYTES`` boundary, so a span is
read widened to whole blocks (the span itself straight into its destination, the parts of the
edge blocks outside it into small side buffers), the CRC is continued from the value stored at
the first block's start and compared with the value stored at the last block's end: every byte
handed out is verified, and at most two partial blocks more than asked for are read.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from statevault.engine.prefetch import REQUEST_BYTES, WINDOW_BYTES, Prefetcher
from statevault.engine.reader import CheckpointReader
from statevault.errors import CorruptCheckpointError, StorageError
from statevault.format.checksum import crc32c_of, parse_checksum
from statevault.format.manifest import BLOCK_BYTES, TensorEntry

_READ_BYTES = 16 << 20
# From an object store, a span whose edge blocks reach outside it is fetched whole, in one
# request, into a buffer (a round trip costs more than the copy), unless it is longer than this:
# then the span goes straight into its destination and the edges cost two small requests more.
WHOLE_SPAN_BYTES = 64 << 20
MIN_REQUEST_BYTES = 4 << 20  # the smallest merged request of a prefetched load


class RegionReader:
    """Reads byte spans of a checkpoint's tensors; counts what it read. Use as a context manager
    (it keeps the shard files open) from any number of threads."""

    def __init__(self, reader: CheckpointReader, verify: bool) -> None:
        self.reader = reader
        self.verify = verify
        self.bytes_read = 0
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()
        self._prefetcher: Prefetcher | None = None

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        for source in self._files.values():
            source.close()  # type: ignore[attr-defined]
        self._files.clear()

    def _source(self, name: str) -> object:
        with self._lock:
            if name not in self._files:
                try:
                    self._files[name] = self.reader._open(name)
                except StorageError:
                    raise  # the storage failed: no verdict on the bytes
                except (OSError, ValueError, Exception) as exc:  # engine.files.NotAFile among them
                    raise CorruptCheckpointError(
                        f"{self.reader.location.url}: file {name} cannot be opened ({exc})"
                    ) from None
            return self._files[name]

    def read_span(self, entry: TensorEntry, start: int, stop: int, out: memoryview) -> None:
        """Fill ``out`` with bytes [start, stop) of the tensor ``entry``, verified.

        Locally the span goes straight into ``out``; only the parts of its first and last
        blocks that lie outside it are read into side buffers (each under one block), so that
        the running CRC can be checked from the first block's start to the last block's end."""
        if stop <= start:
            return
        if not self.verify:
            self._read(entry, start, out)
            return
        first_block, last_block, low, high = _widened(entry, start, stop)
        if self._in_place(low, high):
            before = memoryview(bytearray(start - low))
            after = memoryview(bytearray(high - stop))
            self._read(entry, low, before)
            self._read(entry, start, out)
            self._read(entry, stop, after)
            parts: tuple[memoryview, ...] = (before, out, after)
        else:  # an object store: one request for the widened span, then a copy
            span = out if (low, high) == (start, stop) else memoryview(bytearray(high - low))
            self._read(entry, low, span)
            parts = (span,)
        checksum = _running_crc(entry, first_block)
        for part in parts:
            checksum = crc32c_of(part, checksum)
        if checksum != _running_crc(entry, last_block + 1):
            raise CorruptCheckpointError(
                f"{self.reader.location.url} is damaged: tensor {entry.path} in {entry.file}: "
                f"checksum mismatch in bytes [{low}, {high})"
            )
        if len(parts) == 1 and parts[0] is not out:
            out[:] = parts[0][start - low : stop - low]

    def prefetch(self, spans: Sequence[tuple[TensorEntry, int, int]]) -> None:
        """Announce the spans (tensor, start, stop) that ``read_span`` will be asked for: from
        an object store they are then fetched ahead in merged requests (``engine/prefetch``).
        Nothing changes for a local checkpoint."""
        if self.reader.location.local or self._prefetcher is not None:
            return
        ranges = [
            (entry.file, entry.offset + low, entry.offset + high)
            for entry, start, stop in spans
            for low, high in self._reads_of(entry, start, stop)
        ]
        # Requests shrink when many shards are read side by side (a job saved by many ranks):
        # about one request per shard is held partly read at any time, beside the window.
        files = max(1, len({file for file, _, _ in ranges}))
        request_bytes = max(MIN_REQUEST_BYTES, min(REQUEST_BYTES, WINDOW_BYTES // files))
        self._prefetcher = Prefetcher(
            ranges, self._fetch, request_bytes=request_bytes, window_bytes=WINDOW_BYTES
        )

    def _reads_of(self, entry: TensorEntry, start: int, stop: int) -> list[tuple[int, int]]:
        """The (start, stop) ranges ``read_span(entry, start, stop)`` reads (see there)."""
        if stop <= start:
            return []
        if not self.verify:
            return [(start, stop)]
        _, _, low, high = _widened(entry, start, stop)
        if self._in_place(low, high):
            return [(a, b) for a, b in ((low, start), (start, stop), (stop, high)) if b > a]
        return [(low, high)]

    def _in_place(self, low: int, high: int) -> bool:
        """Whether a widened span is read in three parts, the span itself in place."""
        return self.reader.location.local or high - low > WHOLE_SPAN_BYTES

    def _fetch(self, name: str, offset: int, size: int) -> bytes | bytearray | memoryview:
        source = self._source(name)
        return source.read_range(offset, size)  # type: ignore[attr-defined, no-any-return]

    def _read(self, entry: TensorEntry, start: int, out: memoryview) -> None:
        if not len(out):
            return
        prefetched = self._prefetcher
        try:
            if prefetched is not None and prefetched.read(entry.file, entry.offset + start, out):
                with self._lock:
                    self.bytes_read += len(out)
                return
        except StorageError:
            raise  # the storage failed: no verdict on the bytes
        except (OSError, EOFError) as exc:
            raise CorruptCheckpointError(
                f"{self.reader.location.url} is damaged: tensor {entry.path} in {entry.file}: "
                f"read failed ({exc})"
            ) from None
        source = self._source(entry.file)
        try:
            for done in range(0, len(out), _READ_BYTES):
                piece = out[done : done + _READ_BYTES]
                source.read_into(entry.offset + start + done, piece)  # type: ignore[attr-defined]
        except StorageError:
            raise
        except (OSError, EOFError) as exc:
            raise CorruptCheckpointError(
                f"{self.reader.location.url} is damaged: tensor {entry.path} in {entry.file}: "
                f"read failed ({exc})"
            ) from None
        with self._lock:
            self.bytes_read += len(out)


def _widened(entry: TensorEntry, start: int, stop: int) -> tuple[int, int, int, int]:
    """(first block, last block, low, high): the whole blocks holding bytes [start, stop) of
    ``entry`` (the whole tensor when it has no block checksums)."""
    first_block, last_block = start // BLOCK_BYTES, (stop - 1) // BLOCK_BYTES
    if len(entry.blocks) != entry.block_count() - 1:
        first_block, last_block = 0, entry.block_count() - 1
    low = first_block * BLOCK_BYTES
    high = min((last_block + 1) * BLOCK_BYTES, entry.nbytes)
    return first_block, last_block, low, high


def _running_crc(entry: TensorEntry, blocks_done: int) -> int:
    """The CRC32C of the tensor's first ``blocks_done`` blocks, as the writer recorded it."""
    if blocks_done == 0:
        return 0
    if blocks_done >= entry.block_count():
        return parse_checksum(entry.checksum)
    return parse_checksum(entry.blocks[blocks_done - 1])
