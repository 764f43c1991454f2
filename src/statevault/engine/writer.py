"""Write: stream staged leaves into safetensors shards, checksumming each chunk as it goes.

Large leaves are written in chunks straight from the staged buffers (the chunk's checksum is
computed just before it is written, while it is hot in cache: no separate pass over memory);
small leaves are coalesced into one buffer so a shard of many tiny tensors costs few syscalls.
Files are written in parallel threads (writes and CRC32C release the GIL) and fsynced once each.
On a local filesystem that accepts it, a shard goes out with O_DIRECT through aligned bounce
buffers (engine/direct_io: measured steadier and faster than the page cache on the development
VM); elsewhere, or with ``STATEVAULT_DIRECT_IO=0``, through the page cache.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Container, Sequence
from dataclasses import dataclass

from statevault.engine import direct_io
from statevault.engine.cancel import Cancel
from statevault.engine.parallel import run_parallel
from statevault.format import dtypes
from statevault.format.checksum import ContentHasher, content_hash, crc32c_of, format_checksum
from statevault.format.manifest import BLOCK_BYTES, FileEntry, TensorEntry
from statevault.format.safetensors_io import HeaderEntry, encode_header
from statevault.storage.base import Storage, WriteHandle

CHUNK_BYTES = 16 * BLOCK_BYTES  # a write; it ends on a block boundary
COALESCE_BYTES = 4 << 20


@dataclass(frozen=True)
class PendingTensor:
    """A staged leaf on its way into a file."""

    path: str
    framework: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    attrs: dict[str, object]


def write_files(
    storage: Storage,
    directory: str,
    files: Sequence[tuple[str, Sequence[PendingTensor]]],
    shard_metadata: dict[str, str],
    cancel: Cancel | None = None,
    hashed: Container[str] = frozenset(),
) -> tuple[list[FileEntry], list[list[TensorEntry]]]:
    """Write every (file name, tensors) in parallel; return the file rows and tensor rows.
    Once ``cancel`` is set, each writer stops before its next chunk (SaveAbandoned).
    ``hashed``: the names of the files whose rows also get their content hash (the stable
    files of an incremental save), computed block by block as it is written, like the CRC."""
    if not files:
        return [], []
    cancel = cancel or Cancel()
    calls = [
        functools.partial(
            _call_write_file,
            storage,
            f"{directory}/{name}",
            name,
            tensors,
            shard_metadata,
            cancel,
            name in hashed,
        )
        for name, tensors in files
    ]
    results = run_parallel(calls, "statevault-write", cancel)
    return [r[0] for r in results], [r[1] for r in results]


def _call_write_file(
    storage: Storage,
    path: str,
    name: str,
    tensors: Sequence[PendingTensor],
    shard_metadata: dict[str, str],
    cancel: Cancel,
    content_hashes: bool,
) -> tuple[FileEntry, list[TensorEntry]]:
    # Looked up at call time so that tests can inject faults by patching ``write_file``.
    return write_file(storage, path, name, tensors, shard_metadata, cancel, content_hashes)


def write_file(
    storage: Storage,
    path: str,
    name: str,
    tensors: Sequence[PendingTensor],
    shard_metadata: dict[str, str],
    cancel: Cancel | None = None,
    content_hashes: bool = False,
) -> tuple[FileEntry, list[TensorEntry]]:
    header = shard_header(tensors, shard_metadata)
    size = len(header) + sum(len(t.data) for t in tensors)
    cancel = cancel or Cancel()
    cancel.check()
    with storage.open_write(path) as handle:
        direct = direct_io.open_sink(handle, size)  # None: buffered writes (see direct_io)
        with direct if direct is not None else contextlib.nullcontext():
            out = direct or handle
            sink = _CoalescingSink(out, COALESCE_BYTES if direct is None else 0, cancel)
            sink.content_hashes = content_hashes
            rows = _write_payload(sink, header, name, tensors)
    return FileEntry(name, size, len(header), format_checksum(crc32c_of(header))), rows


def shard_header(tensors: Sequence[PendingTensor], shard_metadata: dict[str, str]) -> bytes:
    """The safetensors header of a shard of ``tensors`` (its first bytes)."""
    return encode_header(_header_entries(tensors), shard_metadata)


def _write_payload(
    sink: _CoalescingSink, header: bytes, name: str, tensors: Sequence[PendingTensor]
) -> list[TensorEntry]:
    """Write the header, then every tensor (checksummed as it goes); return the tensor rows."""
    rows: list[TensorEntry] = []
    offset = len(header)
    sink.handle.write(memoryview(header))
    for tensor in tensors:
        checksum, blocks, content = sink.write_checksummed(tensor.data)
        rows.append(
            TensorEntry(
                path=tensor.path,
                framework=tensor.framework,
                dtype=tensor.dtype,
                shape=tensor.shape,
                file=name,
                offset=offset,
                nbytes=len(tensor.data),
                checksum=format_checksum(checksum),
                attrs=dict(tensor.attrs),
                blocks=tuple(format_checksum(b) for b in blocks),
                hash=content,
            )
        )
        offset += len(tensor.data)
    sink.flush()
    return rows


def _header_entries(tensors: Sequence[PendingTensor]) -> list[HeaderEntry]:
    entries: list[HeaderEntry] = []
    begin = 0
    used = {"__metadata__"}  # reserved by safetensors for the header's own metadata
    for tensor in tensors:
        row = dtypes.lookup(tensor.dtype)
        shape = tensor.shape if row.safetensors is not None else (len(tensor.data),)
        name = tensor.path
        suffix = 1
        while name in used:  # key paths are unique except for exotic keys like 0 and "0"
            name, suffix = f"{tensor.path}#{suffix}", suffix + 1
        used.add(name)
        entries.append(
            HeaderEntry(name, dtypes.safetensors_code(row), shape, begin, begin + len(tensor.data))
        )
        begin += len(tensor.data)
    return entries


class _CoalescingSink:
    """Small tensors are gathered into one buffer up to ``coalesce`` bytes (0: never, for a
    direct sink, which buffers everything itself)."""

    def __init__(
        self, handle: WriteHandle | direct_io.DirectSink, coalesce: int, cancel: Cancel
    ) -> None:
        self.handle = handle
        self.coalesce = coalesce
        self.cancel = cancel
        self.buffer = bytearray()
        self.content_hashes = False

    def write_checksummed(self, data: memoryview) -> tuple[int, list[int], str | None]:
        """Write ``data``; return its CRC32C, the running CRC at each inner block boundary
        (computed block by block just before each chunk is written, while it is hot) and, with
        ``content_hashes``, its content hash (computed the same way)."""
        if len(data) < self.coalesce:
            self.buffer += data
            if len(self.buffer) >= self.coalesce:
                self.flush()
            content = content_hash(data) if self.content_hashes else None
            return (*_running_crcs(data, 0, len(data), 0, []), content)
        self.flush()
        checksum = 0
        boundaries: list[int] = []
        hasher = ContentHasher() if self.content_hashes else None
        for start in range(0, len(data), CHUNK_BYTES):
            end = min(start + CHUNK_BYTES, len(data))
            checksum, boundaries = _running_crcs(data, start, end, checksum, boundaries, hasher)
            self.cancel.check()
            self.handle.write(data[start:end])
        return checksum, boundaries, hasher.text() if hasher is not None else None

    def flush(self) -> None:
        if self.buffer:
            self.cancel.check()
            self.handle.write(memoryview(self.buffer))
            self.buffer = bytearray()


def _running_crcs(
    data: memoryview,
    start: int,
    end: int,
    checksum: int,
    boundaries: list[int],
    hasher: ContentHasher | None = None,
) -> tuple[int, list[int]]:
    """Continue the CRC of ``data`` over [start, end) (block-aligned ``start``), appending the
    running CRC at every block boundary strictly inside ``data``; feed ``hasher`` the same
    blocks (block by block, while each is in the cache: a third cheaper than a second pass
    over the chunk)."""
    for block in range(start, end, BLOCK_BYTES):
        piece = data[block : min(block + BLOCK_BYTES, end)]
        checksum = crc32c_of(piece, checksum)
        if hasher is not None:
            hasher.update(piece)
        if block + BLOCK_BYTES < len(data):
            boundaries.append(checksum)
    return checksum, boundaries
