"""Format 3: a distributed checkpoint whose commit record grows with its tensors, not its chunks.

``manifest.json`` keeps what every reader needs (the tree, the replicated tensors, one row per
sharded tensor with its sharding rule) and commits, through one checksum, the **index table**
(``indexes.tbl``: each rank's index size and CRC32C, 12 bytes a rank). Each rank's **index**
(``index-r<rank>.json``) holds what is inherently that rank's: the files it wrote, the rows of
its chunks and of its per-rank state. A reader that wants some boxes reads the manifest, the
table, and the indexes of the ranks whose pieces it needs (the rules say which); the chain of
checksums manifest -> table -> index -> rows -> bytes leaves no byte unverified.

Whatever a reader has read is *expanded* into the version-2 body it stands for
(:func:`expand`) and validated by the same rules as a version-2 manifest (format/manifest.py):
every hostile-input check of version 2 applies unchanged. docs/FORMAT.md section 14 is the
normative text.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from statevault.format.checksum import crc32c_of, format_checksum

INDEX_FORMAT = "statevault-index"
TABLE_RECORD = struct.Struct("<QI")  # an index's size in bytes, its CRC32C
TABLE_NAME = re.compile(r"indexes(-[0-9a-f]{8})?\.tbl")
MAX_INDEX_BYTES = 1 << 30


class IndexFormatError(ValueError):
    """An index or table that is malformed (the caller names the checkpoint)."""


@dataclass(frozen=True)
class IndexTable:
    """The manifest's ``indexes`` member: the table file and what commits it."""

    name: str
    size: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "checksum": self.checksum}


def index_name(rank: int, tag: str = "") -> str:
    """``index-r<rank><tag>.json``: what rank ``rank`` wrote of a format-3 checkpoint."""
    return f"index-r{rank:05d}{tag}.json"


def table_name(tag: str = "") -> str:
    """``indexes<tag>.tbl``: every rank's index size and CRC32C."""
    return f"indexes{tag}.tbl"


def metadata_names(manifest: Any) -> list[str]:
    """The files a format-3 checkpoint holds besides its shards and manifest: the index table
    and every rank's index (none for formats 1 and 2). ``manifest``: a format.manifest.Manifest."""
    table = manifest.indexes
    if table is None:
        return []
    tag = table_tag(table.name)
    return [table.name, *(index_name(rank, tag) for rank in range(manifest.ranks))]


def table_tag(name: str) -> str:
    """The save's object tag (``-<8 hex>``, or nothing on a local disk) in a table's name: the
    indexes carry the same."""
    return name.removeprefix("indexes").removesuffix(".tbl")


def encode_index(
    rank: int,
    files: list[dict[str, Any]],
    tensors: list[dict[str, Any]],
    chunks: list[dict[str, Any]],
    per_rank: list[Any],
    stable_files: list[str] | None = None,
) -> bytes:
    """One rank's index: compact JSON (the C encoder), ASCII. ``stable_files``: an incremental
    save's files of unchanged tensors (informative: the next save's layout hint)."""
    doc: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "rank": rank,
        "files": files,
        "tensors": tensors,
        "chunks": chunks,
        "per_rank": per_rank,
    }
    if stable_files:
        doc["stable_files"] = stable_files
    return json.dumps(doc, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def encode_table(records: Iterable[tuple[int, int]]) -> bytes:
    """The table of every rank's index, in rank order: (size, CRC32C) of each."""
    return b"".join(TABLE_RECORD.pack(size, crc) for size, crc in records)


def table_entry(name: str, data: bytes) -> IndexTable:
    return IndexTable(name, len(data), format_checksum(crc32c_of(data)))


def decode_table(data: bytes, ranks: int) -> list[tuple[int, int]]:
    """(size, CRC32C) of every rank's index; the caller has checked the table's checksum."""
    if len(data) != ranks * TABLE_RECORD.size:
        raise IndexFormatError(f"the index table holds {len(data)} bytes, not {ranks} records")
    records = [TABLE_RECORD.unpack_from(data, i * TABLE_RECORD.size) for i in range(ranks)]
    if any(size > MAX_INDEX_BYTES for size, _ in records):
        raise IndexFormatError("the index table lists an implausibly large index")
    return records


def check_index(doc: Any, rank: int) -> dict[str, Any]:
    """The structure of one index (its rows are validated once expanded)."""
    if type(doc) is not dict or doc.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"index of rank {rank} is not a statevault index")
    if doc.get("rank") != rank or type(doc.get("rank")) is not int:
        raise IndexFormatError(f"index of rank {rank} says it is rank {str(doc.get('rank'))[:20]}")
    for key in ("files", "tensors", "chunks", "per_rank"):
        if type(doc.get(key)) is not list:
            raise IndexFormatError(f"index of rank {rank}: {key} is missing or not a list")
    return doc


