"""Reading a format-3 checkpoint's per-rank indexes (format/indexed.py): the table the manifest
commits, then the indexes of the ranks a reader needs, each checked against the table before it
is parsed, then the manifest expanded with their rows and validated whole.

A load on one rank of a job reads the indexes of the ranks whose pieces it restores
(:func:`ranks_for_boxes` says which); everything else (``verify``, a full load, the CLI) reads
them all. Local files are read through the checkpoint's open directory (``openat``), like the
manifest, so that an overwrite can never mix two checkpoints.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from typing import Any

from statevault.engine.parallel import map_threads
from statevault.errors import CorruptCheckpointError
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.format.indexed import (
    IndexFormatError,
    check_index,
    decode_table,
    index_name,
    table_tag,
)
from statevault.format.manifest import Manifest, expand_manifest
from statevault.storage.local import open_read, read_into_fd
from statevault.storage.location import Location

_REMOTE_READERS = 16


def with_indexes(
    location: Location, dir_fd: int | None, manifest: Manifest, ranks: Iterable[int] | None
) -> Manifest:
    """``manifest`` expanded with the indexes of ``ranks`` (None: every rank) and any it
    already holds; unchanged for a checkpoint without indexes."""
    if manifest.indexes is None:
        return manifest
    wanted = set(range(manifest.ranks)) if ranks is None else set(ranks)
    wanted |= manifest.read_ranks
    if wanted == manifest.read_ranks and manifest.read_ranks:
        return manifest
    where = location.url
    records = _table(location, dir_fd, manifest)
    tag = table_tag(manifest.indexes.name)

    def read(rank: int) -> tuple[int, dict[str, Any]]:
        size, crc = records[rank]
        data = _read(location, dir_fd, index_name(rank, tag), size)
        if crc32c_of(data) != crc:
            raise CorruptCheckpointError(
                f"{where}: {index_name(rank, tag)} checksum mismatch: the index was modified or "
                "damaged"
            )
        try:
            return rank, check_index(_strict_json(data), rank)
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where}: {index_name(rank, tag)}: {exc}") from None

    order = sorted(r for r in wanted if 0 <= r < manifest.ranks)
    threads = 1 if location.local else min(_REMOTE_READERS, max(1, len(order)))
    indexes = dict(map_threads(read, order, threads, "statevault-index"))
    return expand_manifest(manifest, indexes, where)


def _table(location: Location, dir_fd: int | None, manifest: Manifest) -> list[tuple[int, int]]:
    assert manifest.indexes is not None
    table = manifest.indexes
    data = _read(location, dir_fd, table.name, table.size)
    if format_checksum(crc32c_of(data)) != table.checksum:
        raise CorruptCheckpointError(
            f"{location.url}: {table.name} checksum mismatch: the index table was modified or "
            "damaged"
        )
    try:
        return decode_table(data, manifest.ranks)
    except IndexFormatError as exc:
        raise CorruptCheckpointError(f"{location.url}: {exc}") from None


def _read(location: Location, dir_fd: int | None, name: str, size: int) -> bytes:
    """The ``size`` bytes of ``name`` (a size the manifest or table committed); a file of
    another size is damage."""
    if dir_fd is not None:
        return _read_local(dir_fd, location.path, name, size)
    path = location.join(name).path
    try:
        actual = location.storage.size(path)
        if actual != size:
            raise CorruptCheckpointError(
                f"{location.url}: {name} holds {actual} bytes, the checkpoint says {size}"
            )
        return location.storage.read_bytes(path, 0, size)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{location.url}: {name} is missing") from None
    except EOFError as exc:
        raise CorruptCheckpointError(f"{location.url}: cannot read {name} ({exc})") from None


def _read_local(dir_fd: int, directory: str, name: str, size: int) -> bytes:
    try:  # a plain file only: opening a FIFO would block, a device would read anything
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory}: {name} is missing") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{directory}: cannot open {name} ({exc})") from None
    if not stat.S_ISREG(mode):
        raise CorruptCheckpointError(
            f"{directory}: {name} is not a regular file (a symlink, directory or device); "
            "statevault reads only plain files inside the checkpoint"
        )
    try:
        fd = open_read(name, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory}: {name} is missing") from None
    except OSError as exc:  # ELOOP: a symlink; statevault reads only plain files inside
        raise CorruptCheckpointError(f"{directory}: cannot open {name} ({exc})") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise CorruptCheckpointError(
                f"{directory}: {name} holds {actual} bytes, the checkpoint says {size}"
            )
        data = bytearray(size)
        read_into_fd(fd, 0, memoryview(data))
        return bytes(data)
    except (OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"{directory}: cannot read {name} ({exc})") from None
    finally:
        os.close(fd)


def _strict_json(data: bytes) -> Any:
    """JSON as manifests are read: no NaN or Infinity, no duplicate keys."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key in an object")
        return result

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(data.decode("ascii"), parse_constant=constant, object_pairs_hook=unique)
    except UnicodeDecodeError:
        raise ValueError("not ASCII JSON") from None
