"""The validation of a manifest body read from disk (format/manifest.py parses the envelope):
every field type-checked, every file name kept inside the checkpoint, every tensor's byte range
checked against its dtype, shape and file, no two ranges overlapping, sharded tensors' chunks
tiling them (format 2) or matching their rules (format 3). Hostile until it passes; the first
violation raises CorruptCheckpointError naming the field (docs/FORMAT.md sections 4, 9, 13, 14).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from statevault.errors import CorruptCheckpointError
from statevault.format import dtypes
from statevault.format.checksum import CONTENT_HASH_PATTERN, parse_checksum
from statevault.format.geometry import Box, GeometryError, check_chunks
from statevault.format.indexed import TABLE_NAME, TABLE_RECORD, IndexTable
from statevault.format.manifest import (
    BLOCK_BYTES,
    ChunkEntry,
    FileEntry,
    Manifest,
    ShardedEntry,
    TensorEntry,
)
from statevault.format.names import is_safe_file_name
from statevault.format.quick_rows import GRAD_DTYPE_PREFIXES, tensor_entry_or_none
from statevault.format.rules import RuleError, ShardRule, parse_rule


class Validator:
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
        """A version-1 or -2 body; a version-3 body as far as it is in the manifest (its
        indexes are read and the whole validated again by format.manifest.expand_manifest)."""
        if version < 3:
            return self.body(body, version, True)
        rows = body.get("sharded") if type(body) is dict else None
        for row in rows if type(rows) is list else []:
            if type(row) is dict and "rule" in row and row.get("chunks"):
                raise self.fail("a tensor described by a rule lists chunks in the manifest")
        manifest = self.body(body, 3, False)
        manifest.indexes = self.index_table(body, manifest.ranks)
        manifest.indexed_body = body
        return manifest

    def index_table(self, body: dict[str, Any], ranks: int) -> IndexTable:
        row = self.get(body, "indexes", dict, "body")
        name = self.get(row, "name", str, "body.indexes")
        if TABLE_NAME.fullmatch(name) is None:
            raise self.fail(f"body.indexes.name {name[:80]!r} is not an index table's name")
        ctx = "body.indexes"
        table = IndexTable(name, self.count(row, "size", ctx), self.checksum(row, "checksum", ctx))
        if table.size != ranks * TABLE_RECORD.size:
            raise self.fail(f"body.indexes.size {table.size} is not {ranks} records")
        return table

    def body(
        self,
        body: Any,
        version: int,
        complete: bool,
        read_ranks: frozenset[int] | None = None,
    ) -> Manifest:
        """Validate a body: version 3 here means an expanded one (or, not ``complete``, one
        holding the rows of the indexes of ``read_ranks`` only: every piece those ranks wrote
        is checked, coverage is not)."""
        if version < 3 and type(body) is dict and "indexes" in body:
            raise self.fail("per-rank indexes need format_version 3")
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
            manifest.sharded = [
                self.sharded(r, i, tensors, version, complete, manifest.ranks, read_ranks)
                for i, r in enumerate(rows)
            ]
        elif "sharded" in body or "ranks" in body:
            raise self.fail("sharded tensors and per-rank state need format_version 2")
        return manifest

    def sharded(
        self,
        row: Any,
        index: int,
        tensors: list[TensorEntry],
        version: int,
        complete: bool,
        world: int,
        read_ranks: frozenset[int] | None,
    ) -> ShardedEntry:
        ctx = f"sharded[{index}]"
        path: str = self.get(row, "path", str, ctx)
        ctx = f"{ctx} ({path[:200]})"
        dtype_name = self.get(row, "dtype", str, ctx)
        framework = self.get(row, "framework", str, ctx)
        shape = self.shape(row, dtype_name, ctx)
        rule = self.rule(row, shape, version, world, ctx)
        chunks = []
        holders: set[int] = set()
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
            if rule is not None:
                self.rule_piece(rule, chunk, Box(offsets, stored.shape), shape, holders, where)
            chunks.append(ChunkEntry(offsets, tensor))
        boxes = [Box(c.offsets, tensors[c.tensor].shape) for c in chunks]
        try:
            check_chunks(shape, boxes, complete)
        except GeometryError as exc:
            raise self.fail(f"{ctx}: {exc}") from None
        if rule is not None and read_ranks is not None:
            self.pieces_present(rule, holders, read_ranks, ctx)
        attrs = self.attrs(row, dtype_name, ctx) if "attrs" in row else {}
        return ShardedEntry(path, framework, dtype_name, shape, tuple(chunks), attrs, rule)

    def pieces_present(
        self, rule: ShardRule, holders: set[int], read_ranks: frozenset[int], ctx: str
    ) -> None:
        """Every rank whose index was read lists the piece the rule says it wrote: a load that
        read only some indexes relies on it (a missing piece would leave a hole). Visits the
        ranks read, not the mesh: a rank restoring its own piece reads one index of 65,536."""
        for rank in sorted(read_ranks - holders):
            coordinate = rule.coordinate_of(rank)
            if coordinate is not None and rule.writes(coordinate):
                raise self.fail(f"{ctx}: rank {rank} does not list the piece at {coordinate}")

    def rule(
        self, row: dict[str, Any], shape: tuple[int, ...], version: int, world: int, ctx: str
    ) -> ShardRule | None:
        if "rule" not in row:
            return None
        if version < 3:
            raise self.fail(f"{ctx}: a sharding rule needs format_version 3")
        try:
            return parse_rule(row["rule"], shape, world)
        except RuleError as exc:
            raise self.fail(f"{ctx}.rule: {exc}") from None

    def rule_piece(
        self,
        rule: ShardRule,
        chunk: dict[str, Any],
        box: Box,
        shape: tuple[int, ...],
        holders: set[int],
        where: str,
    ) -> None:
        """A chunk of a rule-described tensor: read from the index of the rank that the rule
        says wrote it, once, and exactly the rule's piece for that rank."""
        rank = chunk.get("rank")
        coordinate = rule.coordinate_of(rank) if type(rank) is int else None
        if type(rank) is not int or coordinate is None or not rule.writes(coordinate):
            raise self.fail(f"{where}: the rule gives rank {rank} no piece to write")
        if rank in holders:
            raise self.fail(f"{where}: rank {rank} lists its piece twice")
        holders.add(rank)
        expected = rule.piece(shape, coordinate)
        if box != expected:
            raise self.fail(f"{where}: rank {rank} holds {box}, the rule gives it {expected}")

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
