"""A distributed save in format 3 (format/indexed.py): each rank writes its own index, and the
coordinator commits a manifest that grows with the tensors, not with the ranks.

Each rank, once its shards are written, writes ``index-r<rank>.json``: the files holding only
its chunks and per-rank state, their rows, where its chunks lie, its per-rank subtrees. Its part
(parts.py) tells the coordinator only the index's size and CRC32C and the rows of the
replicated tensors it was dealt (those go into the manifest: every reader needs them), and, for
the few sharded tensors without a rule, where its chunks lie (their geometry is checked here,
before the commit; a rule's pieces tile their tensor by construction, and each rank checked its
own piece against the rule when it planned).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

from statevault.checkpoint.job import SaveJob
from statevault.checkpoint.parts import (
    Part,
    check_pieces_tile,
    gathered_rows,
    map_refs,
    per_rank_locals,
    shared_ids,
)
from statevault.engine.assignment import is_replicated, writer_coordinate
from statevault.engine.plan import SavePlan
from statevault.errors import DistributedSaveError
from statevault.format.checksum import crc32c_of
from statevault.format.geometry import Box
from statevault.format.indexed import encode_index, encode_table, table_entry
from statevault.format.manifest import Manifest, ShardedEntry, tensor_row_json
from statevault.format.rules import REPLICATE, ShardRule


def sharded_numbers(plan: SavePlan) -> dict[int, int]:
    """The ``sharded`` row of every sharded leaf: their order in the plan, on every rank."""
    leaves = (i for i, leaf in enumerate(plan.leaves) if leaf.shard is not None)
    return {leaf: number for number, leaf in enumerate(leaves)}


def indexed_part(job: SaveJob) -> tuple[Part, bytes]:
    """This rank's part and the bytes of its index (see the module docstring)."""
    plan = job.plan
    numbers = sharded_numbers(plan)
    main = {leaf for leaf in job.tensor_rows if is_replicated(plan, leaf)}
    main_files = {job.tensor_rows[leaf].file for leaf in main}
    local: dict[int, int] = {}
    tensors: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    irregular: dict[int, dict[str, Any]] = {}
    for leaf, row in sorted(job.tensor_rows.items()):
        if leaf in main:
            continue
        local[leaf] = len(tensors)
        tensors.append(tensor_row_json(row))
        shard = plan.leaves[leaf].shard
        if shard is not None:
            offsets = list(shard.offsets)
            chunks.append({"sharded": numbers[leaf], "offsets": offsets, "tensor": local[leaf]})
            if shard.rule is None:
                irregular[leaf] = {"offsets": offsets, "shape": list(row.shape)}
    per_rank = [_local_refs(sub, local, numbers) for sub in per_rank_locals(plan.tree)]
    files = [asdict(f) for f in job.file_rows if f.name not in main_files]
    data = encode_index(job.rank, files, tensors, chunks, per_rank, job.stable_files())
    part = Part(
        job.rank,
        files=[f for f in job.file_rows if f.name in main_files],
        rows={leaf: job.tensor_rows[leaf] for leaf in sorted(main)},
        chunks=irregular,
        timings=dict(job.timings),
        written_bytes=job.written_bytes,
        shared_bytes=job.shared_bytes,
        index=(len(data), crc32c_of(data)),
        row_bytes=sum(row.nbytes for row in job.tensor_rows.values()),
        file_bytes=sum(f.size for f in job.file_rows),
    )
    return part, data


def _local_refs(node: Any, local: dict[int, int], numbers: dict[int, int]) -> Any:
    """A per-rank subtree with its leaf numbers made ids of the index (sharded: of the
    manifest's ``sharded`` rows)."""
    return map_refs(node, local.__getitem__, numbers.__getitem__)


def merge_indexed(
    plan: SavePlan, parts: list[Part], where: str, table: str
) -> tuple[Manifest, bytes]:
    """The format-3 manifest and the index table, from every rank's part (rank order)."""
    files, tensors, row_id = gathered_rows(parts)
    shared = shared_ids(plan, parts, row_id, where)
    numbers = sharded_numbers(plan)
    sharded = [_sharded_row(plan, leaf, parts, where) for leaf in numbers]
    tree = _main_tree(plan.tree, shared, numbers)
    missing = [p.rank for p in parts if p.index is None]
    if missing:
        raise DistributedSaveError(f"{where}: ranks {missing[:8]} reported no index", missing)
    table_bytes = encode_table(p.index for p in parts if p.index is not None)
    manifest = Manifest(files, tensors, tree, plan.metadata, sharded=sharded, ranks=len(parts))
    manifest.indexes = table_entry(table, table_bytes)
    return manifest, table_bytes


def _sharded_row(plan: SavePlan, leaf_index: int, parts: list[Part], where: str) -> ShardedEntry:
    leaf = plan.leaves[leaf_index]
    assert leaf.shard is not None
    shape = leaf.shard.global_shape
    rule = leaf.shard.rule
    if rule is not None:  # the holder that writes a replicated piece (assignment.writes_chunk)
        rule = ShardRule(
            rule.mesh,
            tuple(
                (kind, writer_coordinate(leaf_index, count) if kind == REPLICATE else value)
                for (kind, value), count in zip(rule.placements, rule.mesh, strict=True)
            ),
            rule.first_rank,
            rule.ranks,
        )
    else:
        boxes = [
            Box(tuple(p.chunks[leaf_index]["offsets"]), tuple(p.chunks[leaf_index]["shape"]))
            for p in parts
            if leaf_index in p.chunks
        ]
        check_pieces_tile(leaf.path, shape, boxes, where)
    framework = leaf.adapter.framework
    attrs = dict(leaf.shard.attrs)
    return ShardedEntry(leaf.path, framework, leaf.spec.dtype, shape, (), attrs, rule)


def _main_tree(node: Any, shared: dict[int, int], numbers: dict[int, int]) -> Any:
    """The plan's tree with manifest ids, per-rank placeholders numbered as slots."""
    slots = itertools.count()
    return map_refs(
        node,
        shared.__getitem__,
        numbers.__getitem__,
        lambda: {"$": "per_rank", "slot": next(slots)},
    )
