"""Reading a format-3 checkpoint's per-rank indexes (format/indexed.py): the table the manifest
commits, then the indexes of the ranks a reader needs, each checked against the table before it
is parsed, then the manifest expanded with their rows and validated whole.

A load on one rank of a job reads the indexes of the ranks whose pieces it restores
(:func:`ranks_for_boxes` says which); everything else (``verify``, a full load, the CLI) reads
them all. Local files are read through the checkpoint's open directory (``openat``), like the
manifest, so that an overwrite can never mix two checkpoints.
"""

from __future__ import annotations

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
from statevault.format.manifest import Manifest, expand_manifest, loads_strict
from statevault.storage.local import read_plain_file
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
            return rank, check_index(strict_json(data), rank)
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
    def refuse_other_size(actual: int) -> None:
        if actual != size:
            raise CorruptCheckpointError(
                f"{directory}: {name} holds {actual} bytes, the checkpoint says {size}"
            )

    try:
        return read_plain_file(dir_fd, directory, name, refuse_other_size)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{directory}: {name} is missing") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{directory}: cannot open {name} ({exc})") from None


def strict_json(data: bytes) -> Any:
    """An index's JSON, read as manifests are (format.manifest.loads_strict), ASCII only."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII JSON") from None
    return loads_strict(text)
