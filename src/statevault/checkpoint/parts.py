"""Parts: what each rank reports of its share of a distributed save, and the merge into one
manifest.

Every rank writes its shard files, then a small part object beside them
(``part-r<rank><tag>.json``): the files, the tensor rows of the leaves it wrote, the geometry of
its chunks and its per-rank subtrees. The coordinator (rank 0) collects the parts from the
storage itself, so that committing needs no collective call from a background thread; it
merges them (:func:`merge`), checks every sharded tensor's chunk geometry, deletes the parts and
writes the manifest. Parts are read as untrusted JSON: a malformed one fails the save.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from statevault.checkpoint.job import SaveJob
from statevault.engine.plan import SavePlan
from statevault.errors import DistributedSaveError
from statevault.format.geometry import Box, GeometryError, check_chunks
from statevault.format.manifest import (
    ChunkEntry,
    FileEntry,
    Manifest,
    ShardedEntry,
    TensorEntry,
    tensor_row_json,
)
from statevault.format.names import part_name, part_rank


@dataclass
class Part:
    """One rank's report. ``error`` is set instead of the rest when the rank's share failed."""

    rank: int
    error: str | None = None
    files: list[FileEntry] = field(default_factory=list)
    rows: dict[int, TensorEntry] = field(default_factory=dict)  # leaf index -> its row
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)  # leaf -> geometry
    per_rank: list[Any] = field(default_factory=list)  # this rank's per-rank subtrees, in order
    timings: dict[str, float] = field(default_factory=dict)
    written_bytes: int = 0  # bytes of the files it wrote
    shared_bytes: int = 0  # bytes of the files it shared with the previous checkpoint
    stable_files: list[str] = field(default_factory=list)  # files of unchanged tensors only
    # Format 3: the size and CRC32C of the index this rank wrote, and the bytes of its rows.
    index: tuple[int, int] | None = None
    row_bytes: int = 0
    file_bytes: int = 0  # of every file it wrote or shared

    def to_json(self) -> bytes:
        doc = {
            "rank": self.rank,
            "error": self.error,
            "files": [asdict(f) for f in self.files],
            "rows": {str(k): tensor_row_json(v) for k, v in self.rows.items()},
            "chunks": {str(k): v for k, v in self.chunks.items()},
            "per_rank": self.per_rank,
            "timings": self.timings,
            "written_bytes": self.written_bytes,
            "shared_bytes": self.shared_bytes,
            "stable_files": self.stable_files,
            "index": None if self.index is None else list(self.index),
            "row_bytes": self.row_bytes,
            "file_bytes": self.file_bytes,
        }
        return json.dumps(doc, allow_nan=False).encode("ascii")


def part_from_json(data: bytes, rank: int) -> Part:
    try:
        doc = json.loads(data)
        if doc["rank"] != rank:
            raise ValueError(f"says it is rank {doc['rank']}")
        return Part(
            rank=rank,
            error=None if doc["error"] is None else str(doc["error"]),
            files=[FileEntry(**f) for f in doc["files"]],
            rows={int(k): _row(v) for k, v in doc["rows"].items()},
            chunks={int(k): dict(v) for k, v in doc["chunks"].items()},
            per_rank=list(doc["per_rank"]),
            timings={str(k): float(v) for k, v in doc["timings"].items()},
            written_bytes=int(doc.get("written_bytes", 0)),
            shared_bytes=int(doc.get("shared_bytes", 0)),
            stable_files=[str(name) for name in doc.get("stable_files", [])],
            index=None
            if doc.get("index") is None
            else (int(doc["index"][0]), int(doc["index"][1])),
            row_bytes=int(doc.get("row_bytes", 0)),
            file_bytes=int(doc.get("file_bytes", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DistributedSaveError(
            f"the part written by rank {rank} is malformed ({exc})"
        ) from None


def _row(doc: dict[str, Any]) -> TensorEntry:
    doc = dict(doc)
    doc["shape"] = tuple(doc["shape"])
    doc["blocks"] = tuple(doc.get("blocks", ()))
    return TensorEntry(**doc)


def per_rank_locals(tree: Any) -> list[Any]:
    """This rank's per-rank subtrees, in the order :func:`merge` meets their placeholders."""
    found: list[Any] = []

    def walk(value: Any) -> None:
        if type(value) is list:
            for item in value:
                walk(item)
        elif type(value) is dict:
            if value.get("$") == "per_rank" and "local" in value:
                found.append(value["local"])
                return
            for item in value.values():
                walk(item)

    walk(tree)
    return found


