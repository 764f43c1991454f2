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
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from statevault.errors import CorruptCheckpointError, UnsupportedFormatError
from statevault.format import dtypes
from statevault.format.checksum import (
    CONTENT_HASH_PATTERN,
    crc32c_of,
    format_checksum,
    parse_checksum,
)
from statevault.format.geometry import Box, GeometryError, check_chunks
from statevault.format.names import is_safe_file_name
from statevault.format.quick_rows import GRAD_DTYPE_PREFIXES, tensor_entry_or_none

FORMAT_VERSION = 2  # the newest this code reads; writers write 1 unless a feature needs 2
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
    """A tensor saved in pieces by several ranks: its global shape and every chunk (format 2)."""

    path: str
    framework: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkEntry, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    files: list[FileEntry]
    tensors: list[TensorEntry]
    tree: Any  # a node from format.tree
    metadata: Any = None  # a node from format.tree: the user's metadata
    info: dict[str, Any] = field(default_factory=dict)  # created, versions, timings, world size
    sharded: list[ShardedEntry] = field(default_factory=list)
    ranks: int = 1  # processes that saved it: the length of every per_rank node in the tree

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def format_version(self) -> int:
        """1 unless the checkpoint uses what format 2 added (sharded tensors, per-rank state)."""
        return 2 if self.sharded or self.ranks > 1 else 1


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
    return _Validator(where).manifest(doc.get("body"), version)