def expand(body: Mapping[str, Any], indexes: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """The version-2 body that ``body`` (a version-3 body) and the ``indexes`` read (by rank)
    stand for. Ranks not in ``indexes`` contribute nothing: their per-rank branches are
    :data:`UNREAD` (a node no decoder knows: picking one is an error, never a silent value)
    and their chunks are absent."""
    files = list(body["files"])
    tensors = list(body["tensors"])
    # Validated at parse (format.validator): a tensor with a rule lists no chunk in the manifest.
    sharded = [dict(row, chunks=list(row["chunks"])) for row in body["sharded"]]
    shared_files = _file_names(files)
    bases: dict[int, int] = {}
    for rank in sorted(indexes):
        index = indexes[rank]
        bases[rank] = len(tensors)
        _rows_name_own_files(index, rank, shared_files)
        files += index["files"]
        tensors += index["tensors"]
        for position, chunk in enumerate(index["chunks"]):
            where = f"index of rank {rank}: chunks[{position}]"
            if type(chunk) is not dict:
                raise IndexFormatError(f"{where} is not an object")
            number, local = chunk.get("sharded"), chunk.get("tensor")
            if type(number) is not int or not 0 <= number < len(sharded):
                raise IndexFormatError(f"{where} names no sharded tensor")
            if type(local) is not int or not 0 <= local < len(index["tensors"]):
                raise IndexFormatError(f"{where} names no tensor of its index")
            sharded[number]["chunks"].append(
                {"offsets": chunk.get("offsets"), "tensor": bases[rank] + local, "rank": rank}
            )
    tree = _expand_tree(body["tree"], body["ranks"], indexes, bases, len(body["tensors"]))
    expanded = {key: value for key, value in body.items() if key != "indexes"}
    expanded.update(files=files, tensors=tensors, sharded=sharded, tree=tree)
    stable = sorted(
        name
        for index in indexes.values()
        if type(index.get("stable_files")) is list
        for name in index["stable_files"]
        if type(name) is str
    )
    if stable and type(body.get("info")) is dict and type(body["info"].get("save")) is dict:
        # informative, per rank in the indexes: gathered as a version-2 info holds them
        save = dict(body["info"]["save"], stable_files=stable)
        expanded["info"] = dict(body["info"], save=save)
    return expanded


def _file_names(rows: list[Any]) -> set[str]:
    """The names of file rows (a forged name that is no string names no file: the validator
    refuses the row itself)."""
    return {row["name"] for row in rows if type(row) is dict and type(row.get("name")) is str}


def _rows_name_own_files(index: dict[str, Any], rank: int, shared: set[str]) -> None:
    """An index's rows lie in the manifest's files or its own, never another rank's (which a
    reader may not have read)."""
    own = _file_names(index["files"])
    for position, row in enumerate(index["tensors"]):
        name = row.get("file") if type(row) is dict else None
        if type(name) is not str or (name not in own and name not in shared):
            raise IndexFormatError(
                f"index of rank {rank}: tensors[{position}] lies in {str(name)[:80]!r}, a file "
                "neither it nor the manifest lists"
            )


UNREAD = {"$": "unread_rank"}  # a branch of a rank whose index was not read: never decoded


def _expand_tree(
    node: Any,
    ranks: int,
    indexes: Mapping[int, dict[str, Any]],
    bases: Mapping[int, int],
    main_rows: int,
) -> Any:
    """Per-rank slots replaced by every read rank's branch, its tensor ids made global; the
    manifest's own tensor ids must name the manifest's own rows."""
    if type(node) is list:
        return [_expand_tree(v, ranks, indexes, bases, main_rows) for v in node]
    if type(node) is not dict:
        return node
    if node.get("$") == "tensor":
        number = node.get("id")
        if type(number) is int and not 0 <= number < main_rows:
            raise IndexFormatError(f"the tree names tensor {number}, not a row of the manifest")
        return node
    if node.get("$") == "per_rank" and "slot" in node:
        slot = node["slot"]
        branches: list[Any] = []
        for rank in range(ranks):
            index = indexes.get(rank)
            if index is None:
                branches.append(UNREAD)
                continue
            if type(slot) is not int or not 0 <= slot < len(index["per_rank"]):
                raise IndexFormatError(
                    f"index of rank {rank} has no per-rank state {str(slot)[:20]}"
                )
            branches.append(_shift(index["per_rank"][slot], bases[rank], len(index["tensors"])))
        return {"$": "per_rank", "ranks": branches}
    return {k: _expand_tree(v, ranks, indexes, bases, main_rows) for k, v in node.items()}


def _shift(node: Any, base: int, count: int) -> Any:
    """A per-rank branch whose ``tensor`` ids count in its index, counted in the expansion."""
    if type(node) is list:
        return [_shift(v, base, count) for v in node]
    if type(node) is not dict:
        return node
    if node.get("$") == "tensor":
        local = node.get("id")
        if type(local) is not int or not 0 <= local < count:
            raise IndexFormatError(f"a per-rank branch names tensor {str(local)[:20]} of its index")
        return {"$": "tensor", "id": base + local}
    return {k: _shift(v, base, count) for k, v in node.items()}