def merge(plan: SavePlan, parts: list[Part], where: str) -> Manifest:
    """One manifest from every rank's part; ``plan`` is the coordinator's own (the shared part
    of the tree is the same on every rank: checked before anything was written)."""
    files, tensors, row_id = gathered_rows(parts)
    shared_id = shared_ids(plan, parts, row_id, where)
    sharded, sharded_id = _sharded_entries(plan, parts, tensors, row_id, where)

    tree = _rewrite(plan.tree, 0, plan.shared_count, shared_id, sharded_id, row_id, parts)
    return Manifest(files, tensors, tree, plan.metadata, sharded=sharded, ranks=len(parts))


def gathered_rows(
    parts: list[Part],
) -> tuple[list[FileEntry], list[TensorEntry], dict[tuple[int, int], int]]:
    """Every part's files (by name) and tensor rows (rank order), and the manifest id of each
    ``(rank, leaf)`` row."""
    files = sorted((f for part in parts for f in part.files), key=lambda f: f.name)
    tensors: list[TensorEntry] = []
    row_id: dict[tuple[int, int], int] = {}
    for part in parts:
        for leaf, row in sorted(part.rows.items()):
            row_id[(part.rank, leaf)] = len(tensors)
            tensors.append(row)
    return files, tensors, row_id


def check_pieces_tile(path: str, shape: tuple[int, ...], boxes: list[Box], where: str) -> None:
    """The pieces of a sharded tensor the ranks saved must tile its global shape."""
    try:
        check_chunks(shape, boxes)
    except GeometryError as exc:
        raise DistributedSaveError(
            f"{where}: the pieces of {path} saved by the ranks do not tile its shape "
            f"{list(shape)}: {exc}"
        ) from None


def shared_ids(
    plan: SavePlan, parts: list[Part], row_id: dict[tuple[int, int], int], where: str
) -> dict[int, int]:
    """The tensor id of every replicated leaf: exactly one rank must have written it. One
    pass over the rows (not over the ranks per leaf: 65,536 ranks times 100 leaves)."""
    by_leaf: dict[int, list[int]] = {}
    for rank, leaf in sorted(row_id):
        by_leaf.setdefault(leaf, []).append(rank)
    ids: dict[int, int] = {}
    for leaf_index in range(plan.shared_count):
        if plan.leaves[leaf_index].shard is not None:
            continue
        writers = by_leaf.get(leaf_index, [])
        if len(writers) != 1:
            raise DistributedSaveError(
                f"{where}: tensor {plan.leaves[leaf_index].path} was written by ranks {writers}, "
                "not by exactly one"
            )
        ids[leaf_index] = row_id[(writers[0], leaf_index)]
    return ids


def _sharded_entries(
    plan: SavePlan,
    parts: list[Part],
    tensors: list[TensorEntry],
    row_id: dict[tuple[int, int], int],
    where: str,
) -> tuple[list[ShardedEntry], dict[int, int]]:
    entries: list[ShardedEntry] = []
    ids: dict[int, int] = {}
    for leaf_index, leaf in enumerate(plan.leaves):
        if leaf.shard is None:
            continue
        chunks = [
            ChunkEntry(tuple(p.chunks[leaf_index]["offsets"]), row_id[(p.rank, leaf_index)])
            for p in parts
            if leaf_index in p.chunks
        ]
        shape = leaf.shard.global_shape
        check_pieces_tile(
            leaf.path, shape, [Box(c.offsets, tensors[c.tensor].shape) for c in chunks], where
        )
        ids[leaf_index] = len(entries)
        entries.append(
            ShardedEntry(
                leaf.path,
                leaf.adapter.framework,
                leaf.spec.dtype,
                shape,
                tuple(chunks),
                dict(leaf.shard.attrs),
            )
        )
    return entries, ids


