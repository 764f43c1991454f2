"""The manifest: the commit record of one checkpoint, its JSON encoding and its validation.

On disk ``manifest.json`` is an envelope whose checksum covers the exact bytes of the body::

    {"format":"statevault","format_version":1,"checksum":"crc32c:1a2b3c4d","body":{...}}

so that any flipped bit in the body (a key name, a plain value, an offset) is detected, and a
reader that meets a newer ``format_version`` can say so before it understands anything else.
:func:`parse_manifest` treats its input as hostile: every field is type-checked, every file name
is checked to stay inside the directory, every tensor's byte range is checked against its dtype,
its shape and its file, and ranges may not overlap. docs/FORMAT.md is the normative spec.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from statevault.errors import CorruptCheckpointError, UnsupportedFormatError
from statevault.format.checksum import (
    crc32c_of,
    format_checksum,
    parse_checksum,
)
from statevault.format.indexed import IndexFormatError, IndexTable, expand
from statevault.format.rules import ShardRule

FORMAT_VERSION = 3  # the newest this code reads; writers write 1 unless a feature needs more
MAX_MANIFEST_BYTES = 1 << 30
# Tensors longer than a block carry the running CRC32C at every block boundary ("blocks"), so a
# ranged read of part of a tensor (resharding, a partial load) is verified without reading it all.
BLOCK_BYTES = 1 << 20
COMPACT_ROWS = 20_000  # tensor rows beyond which manifest.json is written without indentation
ENVELOPE_PREFIX = b'{"format":"statevault"'  # how every statevault manifest starts, damaged or not
_ENVELOPE = re.compile(
    rb'^\{"format":"statevault","format_version":(\d{1,9}),'
    rb'"checksum":"(crc32c:[0-9a-f]{8})","body":'
)
_ENVELOPE_END = re.compile(rb"\}\s*$")


@dataclass(frozen=True)
class FileEntry:
    """One payload shard: its name, total size and the checksum of its safetensors header."""

    name: str
    size: int
    header_size: int  # bytes before the data section, length prefix included
    header_checksum: str


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored array lives and what it is."""

    path: str  # key path of the (first) place it occurs in the tree
    framework: str  # "torch" | "numpy" | ...: the kind of array load gives back
    dtype: str  # a name from format.dtypes
    shape: tuple[int, ...]
    file: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    checksum: str
    attrs: dict[str, Any] = field(default_factory=dict)  # framework extras: device, requires_grad
    # The running CRC32C after each whole BLOCK_BYTES block but the last (whose running CRC is
    # ``checksum``): empty for tensors of one block.
    blocks: tuple[str, ...] = ()
    # The content hash of the bytes (format.checksum.content_hash), written by incremental saves
    # only: what the next save compares with to reuse the file instead of writing it again.
    hash: str | None = None

    def block_count(self) -> int:
        return max(1, -(-self.nbytes // BLOCK_BYTES))


@dataclass(frozen=True)
class ChunkEntry:
    """One stored piece of a sharded tensor: where it starts, and the tensor row holding it
    (whose shape is the chunk's size)."""

    offsets: tuple[int, ...]
    tensor: int


@dataclass(frozen=True)
class ShardedEntry:
    """A tensor saved in pieces by several ranks: its global shape and every chunk (format 2),
    or its sharding rule and the chunks read so far from the ranks' indexes (format 3)."""

    path: str
    framework: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkEntry, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    rule: ShardRule | None = None


@dataclass
class Manifest:
    files: list[FileEntry]
    tensors: list[TensorEntry]
    tree: Any  # a node from format.tree
    metadata: Any = None  # a node from format.tree: the user's metadata
    info: dict[str, Any] = field(default_factory=dict)  # created, versions, timings, world size
    sharded: list[ShardedEntry] = field(default_factory=list)
    ranks: int = 1  # processes that saved it: the length of every per_rank node in the tree
    # Format 3 (format/indexed.py): the index table the manifest commits, the body as read (to
    # expand with the indexes), and the ranks whose indexes this manifest holds the rows of.
    indexes: IndexTable | None = None
    indexed_body: dict[str, Any] | None = field(default=None, repr=False)
    read_ranks: frozenset[int] = frozenset()

    def total_bytes(self) -> int:
        """Bytes of the shard files (of a format-3 manifest whose indexes were not all read:
        as its writer recorded them)."""
        if not self.complete:
            save = self.info.get("save")
            recorded = save.get("file_bytes") if isinstance(save, dict) else None
            if type(recorded) is int:
                return recorded
        return sum(f.size for f in self.files)

    @property
    def format_version(self) -> int:
        """1 unless the checkpoint uses what format 2 added (sharded tensors, per-rank state);
        3 when its rows live in per-rank indexes."""
        if self.indexes is not None:
            return 3
        return 2 if self.sharded or self.ranks > 1 else 1

    @property
    def complete(self) -> bool:
        """Whether every row of the checkpoint is here (false for a format-3 manifest whose
        indexes were not all read)."""
        return self.indexes is None or len(self.read_ranks) == self.ranks


def serialize_manifest(manifest: Manifest) -> bytes:
    """The bytes of ``manifest.json``: the envelope around the exact body bytes it checksums."""
    body = {
        "info": manifest.info,
        "metadata": manifest.metadata,
        "files": [asdict(f) for f in manifest.files],
        "tensors": [tensor_row_json(t) for t in manifest.tensors],
        "tree": manifest.tree,
    }
    if manifest.format_version >= 2:
        body["ranks"] = manifest.ranks
        body["sharded"] = [_sharded_to_json(s) for s in manifest.sharded]
    if manifest.indexes is not None:
        body["indexes"] = manifest.indexes.to_json()
    # Indented for people to read; past COMPACT_ROWS rows (a job of many ranks) compact, which
    # CPython encodes in C, several times faster than the indented pure-Python path.
    large = len(manifest.tensors) > COMPACT_ROWS
    layout: dict[str, Any] = {"separators": (",", ":")} if large else {"indent": 1}
    body_bytes = json.dumps(body, ensure_ascii=True, allow_nan=False, **layout).encode("ascii")
    head = (
        f'{{"format":"statevault","format_version":{manifest.format_version},'
        f'"checksum":"{format_checksum(crc32c_of(body_bytes))}","body":'
    ).encode("ascii")
    return head + body_bytes + b"}\n"


def tensor_row_json(tensor: TensorEntry) -> dict[str, Any]:
    """A ``tensors`` row as written in manifest.json (and in distributed part reports)."""
    # Built by hand: dataclasses.asdict deep-copies every field, which dominated the writing of
    # manifests of hundreds of thousands of rows.
    row: dict[str, Any] = {
        "path": tensor.path,
        "framework": tensor.framework,
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "file": tensor.file,
        "offset": tensor.offset,
        "nbytes": tensor.nbytes,
        "checksum": tensor.checksum,
    }
    if tensor.attrs:
        row["attrs"] = copy.deepcopy(tensor.attrs)
    if tensor.blocks:
        row["blocks"] = list(tensor.blocks)
    if tensor.hash is not None:
        row["hash"] = tensor.hash
    return row


def _sharded_to_json(entry: ShardedEntry) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": entry.path,
        "framework": entry.framework,
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "chunks": [{"offsets": list(c.offsets), "tensor": c.tensor} for c in entry.chunks],
    }
    if entry.attrs:
        row["attrs"] = entry.attrs
    if entry.rule is not None:
        row["rule"] = entry.rule.to_json()
    return row


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and validate manifest bytes; ``where`` names the checkpoint in error messages.

    Raises UnsupportedFormatError for a newer format and CorruptCheckpointError for anything else
    that is wrong, before any of it is used.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{where}: manifest.json is implausibly large ({len(data)} B)")
    doc = _parse_json(data, where)
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != "statevault" or type(version) is not int:
        raise CorruptCheckpointError(f"{where}: manifest.json is not a statevault manifest")
    if version < 1:
        raise CorruptCheckpointError(f"{where}: manifest.json has invalid format_version {version}")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where} was written by a newer statevault (format version {version}; this one "
            f"reads up to {FORMAT_VERSION}): upgrade statevault to load it"
        )
    _check_body_checksum(data, where)
    from statevault.format.validator import Validator

    return Validator(where).manifest(doc.get("body"), version)