def _parse_json(data: bytes, where: str) -> Any:
    try:
        # Strict JSON: no NaN/Infinity, no duplicate keys (other parsers would read them otherwise).
        return json.loads(
            data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
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


class _Validator:
    """Type and range checks of a parsed body; raises CorruptCheckpointError naming the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, detail: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: invalid manifest: {detail}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], ctx: str) -> Any:
        if type(obj) is not dict:
            raise self.fail(f"{ctx} is not an object")
        value = obj.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if type(value) not in kinds:
            raise self.fail(f"{ctx}.{key} is missing or not a {kinds[0].__name__}")
        return value

    def count(self, obj: Any, key: str, ctx: str) -> int:
        value: int = self.get(obj, key, int, ctx)
        if value < 0:
            raise self.fail(f"{ctx}.{key} is negative")
        return value

    def manifest(self, body: Any, version: int) -> Manifest:
        files = [self.file(f, i) for i, f in enumerate(self.get(body, "files", list, "body"))]
        by_name = {f.name: f for f in files}
        if len(by_name) != len(files):
            raise self.fail("a file is listed twice")
        rows = self.get(body, "tensors", list, "body")
        tensors = [self.tensor(t, i, by_name) for i, t in enumerate(rows)]
        self.no_overlaps(tensors, by_name)
        info = self.get(body, "info", dict, "body")
        for key in ("tree", "metadata"):
            if key not in body:
                raise self.fail(f"body.{key} is missing")
        manifest = Manifest(files, tensors, body.get("tree"), body.get("metadata"), info)
        if version >= 2:
            manifest.ranks = self.count(body, "ranks", "body")
            if not 1 <= manifest.ranks <= 1 << 20:
                raise self.fail(f"body.ranks {manifest.ranks} is out of range")
            rows = self.get(body, "sharded", list, "body")
            manifest.sharded = [self.sharded(r, i, tensors) for i, r in enumerate(rows)]
        elif "sharded" in body or "ranks" in body:
            raise self.fail("sharded tensors and per-rank state need format_version 2")
        return manifest

    def sharded(self, row: Any, index: int, tensors: list[TensorEntry]) -> ShardedEntry:
        ctx = f"sharded[{index}]"
        path: str = self.get(row, "path", str, ctx)
        ctx = f"{ctx} ({path[:200]})"
        dtype_name = self.get(row, "dtype", str, ctx)
        framework = self.get(row, "framework", str, ctx)
        shape = self.shape(row, dtype_name, ctx)
        chunks = []
        for position, chunk in enumerate(self.get(row, "chunks", list, ctx)):
            where = f"{ctx}.chunks[{position}]"
            tensor = self.count(chunk, "tensor", where)
            offsets = tuple(self.get(chunk, "offsets", list, where))
            if tensor >= len(tensors):
                raise self.fail(f"{where}: tensor {tensor} is not listed in tensors")
            stored = tensors[tensor]
            if stored.dtype != dtype_name or stored.framework != framework:
                raise self.fail(f"{where}: stored as {stored.dtype}, the tensor is {dtype_name}")
            if any(type(o) is not int for o in offsets):
                raise self.fail(f"{where}: offsets must be ints")
            chunks.append(ChunkEntry(offsets, tensor))
        boxes = [Box(c.offsets, tensors[c.tensor].shape) for c in chunks]
        try:
            check_chunks(shape, boxes)
        except GeometryError as exc:
            raise self.fail(f"{ctx}: {exc}") from None
        attrs = self.attrs(row, dtype_name, ctx) if "attrs" in row else {}
        return ShardedEntry(path, framework, dtype_name, shape, tuple(chunks), attrs)

    def shape(self, row: Any, dtype_name: str, ctx: str) -> tuple[int, ...]:
        if dtype_name not in dtypes.DTYPES:
            raise self.fail(f"{ctx}: unknown dtype {dtype_name[:40]!r}")
        shape = tuple(self.get(row, "shape", list, ctx))
        if any(type(d) is not int or d < 0 for d in shape) or len(shape) > 64:
            raise self.fail(f"{ctx}: shape must be at most 64 non-negative ints")
        if math.prod(max(d, 1) for d in shape) * dtypes.lookup(dtype_name).itemsize >= 1 << 63:
            raise self.fail(f"{ctx}: shape is too large for any array")
        return shape

    def file(self, row: Any, index: int) -> FileEntry:
        ctx = f"files[{index}]"
        name = self.get(row, "name", str, ctx)
        if not is_safe_file_name(name):
            raise self.fail(
                f"{ctx}.name {name[:80]!r} is not a plain file name inside the checkpoint"
            )
        entry = FileEntry(
            name=name,
            size=self.count(row, "size", ctx),
            header_size=self.count(row, "header_size", ctx),
            header_checksum=self.checksum(row, "header_checksum", ctx),
        )
        if not 8 <= entry.header_size <= entry.size:
            raise self.fail(f"{ctx}: header size {entry.header_size} outside the file")
        return entry

    def checksum(self, row: Any, key: str, ctx: str) -> str:
        text: str = self.get(row, key, str, ctx)
        try:
            parse_checksum(text)
        except ValueError as exc:
            raise self.fail(f"{ctx}.{key}: {exc}") from None
        return text

    def tensor(self, row: Any, index: int, files: dict[str, FileEntry]) -> TensorEntry:
        quick = tensor_entry_or_none(row, files, BLOCK_BYTES)  # the common case, no error text
        if quick is not None:
            return quick
        return self.tensor_checked(row, index, files)

    def tensor_checked(self, row: Any, index: int, files: dict[str, FileEntry]) -> TensorEntry:
        """The tensor rule, step by step: raises naming the first field that is wrong."""
        ctx = f"tensors[{index}]"
        path: str = self.get(row, "path", str, ctx)
        ctx = f"{ctx} ({path[:200]})"
        dtype_name = self.get(row, "dtype", str, ctx)
        shape = self.shape(row, dtype_name, ctx)
        file_name = self.get(row, "file", str, ctx)
        if file_name not in files:
            raise self.fail(f"{ctx}: file {file_name[:80]!r} is not listed in files")
        entry = TensorEntry(
            path=path,
            framework=self.get(row, "framework", str, ctx),
            dtype=dtype_name,
            shape=shape,
            file=file_name,
            offset=self.count(row, "offset", ctx),
            nbytes=self.count(row, "nbytes", ctx),
            checksum=self.checksum(row, "checksum", ctx),
            attrs=self.attrs(row, dtype_name, ctx),
            blocks=self.blocks(row, ctx),
            hash=self.content_hash(row, ctx),
        )
        expected = math.prod(shape) * dtypes.lookup(dtype_name).itemsize
        if expected != entry.nbytes:
            raise self.fail(
                f"{ctx}: {entry.nbytes} bytes do not match dtype {dtype_name} "
                f"and shape {list(shape)} ({expected} bytes)"
            )
        if entry.blocks and len(entry.blocks) != entry.block_count() - 1:
            raise self.fail(
                f"{ctx}: {len(entry.blocks)} block checksums for {entry.block_count()} blocks"
            )
        file = files[file_name]
        if entry.offset < file.header_size or entry.offset + entry.nbytes > file.size:
            raise self.fail(f"{ctx}: byte range lies outside {file_name}")
        return entry

    def content_hash(self, row: dict[str, Any], ctx: str) -> str | None:
        if "hash" not in row:
            return None
        text: str = self.get(row, "hash", str, ctx)
        if CONTENT_HASH_PATTERN.fullmatch(text) is None:
            raise self.fail(f"{ctx}.hash is not an xxh3_128 content hash")
        return text

    def blocks(self, row: dict[str, Any], ctx: str) -> tuple[str, ...]:
        if "blocks" not in row:
            return ()
        items = self.get(row, "blocks", list, ctx)
        return tuple(self.checksum({"b": item}, "b", f"{ctx}.blocks") for item in items)

    def attrs(self, row: dict[str, Any], dtype_name: str, ctx: str) -> dict[str, Any]:
        attrs = self.get(row, "attrs", dict, ctx) if "attrs" in row else {}
        for key in ("parameter", "requires_grad"):
            if type(attrs.get(key, False)) is not bool:
                raise self.fail(f"{ctx}.attrs.{key} is not a bool")
        if attrs.get("requires_grad") and not dtype_name.startswith(GRAD_DTYPE_PREFIXES):
            raise self.fail(f"{ctx}: a {dtype_name} tensor cannot require gradients")
        return attrs

    def no_overlaps(self, tensors: list[TensorEntry], files: dict[str, FileEntry]) -> None:
        ranges = sorted(
            (t.file, t.offset, t.offset + t.nbytes, t.path) for t in tensors if t.nbytes
        )
        for before, after in itertools.pairwise(ranges):
            if before[0] == after[0] and after[1] < before[2]:
                raise self.fail(f"tensors {before[3]} and {after[3]} overlap in {before[0]}")