def map_refs(
    node: Any,
    tensor: Callable[[int], int],
    sharded: Callable[[int], int],
    per_rank: Callable[[], Any] | None = None,
) -> Any:
    """A plan tree rebuilt with each ``tensor`` and ``sharded`` reference's leaf number mapped
    to its id, and each per-rank placeholder (in tree order) replaced by what ``per_rank``
    returns (walked through like any node when None)."""

    def walk(value: Any) -> Any:
        if type(value) is list:
            return [walk(v) for v in value]
        if type(value) is not dict:
            return value
        tag = value.get("$")
        if tag == "tensor":
            return {"$": "tensor", "id": tensor(value["id"])}
        if tag == "sharded":
            return {"$": "sharded", "id": sharded(value["id"])}
        if tag == "per_rank" and "local" in value and per_rank is not None:
            return per_rank()
        return {k: walk(v) for k, v in value.items()}

    return walk(node)


def _rewrite(
    node: Any,
    rank: int,
    shared_count: int,
    shared_id: dict[int, int],
    sharded_id: dict[int, int],
    row_id: dict[tuple[int, int], int],
    parts: list[Part],
) -> Any:
    """Replace leaf numbers by manifest ids, and per-rank placeholders by every rank's branch
    (its leaves are rows of the rank that owns the branch)."""
    slots = itertools.count()

    def tensor(leaf: int) -> int:
        return shared_id[leaf] if leaf < shared_count else row_id[(rank, leaf)]

    def every_rank() -> dict[str, Any]:
        slot = next(slots)
        branches = []
        for part in parts:
            local = part.per_rank[slot] if slot < len(part.per_rank) else None
            if local is None:
                raise DistributedSaveError(f"rank {part.rank} sent no per-rank state {slot}")
            branches.append(
                _rewrite(local, part.rank, shared_count, shared_id, sharded_id, row_id, parts)
            )
        return {"$": "per_rank", "ranks": branches}

    return map_refs(node, tensor, sharded_id.__getitem__, every_rank)


# ---- the parts on the storage ------------------------------------------------------------


def part_of(job: SaveJob) -> Part:
    chunks = {
        leaf: {"offsets": list(job.plan.leaves[leaf].shard.offsets)}  # type: ignore[union-attr]
        for leaf in job.tensor_rows
        if job.plan.leaves[leaf].shard is not None
    }
    return Part(
        job.rank,
        files=list(job.file_rows),
        rows=dict(job.tensor_rows),
        chunks=chunks,
        per_rank=per_rank_locals(job.plan.tree),
        timings=dict(job.timings),
        written_bytes=job.written_bytes,
        shared_bytes=job.shared_bytes,
        stable_files=job.stable_files(),
    )


def write_part(job: SaveJob, part: Part) -> None:
    path = job.written.join(part_name(part.rank, job.committer.shard_tag())).path
    job.written.storage.write_bytes(path, part.to_json())  # appears whole: rank 0 polls for it


def collect_parts(job: SaveJob, world: int, timeout_s: float) -> list[Part]:
    """Every other rank's part, read from the storage as it appears; a failed rank's part or
    the timeout ends the wait with DistributedSaveError."""
    tag = job.committer.shard_tag()
    storage, directory = job.written.storage, job.written.path
    found: dict[int, Part] = {}
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    while len(found) < world - 1:
        for name in storage.list_dir(directory):
            rank = part_rank(name, tag)
            if rank is None or rank in found or not 0 < rank < world:
                continue
            path = job.written.join(name).path
            part = part_from_json(storage.read_bytes(path, 0, storage.size(path)), rank)
            if part.error is not None:
                raise DistributedSaveError(f"rank {rank} failed: {part.error}", [rank])
            found[rank] = part
        if len(found) < world - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, world)) - set(found))
                raise DistributedSaveError(
                    f"ranks {missing[:16]} did not finish their share within {timeout_s:.0f} s "
                    "(dead or stuck); nothing was committed",
                    missing,
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
    return [found[rank] for rank in range(1, world)]


def remove_parts(job: SaveJob, world: int) -> None:
    tag = job.committer.shard_tag()
    for rank in range(1, world):
        job.written.storage.remove_file(job.written.join(part_name(rank, tag)).path)