def expand_manifest(manifest: Manifest, indexes: dict[int, dict[str, Any]], where: str) -> Manifest:
    """The format-3 ``manifest`` with the rows of the ``indexes`` read (by rank; structure
    checked by format.indexed.check_index), validated as a version-2 body is; complete when
    every rank's index is given."""
    assert manifest.indexed_body is not None and manifest.indexes is not None
    from statevault.format.validator import Validator

    validator = Validator(where)
    try:
        body = expand(manifest.indexed_body, indexes)
    except IndexFormatError as exc:
        raise validator.fail(str(exc)) from None
    complete = len(indexes) == manifest.ranks
    expanded = validator.body(body, 3, complete, frozenset(indexes))
    expanded.indexes = manifest.indexes
    expanded.indexed_body = manifest.indexed_body
    expanded.read_ranks = frozenset(indexes)
    return expanded


def loads_strict(text: str) -> Any:
    """JSON as statevault reads its records (manifests, per-rank indexes): no NaN or Infinity,
    no duplicate keys (other parsers would read them otherwise). ValueError when it is not."""
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return loads_strict(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise CorruptCheckpointError(
            f"{where}: manifest.json is not valid JSON: {detail}"
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in an object")
    return result


def _check_body_checksum(data: bytes, where: str) -> None:
    head = _ENVELOPE.match(data)
    tail = _ENVELOPE_END.search(data)
    if head is None or tail is None or tail.start() < head.end():
        raise CorruptCheckpointError(f"{where}: manifest.json envelope is malformed")
    body = data[head.end() : tail.start()]
    expected = parse_checksum(head.group(2).decode("ascii"))
    if crc32c_of(body) != expected:
        raise CorruptCheckpointError(
            f"{where}: manifest.json checksum mismatch: the manifest was modified or damaged"
        )
