"""Distributed saves: what a format-3 save costs at 1,024, 8,192 and 65,536 simulated ranks, and
real gloo runs against torch.distributed.checkpoint (DCP). Issues 4 ("Scale") and 17 (format 3).

Part 1 (one process, no process group): each rank of an FSDP-style job (a Llama-like model whose
parameters and both Adam moments are sharded on dim 0 over every rank, ``ShardInfo.rule`` the
dim-0 rule ``ShardRule((world,), (("shard", 0),))`` as the DTensor adapter sets it, the
optimizer's ``step`` scalars replicated, a small per-rank RNG state) gets its own SavePlan of
numpy leaves (zero-stride views: no data is allocated) and runs what a rank runs for a save:
``plan_digest`` (the agreement), ``leaves_to_write`` (its share), the file grouping
(``Saver.rank_files``, twice: the second save reuses the assignment), and ``indexed_part`` +
``Part.to_json`` (its index and the part it sends). The rows a real write would return are made
up with plausible values (offsets, checksums). Then the coordinator's work, on every rank's part
bytes: ``part_from_json`` for each, ``merge_indexed`` (the format-3 manifest and the index
table), ``serialize_manifest``; and what a restoring rank at the same world size reads and does:
``parse_manifest``, the table (checksum, ``decode_table``), its own index (checksum, JSON,
``check_index``), the ranks its boxes need (``rule.overlapping``: only its own), and
``expand_manifest`` with its own index.

Worlds above ``--sample-above`` ranks plan a sample (``--sample-ranks``, evenly spread, plus
every rank dealt a replicated leaf and the first rank of every kind of piece layout); every
other rank's part is synthesized from the nearest lower planned rank of the same kind (its
rank replaced; its index size copied, its index CRC made up). The output says which figures
come from sampled ranks. Format-2 figures are no longer produced: benchmarks/README.md keeps
them ("Distributed saves at scale (issue 4)").

Part 2 (spawned gloo ranks, 2 and 4): an FSDP2 (``fully_shard``) model with AdamW state, saved
and loaded by statevault (``sv.save`` / ``sv.load(into=...)``) and by DCP (``get_state_dict`` ->
``dcp.save``; ``get_state_dict`` -> ``dcp.load`` -> ``set_state_dict``), alternating, medians
of ``--reps``; each timing is barrier to barrier, the max over ranks. Every load is checked
bit for bit against the state that was saved.

    python benchmarks/distributed_bench.py                     # both parts
    python benchmarks/distributed_bench.py --worlds 1024,8192,65536 --ranks ''  # part 1 only
    python benchmarks/distributed_bench.py --worlds 64 --ranks 2 --model-mib 16 --reps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import multiprocessing as mp
import os
import pickle
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch

from statevault.adapters import ArrayAdapter, adapter_named
from statevault.adapters.base import ShardInfo
from statevault.checkpoint.agree import Proposal, plan_digest
from statevault.checkpoint.indexed_parts import indexed_part, merge_indexed, sharded_numbers
from statevault.checkpoint.indexes import strict_json  # what a loading rank parses with
from statevault.checkpoint.job import SaveJob
from statevault.checkpoint.parts import Part, part_from_json
from statevault.checkpoint.save import Saver  # private parts: what a rank does, timed one by one
from statevault.engine.assignment import deal_replicated, is_replicated, leaves_to_write
from statevault.engine.plan import Leaf, SavePlan
from statevault.format import tree
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.format.geometry import Box
from statevault.format.indexed import TABLE_RECORD, check_index, decode_table
from statevault.format.manifest import (
    BLOCK_BYTES,
    FileEntry,
    TensorEntry,
    expand_manifest,
    parse_manifest,
    serialize_manifest,
)
from statevault.format.names import shard_name
from statevault.format.rules import SHARD, ShardRule, chunk_of

MiB = 1 << 20


# ---------------------------------------------------------------- part 1: planning at scale


def llama_shapes(
    layers: int, hidden: int, ffn: int, vocab: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Llama-like model: 9 per layer, 3 more."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (vocab, hidden))]
    for layer in range(layers):
        prefix = f"layers.{layer}."
        shapes += [
            (prefix + "attention_norm.weight", (hidden,)),
            (prefix + "attention.wq.weight", (hidden, hidden)),
            (prefix + "attention.wk.weight", (hidden, hidden)),
            (prefix + "attention.wv.weight", (hidden, hidden)),
            (prefix + "attention.wo.weight", (hidden, hidden)),
            (prefix + "ffn_norm.weight", (hidden,)),
            (prefix + "feed_forward.w1.weight", (ffn, hidden)),
            (prefix + "feed_forward.w2.weight", (hidden, ffn)),
            (prefix + "feed_forward.w3.weight", (ffn, hidden)),
        ]
    return [*shapes, ("norm.weight", (hidden,)), ("output.weight", (vocab, hidden))]


class _Sharded:
    """Stand-in for a DTensor sharded on dim 0 over every rank (FSDP2's layout)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


class _RankLocal:
    """Stand-in for ``sv.PerRank(...)``: a subtree whose values are this rank's own."""

    def __init__(self, value: Any) -> None:
        self.value = value


class SimPlanner:
    """Builds one rank's SavePlan as ``plan_save(state, per_rank=True)`` would for a DTensor
    state: shared leaves first (sharded pieces with their ShardInfo and rule, replicated tensors),
    then the per-rank leaves. The arrays are zero-stride numpy views: no data behind them."""

    def __init__(self, adapter: ArrayAdapter, rank: int, world: int) -> None:
        self.adapter = adapter
        self.rank = rank
        self.world = world
        self.leaves: list[Leaf] = []
        self.in_rank = False
        self.deferred: list[tuple[dict[str, Any], Any, str]] = []
        # FSDP2's layout as the DTensor adapter describes it: dim 0 over a 1-d mesh of all ranks.
        self.rule = ShardRule((world,), ((SHARD, 0),), 0, None)

    def encode_leaf(self, value: Any, path: str) -> tree.Node | None:
        if isinstance(value, _Sharded):
            step = -(-value.shape[0] // self.world)  # torch.chunk's split, as split_evenly
            offset = min(self.rank * step, value.shape[0])
            rows = min(step, value.shape[0] - offset)
            local = _view((rows, *value.shape[1:]))
            offsets = (offset,) + (0,) * (len(value.shape) - 1)
            info = ShardInfo(tuple(value.shape), offsets, (), {"parameter": True}, self.rule)
            spec = self.adapter.describe(local, path)
            self.leaves.append(Leaf(path, self.adapter, local, spec, info))
            return {"$": "sharded", "id": len(self.leaves) - 1}
        if isinstance(value, _RankLocal):
            placeholder: dict[str, Any] = {"$": "per_rank", "local": None}
            self.deferred.append((placeholder, value.value, path))
            return placeholder
        if isinstance(value, np.ndarray):
            spec = self.adapter.describe(value, path)
            self.leaves.append(Leaf(path, self.adapter, value, spec, per_rank=self.in_rank))
            return {"$": "tensor", "id": len(self.leaves) - 1}
        return None

    def plan(self, state: Any) -> SavePlan:
        encoded = tree.encode(state, self.encode_leaf)
        shared = len(self.leaves)
        self.in_rank = True
        for placeholder, value, path in self.deferred:
            placeholder["local"] = tree.encode(value, self.encode_leaf, path)
        return SavePlan(encoded, None, self.leaves, shared)


def _view(shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def sim_state(shapes: list[tuple[str, tuple[int, ...]]], rank: int) -> dict[str, Any]:
    """The state an FSDP2 job saves: sharded weights and Adam moments, replicated ``step``
    scalars, plain hyperparameters, the global step, and per-rank RNG state."""
    names = [name for name, _ in shapes]
    return {
        "model": {name: _Sharded(shape) for name, shape in shapes},
        "optimizer": {
            "state": {
                name: {
                    "step": np.zeros((), dtype=np.float32),
                    "exp_avg": _Sharded(shape),
                    "exp_avg_sq": _Sharded(shape),
                }
                for name, shape in shapes
            },
            "param_groups": [
                {
                    "lr": 3e-4,
                    "betas": (0.9, 0.95),
                    "eps": 1e-8,
                    "weight_decay": 0.1,
                    "params": names,
                }
            ],
        },
        "step": 1000,
        "rng": _RankLocal({"cpu": _view((5056,), "uint8"), "seed": 1234 + rank}),
    }


class _SimGroup:
    """A Group with no process behind it: Saver._files only reads rank and size."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size

    def all_gather(self, value: Any) -> list[Any]:
        raise AssertionError("the simulation makes no collective call")


def simulated_write(plan: SavePlan, files: list[list[int]], rank: int) -> SaveJob:
    """The rows a rank's write returns (files, tensor rows), with made-up checksums."""
    job = SaveJob(
        plan,
        cast(Any, None),
        False,
        None,
        cast(Any, None),
        cast(Any, None),
        files,
        False,
        {"prepare_s": 0.01, "blocked_s": 0.02, "write_s": 0.5},
        rank=rank,
    )
    for index, members in enumerate(files):
        name = shard_name(index, rank)
        header = 64 + 160 * len(members)
        offset = header
        for leaf_index in members:
            leaf = plan.leaves[leaf_index]
            blocks = tuple(
                f"crc32c:{b:08x}" for b in range(max(0, -(-leaf.spec.nbytes // BLOCK_BYTES) - 1))
            )
            job.tensor_rows[leaf_index] = TensorEntry(
                leaf.path,
                leaf.adapter.framework,
                leaf.spec.dtype,
                leaf.spec.shape,
                name,
                offset,
                leaf.spec.nbytes,
                f"crc32c:{(leaf_index * 2654435761 + rank) & 0xFFFFFFFF:08x}",
                dict(leaf.spec.attrs),
                blocks,
            )
            offset += leaf.spec.nbytes
        job.file_rows.append(FileEntry(name, offset, header, f"crc32c:{rank:08x}"))
        job.written_bytes += offset
    return job


def replicated_holders(plan: SavePlan, world: int) -> set[int]:
    """The ranks dealt a replicated leaf (their parts carry rows for the manifest)."""
    sizes = [plan.leaves[i].spec.nbytes for i in range(plan.shared_count) if is_replicated(plan, i)]
    return set(deal_replicated(sizes, world))


def rank_kind(rank: int, world: int, extents: Sequence[int], holders: set[int]) -> tuple[Any, ...]:
    """What a rank's part and index depend on besides its number: whether (and which) replicated
    leaves it was dealt, and how many rows its piece of each dim-0 extent holds."""
    return (rank if rank in holders else -1, *(chunk_of(e, world, rank)[0] for e in extents))


def sample_ranks(
    world: int, count: int, extents: Sequence[int], holders: set[int]
) -> tuple[list[int], list[int], dict[int, tuple[Any, ...]]]:
    """(ranks planned, the evenly spread ones among them, every rank's kind). Planned: ``count``
    evenly spread ranks (rank 0 and the last included), every replicated holder, and the first
    rank of every kind, so that every other rank has a planned rank of its kind below it."""
    kinds = {rank: rank_kind(rank, world, extents, holders) for rank in range(world)}
    if count >= world:
        return list(range(world)), list(range(world)), kinds
    even = sorted({round(i * (world - 1) / (count - 1)) for i in range(count)})
    first: dict[tuple[Any, ...], int] = {}
    for rank in range(world):
        first.setdefault(kinds[rank], rank)
    planned = sorted(set(even) | holders | set(first.values()))
    return planned, even, kinds


def plan_world(
    world: int,
    shapes: list[tuple[str, tuple[int, ...]]],
    sample: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Part 1 at one world size (see the module docstring); ``sample``: how many evenly spread
    ranks to plan (``>= world``: every rank)."""
    adapter = adapter_named("numpy")
    where = "sim://run/step_000001000"
    saver = Saver(asynchronous=False, group=_SimGroup(0, world))
    extents = sorted({shape[0] for _, shape in shapes})
    first_plan = SimPlanner(adapter, 0, world).plan(sim_state(shapes, 0))
    holders = replicated_holders(first_plan, world)
    planned, even, kinds = sample_ranks(world, sample, extents, holders)
    sampled = len(planned) < world
    restore_ranks = sorted({even[round(i * (len(even) - 1) / 8)] for i in range(9)})
    phases: dict[str, list[float]] = {
        k: [] for k in ("plan", "digest", "leaves_to_write", "files_first", "files_reused", "part")
    }
    totals: list[float] = []
    part_bytes: dict[int, int] = {}
    index_bytes: dict[int, int] = {}
    proposal_bytes: list[int] = []
    leaves_written: list[int] = []
    blobs: dict[int, bytes] = {}
    records: dict[int, tuple[int, int]] = {}
    own_boxes: dict[int, list[tuple[int, Box]]] = {}
    indexes: dict[int, bytes] = {}
    coordinator_plan: SavePlan | None = None
    even_set = set(even)
    started = time.perf_counter()
    for count, rank in enumerate(planned):
        state = sim_state(shapes, rank)
        t0 = time.perf_counter()
        plan = SimPlanner(adapter, rank, world).plan(state)
        t1 = time.perf_counter()
        digest, keys = plan_digest(plan)
        t2 = time.perf_counter()
        mine = leaves_to_write(plan, rank, world)
        t3 = time.perf_counter()
        saver._group = _SimGroup(rank, world)
        files = saver.rank_files.files(plan, digest, saver.group)
        t4 = time.perf_counter()
        again = saver.rank_files.files(plan, digest, saver.group)
        t5 = time.perf_counter()
        assert again == files and sorted(i for f in files for i in f) == mine
        job = simulated_write(plan, files, rank)
        t6 = time.perf_counter()
        part, index = indexed_part(job)
        blob = part.to_json()
        t7 = time.perf_counter()
        if rank in even_set:
            for key, value in zip(
                phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t7 - t6), strict=True
            ):
                phases[key].append(value)
            # A first save's planning: files_first includes leaves_to_write.
            totals.append((t1 - t0) + (t2 - t1) + (t4 - t3) + (t7 - t6))
            proposal_bytes.append(len(pickle.dumps(Proposal(digest, keys))))
            leaves_written.append(len(mine))
        part_bytes[rank] = len(blob)
        index_bytes[rank] = len(index)
        blobs[rank] = blob
        assert part.index is not None
        records[rank] = part.index
        # Its FSDP box of every sharded tensor overlaps only its own piece (an empty one: none).
        boxes = []
        numbers = sharded_numbers(plan)
        for leaf_index, number in numbers.items():
            shard = plan.leaves[leaf_index].shard
            assert shard is not None and shard.rule is not None
            box = Box(shard.offsets, tuple(plan.leaves[leaf_index].spec.shape))
            assert shard.rule.piece(shard.global_shape, (rank,)) == box
            needed = {r for _, r, _ in shard.rule.overlapping(shard.global_shape, box)}
            assert needed == ({rank} if box.numel else set()), (rank, leaf_index, needed)
            boxes.append((number, box))
        if rank in restore_ranks:
            own_boxes[rank] = boxes
            indexes[rank] = index
        if rank == 0:
            coordinator_plan = plan
        if count % 1024 == 1023:
            log(
                f"  world {world}: {count + 1} of {len(planned)} ranks planned "
                f"({time.perf_counter() - started:.0f} s)"
            )
    assert coordinator_plan is not None
    planning_s = time.perf_counter() - started
    # The parts of the ranks not planned: the nearest lower planned rank of the same kind, its
    # rank replaced, its index's size copied and its CRC made up.
    s0 = time.perf_counter()
    donors: dict[int, Part] = {}
    last_of_kind: dict[tuple[Any, ...], int] = {}
    all_blobs: list[bytes] = []
    synthesized = 0
    for rank in range(world):
        kind = kinds[rank]
        if rank in blobs:
            last_of_kind[kind] = rank
            all_blobs.append(blobs[rank])
            continue
        donor_rank = last_of_kind[kind]
        donor = donors.get(donor_rank)
        if donor is None:
            donor = donors[donor_rank] = part_from_json(blobs[donor_rank], donor_rank)
            assert not donor.files and not donor.rows and not donor.chunks
        assert donor.index is not None
        size = donor.index[0]
        crc = crc32c_of(b"synthesized index of rank %d" % rank)
        all_blobs.append(dataclasses.replace(donor, rank=rank, index=(size, crc)).to_json())
        synthesized += 1
    synth_s = time.perf_counter() - s0
    del blobs, donors
    # Index sizes within one kind (what copying a donor's size can be off by).
    by_kind: dict[tuple[Any, ...], list[int]] = {}
    for rank in planned:
        by_kind.setdefault(kinds[rank], []).append(index_bytes[rank])
    spread = max((max(v) - min(v) for v in by_kind.values()), default=0)
    even_parts = [part_bytes[r] for r in even]
    even_indexes = [index_bytes[r] for r in even]
    result: dict[str, Any] = {
        "world": world,
        "params": len(shapes),
        "shared_leaves": coordinator_plan.shared_count,
        "sampled": sampled,
        "ranks_planned": len(planned),
        "ranks_even": len(even),
        "replicated_holders": len(holders),
        "kinds": len(set(kinds.values())),
        "parts_synthesized": synthesized,
        "planning_wall_s": planning_s,
        "synthesis_wall_s": synth_s,
        "index_size_spread_within_kind": spread,
        "per_rank_s": {k: statistics.median(v) for k, v in phases.items()},
        "per_rank_max_s": {k: max(v) for k, v in phases.items()},
        "per_rank_total_s": statistics.median(totals),
        "per_rank_total_max_s": max(totals),
        "part_bytes_median": statistics.median(even_parts),
        "part_bytes_max": max(part_bytes.values()),
        "index_bytes_median": statistics.median(even_indexes),
        "index_bytes_max": max(index_bytes.values()),
        "proposal_bytes": max(proposal_bytes),
        "leaves_written_median": statistics.median(leaves_written),
        "leaves_written_max": max(leaves_written),
    }
    log(
        f"  world {world}: {len(planned)} ranks planned in {planning_s:.0f} s"
        + (f", {synthesized} parts synthesized in {synth_s:.1f} s" if synthesized else "")
    )
    # The coordinator: parse every part (as collect_parts does), merge, serialize.
    gc.collect()
    t0 = time.perf_counter()
    parts: list[Part] = [part_from_json(blob, rank) for rank, blob in enumerate(all_blobs)]
    t1 = time.perf_counter()
    del all_blobs
    manifest, table = merge_indexed(coordinator_plan, parts, where, "indexes.tbl")
    t2 = time.perf_counter()
    del parts
    gc.collect()
    t3 = time.perf_counter()
    data = serialize_manifest(manifest)
    t4 = time.perf_counter()
    assert manifest.indexes is not None
    for rank, record in records.items():  # the table commits what the planned ranks wrote
        record_bytes = table[rank * TABLE_RECORD.size : (rank + 1) * TABLE_RECORD.size]
        assert decode_table(record_bytes, 1)[0] == record
    result.update(
        {
            "coordinator_s": {
                "parse_parts": t1 - t0,
                "merge_indexed": t2 - t1,
                "serialize_manifest": t4 - t3,
                "total": (t1 - t0) + (t2 - t1) + (t4 - t3),
            },
            "manifest_rows": {
                "files": len(manifest.files),
                "tensors": len(manifest.tensors),
                "sharded": len(manifest.sharded),
                "chunk_rows": sum(len(s.chunks) for s in manifest.sharded),
            },
            "manifest_bytes": len(data),
            "table_bytes": len(table),
        }
    )
    del manifest
    gc.collect()
    # A restoring rank at the same world size: the manifest, the table, its own index.
    restore: dict[str, list[float]] = {
        k: [] for k in ("parse_manifest", "table", "own_index", "needed_ranks", "expand", "total")
    }
    for rank in restore_ranks:
        index = indexes[rank]
        t0 = time.perf_counter()
        opened = parse_manifest(data, where)
        t1 = time.perf_counter()
        assert opened.indexes is not None
        assert format_checksum(crc32c_of(table)) == opened.indexes.checksum
        table_records = decode_table(table, opened.ranks)
        t2 = time.perf_counter()
        size, crc = table_records[rank]
        assert size == len(index) and crc32c_of(index) == crc
        doc = check_index(strict_json(index), rank)
        t3 = time.perf_counter()
        needed = {rank}  # its per-rank state
        for number, box in own_boxes[rank]:
            entry = opened.sharded[number]
            assert entry.rule is not None
            needed.update(r for _, r, _ in entry.rule.overlapping(entry.shape, box))
        t4 = time.perf_counter()
        assert needed == {rank}, (rank, sorted(needed)[:8])
        expanded = expand_manifest(opened, {rank: doc}, where)
        t5 = time.perf_counter()
        assert len(expanded.tensors) == len(opened.tensors) + len(doc["tensors"])
        for key, value in zip(
            restore, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0), strict=True
        ):
            restore[key].append(value)
        del opened, expanded, doc
    result["restore"] = {
        "ranks": restore_ranks,
        "median_s": {k: statistics.median(v) for k, v in restore.items()},
        "max_s": {k: max(v) for k, v in restore.items()},
        "bytes_beyond_own_index": len(data) + len(table),
        "bytes_median": len(data) + len(table) + statistics.median(even_indexes),
        "bytes_max": len(data) + len(table) + max(index_bytes.values()),
    }
    del data, table, indexes
    gc.collect()
    return result


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def print_planning(results: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    def ms(x: float) -> str:
        return f"{x * 1e3:.2f} ms"

    size = size_text
    worlds = [r["world"] for r in results]
    head = "| | " + " | ".join(f"{w:,} ranks" for w in worlds) + " |"
    rows = [head, "|---|" + "---:|" * len(worlds)]

    def row(label: str, values: Sequence[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    row(
        "ranks planned (evenly spread + replicated holders + first of each kind) / parts "
        "synthesized",
        [
            f"{r['ranks_planned']:,} ({r['ranks_even']:,} + ...) / {r['parts_synthesized']:,}"
            if r["sampled"]
            else f"all {r['world']:,} / 0"
            for r in results
        ],
    )
    row(
        "leaves in the plan (shared) / written by a rank (median, max)",
        [
            f"{r['shared_leaves']} / {r['leaves_written_median']:.0f}, {r['leaves_written_max']}"
            for r in results
        ],
    )
    labels = {
        "plan": "per rank: build its plan (the benchmark's stand-in planner)",
        "digest": "per rank: plan_digest (agreement)",
        "leaves_to_write": "per rank: leaves_to_write",
        "files_first": "per rank: file grouping, first save (leaves_to_write + assign_files)",
        "files_reused": "per rank: file grouping, unchanged plan (cached)",
        "part": "per rank: indexed_part + Part.to_json",
    }
    for key, label in labels.items():
        row(label + " (median)", [ms(r["per_rank_s"][key]) for r in results])
    row(
        "per rank: planning total, first save (plan + digest + grouping + part; median / max)",
        [f"{ms(r['per_rank_total_s'])} / {ms(r['per_rank_total_max_s'])}" for r in results],
    )
    row(
        "per rank: Part JSON sent (median / max)",
        [f"{size(r['part_bytes_median'])} / {size(r['part_bytes_max'])}" for r in results],
    )
    row(
        "per rank: its index (median / max)",
        [f"{size(r['index_bytes_median'])} / {size(r['index_bytes_max'])}" for r in results],
    )
    row(
        "per rank: agree message (pickled)",
        [size(r["proposal_bytes"]) for r in results],
    )
    row(
        "coordinator: part_from_json x world",
        [ms(r["coordinator_s"]["parse_parts"]) for r in results],
    )
    row("coordinator: merge_indexed", [ms(r["coordinator_s"]["merge_indexed"]) for r in results])
    row(
        "coordinator: serialize_manifest",
        [ms(r["coordinator_s"]["serialize_manifest"]) for r in results],
    )
    row("coordinator: total", [ms(r["coordinator_s"]["total"]) for r in results])
    row(
        "manifest: files / tensor rows / sharded rows / chunk rows",
        [
            "{files} / {tensors} / {sharded} / {chunk_rows}".format(**r["manifest_rows"])
            for r in results
        ],
    )
    row("commit record: manifest.json", [size(r["manifest_bytes"]) for r in results])
    row("commit record: indexes.tbl (12 B per rank)", [size(r["table_bytes"]) for r in results])
    row(
        "restoring rank reads: manifest + table + own index (median / max)",
        [
            f"{size(r['restore']['bytes_median'])} / {size(r['restore']['bytes_max'])}"
            for r in results
        ],
    )
    row(
        "  of which beyond its own index (manifest + table)",
        [size(r["restore"]["bytes_beyond_own_index"]) for r in results],
    )
    restore_labels = {
        "parse_manifest": "restoring rank: parse_manifest",
        "table": "restoring rank: table CRC + decode_table",
        "own_index": "restoring rank: own index CRC + JSON + check_index",
        "needed_ranks": "restoring rank: rule.overlapping, every sharded tensor",
        "expand": "restoring rank: expand_manifest with its own index",
        "total": "restoring rank: total",
    }
    for key, label in restore_labels.items():
        row(
            label + " (median / max)",
            [
                f"{ms(r['restore']['median_s'][key])} / {ms(r['restore']['max_s'][key])}"
                for r in results
            ],
        )
    for line in rows:
        log(line)
    by_world = {r["world"]: r for r in results}
    if 1024 in by_world and 8192 in by_world:
        growth = by_world[8192]["manifest_bytes"] / by_world[1024]["manifest_bytes"]
        log(f"manifest.json growth 1,024 -> 8,192 ranks: {growth:.3f}x")
    for r in results:
        if not r["sampled"]:
            log(
                f"{r['world']:,} ranks: every rank planned (per-rank figures over all of them), "
                f"restoring-rank figures over ranks {r['restore']['ranks']}"
            )
            continue
        log(
            f"{r['world']:,} ranks: {r['ranks_planned']:,} ranks planned ({r['ranks_even']} "
            f"evenly spread incl. rank 0 and {r['world'] - 1}, the {r['replicated_holders']} "
            "ranks dealt a replicated leaf, the first rank of each of "
            f"{r['kinds']} kinds); per-rank medians are over the {r['ranks_even']} evenly spread "
            "ranks, maxima over all planned ranks, restoring-rank figures over ranks "
            f"{r['restore']['ranks']}. The other {r['parts_synthesized']:,} parts were "
            "synthesized (a planned rank of the same kind, rank replaced, index size copied, "
            "CRC made up; index sizes within one kind differ by up to "
            f"{r['index_size_spread_within_kind']} B) and go through the coordinator like the "
            "rest: coordinator and commit-record figures cover all ranks."
        )


# ---------------------------------------------------------------- part 2: real runs vs DCP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_entry(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: dict[str, Any], queue: Any
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        queue.put((rank, "ok", fn(rank, world, args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world: int, args: dict[str, Any], timeout: float, fn: Callable[..., Any] | None = None
) -> list[Any]:
    """``fn(rank, world, args)`` (default: :func:`rank_run`) on ``world`` spawned gloo ranks;
    their results in rank order."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    target = fn if fn is not None else rank_run
    processes = [
        context.Process(
            target=_rank_entry, args=(target, rank, world, port, args, queue), daemon=True
        )
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results: dict[int, tuple[str, Any]] = {}
    try:
        while len(results) < world:
            rank, status, value = queue.get(timeout=timeout)
            results[rank] = (status, value)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    failed = {r: v for r, (s, v) in results.items() if s != "ok"}
    if failed or len(results) < world:
        raise RuntimeError(f"ranks failed: {failed or 'no answer'}")
    return [results[r][1] for r in range(world)]


class Block(torch.nn.Module):
    """A transformer-like block: fused q/k/v, attention output, two norms, a 4x MLP."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.out = torch.nn.Linear(hidden, hidden)
        self.norm1 = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)
        self.norm2 = torch.nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.norm1(x + self.out(torch.tanh(q * k) * v))
        out: torch.Tensor = self.norm2(x + self.down(torch.relu(self.up(x))))
        return out


def build_model(hidden: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(hidden) for _ in range(layers)])


def state_tensors(model: Any, opt: Any, convert: Callable[[Any], Any]) -> dict[str, Any]:
    """``convert`` of every tensor of the model and optimizer state, by flat key."""
    out = {}
    for name, value in model.state_dict().items():
        out[f"model/{name}"] = convert(value)
    for index, moments in opt.state_dict()["state"].items():
        for key, value in moments.items():
            out[f"opt/{index}/{key}"] = convert(value)
    return out


def _local_state(model: Any, opt: Any) -> dict[str, Any]:
    """Every local shard of the model and optimizer state, cloned (the reference)."""
    return state_tensors(model, opt, _local)


def _local(value: Any) -> Any:
    local = value.to_local() if hasattr(value, "to_local") else value
    return local.detach().clone()


def _scramble(model: Any, opt: Any) -> None:

    with torch.no_grad():
        for value in model.state_dict().values():
            _local_ref(value).fill_(7.0)
        for moments in opt.state.values():
            for value in moments.values():
                if isinstance(value, torch.Tensor):
                    _local_ref(value).fill_(7.0)


def _local_ref(value: Any) -> torch.Tensor:
    local: torch.Tensor = value.to_local() if hasattr(value, "to_local") else value
    return local


def _same(reference: dict[str, Any], model: Any, opt: Any) -> bool:

    now = _local_state(model, opt)
    return set(now) == set(reference) and all(
        torch.equal(now[k].view(torch.uint8) if now[k].dim() else now[k], _as_bytes(reference[k]))
        for k in reference
    )


def _as_bytes(value: Any) -> Any:

    return value.view(torch.uint8) if value.dim() else value


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _warm(path: str) -> None:
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                while handle.read(16 * MiB):
                    pass


def rank_run(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """One rank of the comparison: returns its timings (the caller takes the max over ranks)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load_into
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save_to
    from torch.distributed.fsdp import fully_shard

    import statevault as sv

    model = build_model(args["hidden"], args["layers"])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, args["hidden"], generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    reference = _local_state(model, opt)
    root = args["root"]

    def timed(call: Callable[[], object]) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        call()
        dist.barrier()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed.item())

    def sv_save(path: str) -> None:
        sv.save({"model": model, "optimizer": opt}, path)

    def dcp_save(path: str) -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp_save_to({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def sv_load(path: str) -> None:
        sv.load(path, into={"model": model, "optimizer": opt})

    def dcp_load(path: str) -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp_load_into({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)  # in place
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)

    contenders = {"statevault": (sv_save, sv_load), "DCP": (dcp_save, dcp_load)}
    times: dict[str, list[float]] = {f"{c} {op}": [] for c in contenders for op in ("save", "load")}
    written: dict[str, int] = {}
    exact: dict[str, bool] = {c: True for c in contenders}
    last: dict[str, str] = {}
    for rep in range(args["reps"]):
        order = list(contenders) if rep % 2 == 0 else list(contenders)[::-1]
        for name in order:
            path = os.path.join(root, f"{name}-{rep}")
            times[f"{name} save"].append(timed(functools.partial(contenders[name][0], path)))
            if rank == 0:
                written[name] = _dir_bytes(path)
                if name in last:
                    shutil.rmtree(last[name], ignore_errors=True)
            last[name] = path
            dist.barrier()
    for rep in range(args["reps"]):
        order = list(contenders) if rep % 2 == 0 else list(contenders)[::-1]
        for name in order:
            _scramble(model, opt)
            if rank == 0:
                _warm(last[name])  # O_DIRECT saves leave the page cache cold: warm both alike
            times[f"{name} load"].append(timed(functools.partial(contenders[name][1], last[name])))
            exact[name] = exact[name] and _same(reference, model, opt)
    local_bytes = sum(v.numel() * v.element_size() for v in reference.values())
    return {"times": times, "written": written, "exact": exact, "local_bytes": local_bytes}


def compare(world: int, args: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"svdist{world}-", dir=args["dir"])
    try:
        results = run_ranks(world, {**args, "root": root}, timeout=args["timeout"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    times = results[0]["times"]  # already the max over ranks
    exact = {name: all(r["exact"][name] for r in results) for name in results[0]["exact"]}
    state_bytes = sum(r["local_bytes"] for r in results)
    out = {
        "world": world,
        "state_bytes": state_bytes,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "samples_s": times,
        "written": results[0]["written"],
        "bit_exact": exact,
    }
    log(f"  {world} ranks done: {json.dumps(out['median_s'])}")
    return out


def print_compare(results: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    log(
        "| ranks | state | op | statevault | DCP | statevault / DCP | bytes written (sv / DCP) "
        "| loads bit-exact (sv / DCP) |"
    )
    log("|---:|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        m = r["median_s"]
        for op in ("save", "load"):
            sv_s, dcp_s = m[f"statevault {op}"], m[f"DCP {op}"]
            written = (
                f"{r['written']['statevault'] / MiB:.1f} / {r['written']['DCP'] / MiB:.1f} MiB"
                if op == "save"
                else ""
            )
            exact = (
                f"{'yes' if r['bit_exact']['statevault'] else 'NO'} / "
                f"{'yes' if r['bit_exact']['DCP'] else 'NO'}"
                if op == "load"
                else ""
            )
            log(
                f"| {r['world']} | {r['state_bytes'] / MiB:.0f} MiB | {op} | {sv_s:.3f} s | "
                f"{dcp_s:.3f} s | {sv_s / dcp_s:.2f}x | {written} | {exact} |"
            )


# ---------------------------------------------------------------- main


def machine() -> str:

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                "?",
            )
    except OSError:
        pass
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        git = "?"
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    return (
        f"cpu_count={os.cpu_count()}, cpu={cpu}, ram_gib={ram:.1f}, python="
        f"{platform.python_version()}, torch={torch.__version__}, git={git}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--worlds", default="1024,8192,65536", help="simulated world sizes ('' skips)"
    )
    parser.add_argument(
        "--sample-ranks",
        type=int,
        default=256,
        help="worlds above --sample-above plan this many evenly spread ranks (plus the ranks "
        "dealt replicated leaves and the first rank of each kind); the rest are synthesized",
    )
    parser.add_argument(
        "--sample-above", type=int, default=8192, help="plan every rank up to this world size"
    )
    parser.add_argument(
        "--layers", type=int, default=11, help="simulated model: layers (9 params each)"
    )
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", default="2,4", help="real gloo runs ('' skips)")
    parser.add_argument("--model-mib", type=float, default=144, help="FSDP2 state incl. Adam")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch parent directory (default: tmp)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", default=None, help="write every figure here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    out: dict[str, Any] = {
        "command": "python " + shlex.join(["benchmarks/distributed_bench.py", *sys.argv[1:]]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_start": os.getloadavg(),
    }
    worlds = [int(w) for w in args.worlds.split(",") if w]
    if worlds:
        shapes = llama_shapes(args.layers, args.hidden, args.ffn, args.vocab)
        params = sum(math.prod(s) for _, s in shapes)
        log(
            f"planning: Llama-like model, {len(shapes)} parameters ({params / 1e9:.2f} B), "
            "weights and 2 Adam moments sharded on dim 0 over every rank, "
            f"{len(shapes)} replicated step scalars, per-rank RNG state; format 3 "
            "(dim-0 ShardRule per sharded tensor, one index per rank)"
        )
        planning = []
        for world in worlds:
            sample = args.sample_ranks if world > args.sample_above else world
            planning.append(plan_world(world, shapes, sample, log))
            gc.collect()
        out["planning"] = planning
        print_planning(planning, log)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if ranks:
        # 3 params per layer-of-6 module list: ~ 12.6 h^2 weights per layer; pick h for the size.
        layers = 4
        hidden = int(math.sqrt(args.model_mib * MiB / (3 * 4 * 12 * layers)) // 64 * 64)
        log(f"real runs: FSDP2 {layers} x 6 modules, hidden {hidden}, AdamW, gloo on CPU")
        config = {
            "hidden": hidden,
            "layers": layers,
            "reps": args.reps,
            "dir": args.dir,
            "timeout": args.timeout,
        }
        out["compare"] = [compare(world, config, log) for world in ranks]
        print_compare(out["compare"], log)
    out["load_end"] = os.getloadavg()
    out["runtime_s"] = time.perf_counter() - started
    log(f"command: {out['command']}")
    log(f"machine: {out['machine']}")
    log(f"date: {out['date']}")
    log(
        "load average (1, 5, 15 min) at start {} and end {}".format(
            "/".join(f"{x:.1f}" for x in out["load_start"]),
            "/".join(f"{x:.1f}" for x in out["load_end"]),
        )
    )
    log(f"total runtime {out['runtime_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
