"""Distributed saves: planning cost at 1,024 and 8,192 simulated ranks, and real gloo runs
against torch.distributed.checkpoint (DCP). Issue 4, "Scale".

Part 1 (one process, no process group): each rank of an FSDP-style job (a Llama-like model whose
parameters and both Adam moments are sharded on dim 0 over every rank, the optimizer's ``step``
scalars replicated, a small per-rank RNG state) gets its own SavePlan of numpy leaves (zero-stride
views: no data is allocated) and runs what a rank runs for a save: ``plan_digest`` (the
agreement), ``leaves_to_write`` (its share), the file grouping (``Saver._files``, twice:
the second save reuses the assignment), and builds and serializes its Part (what it sends). The
rows a real write would return are made up with plausible values (offsets, checksums). Then the
coordinator's work, on every rank's part bytes: ``part_from_json`` for each, ``merge`` (chunk
geometry checked), ``serialize_manifest``; and what the settle step sends every rank (the
manifest, through ``all_gather_object``) and costs each of them (``parse_manifest``).

Part 2 (spawned gloo ranks, 2 and 4): an FSDP2 (``fully_shard``) model with AdamW state, saved
and loaded by statevault (``sv.save`` / ``sv.load(into=...)``) and by DCP (``get_state_dict`` ->
``dcp.save``; ``get_state_dict`` -> ``dcp.load`` -> ``set_state_dict``), alternating, medians
of ``--reps``; each timing is barrier to barrier, the max over ranks. Every load is checked
bit for bit against the state that was saved.

    python benchmarks/distributed_bench.py                     # both parts (~5-8 min, 2 CPUs)
    python benchmarks/distributed_bench.py --worlds 64 --ranks 2 --model-mib 16 --reps 1
"""

from __future__ import annotations

import argparse
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
from statevault.checkpoint.job import SaveJob
from statevault.checkpoint.parts import Part, merge, part_from_json, part_of
from statevault.checkpoint.save import Saver  # private parts: what a rank does, timed one by one
from statevault.engine.assignment import leaves_to_write
from statevault.engine.plan import Leaf, SavePlan
from statevault.format import tree
from statevault.format.geometry import Box, GeometryError, check_chunks, intersect
from statevault.format.manifest import (
    BLOCK_BYTES,
    MAX_MANIFEST_BYTES,
    FileEntry,
    TensorEntry,
    parse_manifest,
    serialize_manifest,
)
from statevault.format.names import shard_name

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
    state: shared leaves first (sharded pieces with their ShardInfo, replicated tensors), then the
    per-rank leaves. The arrays are zero-stride numpy views: no data behind them."""

    def __init__(self, adapter: ArrayAdapter, rank: int, world: int) -> None:
        self.adapter = adapter
        self.rank = rank
        self.world = world
        self.leaves: list[Leaf] = []
        self.in_rank = False
        self.deferred: list[tuple[dict[str, Any], Any, str]] = []

    def encode_leaf(self, value: Any, path: str) -> tree.Node | None:
        if isinstance(value, _Sharded):
            step = -(-value.shape[0] // self.world)  # torch.chunk's split, as split_evenly
            offset = min(self.rank * step, value.shape[0])
            rows = min(step, value.shape[0] - offset)
            local = _view((rows, *value.shape[1:]))
            offsets = (offset,) + (0,) * (len(value.shape) - 1)
            info = ShardInfo(tuple(value.shape), offsets, (), {"parameter": True})
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
    return job


def pairwise_check_chunks(shape: Sequence[int], chunks: Sequence[Box]) -> None:
    """The overlap test check_chunks made before this benchmark: every pair of non-empty
    chunks (kept here to measure what it cost)."""
    solid = [(i, c) for i, c in enumerate(chunks) if c.numel > 0]
    for position, (i, first) in enumerate(solid):
        for j, second in solid[position + 1 :]:
            if intersect(first, second) is not None:
                raise GeometryError(f"chunks {i} and {j} overlap")


def plan_world(
    world: int,
    shapes: list[tuple[str, tuple[int, ...]]],
    pairwise: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    adapter = adapter_named("numpy")
    saver = Saver(asynchronous=False, group=_SimGroup(0, world))
    phases: dict[str, list[float]] = {
        k: [] for k in ("plan", "digest", "leaves_to_write", "files_first", "files_reused", "part")
    }
    part_bytes: list[int] = []
    proposal_bytes: list[int] = []
    leaves_written: list[int] = []
    blobs: list[bytes] = []
    coordinator_plan: SavePlan | None = None
    started = time.perf_counter()
    for rank in range(world):
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
        blob = part_of(job).to_json()
        t7 = time.perf_counter()
        for key, value in zip(
            phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t7 - t6), strict=True
        ):
            phases[key].append(value)
        part_bytes.append(len(blob))
        proposal_bytes.append(len(pickle.dumps(Proposal(digest, keys))))
        leaves_written.append(len(mine))
        blobs.append(blob)
        if rank == 0:
            coordinator_plan = plan
        if rank % 1024 == 1023:
            log(
                f"  world {world}: {rank + 1} ranks planned ({time.perf_counter() - started:.0f} s)"
            )
    assert coordinator_plan is not None
    result: dict[str, Any] = {
        "world": world,
        "params": len(shapes),
        "shared_leaves": coordinator_plan.shared_count,
        "per_rank_s": {k: statistics.median(v) for k, v in phases.items()},
        "per_rank_max_s": {k: max(v) for k, v in phases.items()},
        "part_bytes_median": statistics.median(part_bytes),
        "part_bytes_max": max(part_bytes),
        "proposal_bytes": max(proposal_bytes),
        "leaves_written_median": statistics.median(leaves_written),
        "leaves_written_max": max(leaves_written),
        "agree_gather_bytes_per_rank": world * max(proposal_bytes),
    }
    # The coordinator: parse every part (as _collect_parts does), merge, serialize.
    gc.collect()
    t0 = time.perf_counter()
    parts: list[Part] = [part_from_json(blob, rank) for rank, blob in enumerate(blobs)]
    t1 = time.perf_counter()
    del blobs
    manifest = merge(coordinator_plan, parts, "sim://run/step_000001000")
    t2 = time.perf_counter()
    del parts
    gc.collect()
    t3 = time.perf_counter()
    data = serialize_manifest(manifest)
    t4 = time.perf_counter()
    # The chunk geometry check alone (inside merge above), and the pairwise test it replaced.
    boxes = [
        (s.shape, [Box(c.offsets, manifest.tensors[c.tensor].shape) for c in s.chunks])
        for s in manifest.sharded
    ]
    g0 = time.perf_counter()
    for shape, chunk_boxes in boxes:
        check_chunks(shape, chunk_boxes)
    g1 = time.perf_counter()
    chunk_count = sum(len(b) for _, b in boxes)
    result.update(
        {
            "coordinator_s": {
                "parse_parts": t1 - t0,
                "merge": t2 - t1,
                "serialize_manifest": t4 - t3,
                "total": (t1 - t0) + (t2 - t1) + (t4 - t3),
            },
            "geometry_s": g1 - g0,
            "chunks": chunk_count,
            "tensor_rows": len(manifest.tensors),
            "manifest_bytes": len(data),
            "manifest_bytes_per_chunk": len(data) / max(1, chunk_count),
        }
    )
    if pairwise:
        # The largest tensor (most non-empty chunks): timed with the old pairwise test.
        shape, chunk_boxes = max(boxes, key=lambda b: sum(1 for c in b[1] if c.numel))
        solid = sum(1 for c in chunk_boxes if c.numel)
        p0 = time.perf_counter()
        pairwise_check_chunks(shape, chunk_boxes)
        p1 = time.perf_counter()
        check_chunks(shape, chunk_boxes)
        p2 = time.perf_counter()
        per_pair = (p1 - p0) / max(1, solid * (solid - 1) // 2)
        all_pairs = sum((n := sum(1 for c in b if c.numel)) * (n - 1) // 2 for _, b in boxes)
        result["pairwise"] = {
            "tensor_shape": list(shape),
            "solid_chunks": solid,
            "pairs": solid * (solid - 1) // 2,
            "pairwise_s": p1 - p0,
            "sweep_s": p2 - p1,
            "all_tensors_pairs": all_pairs,
            "all_tensors_pairwise_s_extrapolated": per_pair * all_pairs,
        }
    del manifest, boxes
    gc.collect()
    # Settle: every rank all-gathers (error, culprits): O(1) bytes each, so each rank receives
    # world x that. Ranks other than 0 read the manifest back only for sv.save (not the manager).
    reply = pickle.dumps((None, []))
    p0 = time.perf_counter()
    parse_manifest(data, "sim://run/step_000001000")
    p1 = time.perf_counter()
    result["settle"] = {
        "reply_bytes": len(reply),
        "gather_bytes_per_rank": world * len(reply),
        "parse_manifest_s": p1 - p0,
        "manifest_limit_bytes": MAX_MANIFEST_BYTES,
    }
    del data
    gc.collect()
    return result


def print_planning(results: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    def ms(x: float) -> str:
        return f"{x * 1e3:.2f} ms"

    def size(n: float) -> str:
        for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
            if n >= scale:
                return f"{n / scale:.1f} {unit}"
        return f"{n:.0f} B"

    worlds = [r["world"] for r in results]
    head = "| | " + " | ".join(f"{w:,} ranks" for w in worlds) + " |"
    rows = [head, "|---|" + "---:|" * len(worlds)]

    def row(label: str, values: Sequence[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

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
        "part": "per rank: build + serialize its Part",
    }
    for key, label in labels.items():
        row(label + " (median)", [ms(r["per_rank_s"][key]) for r in results])
    row(
        "per rank: Part JSON sent (median / max)",
        [f"{size(r['part_bytes_median'])} / {size(r['part_bytes_max'])}" for r in results],
    )
    row(
        "per rank: agree message (pickled) / all-gathered",
        [
            f"{size(r['proposal_bytes'])} / {size(r['agree_gather_bytes_per_rank'])}"
            for r in results
        ],
    )
    row(
        "coordinator: part_from_json x world",
        [ms(r["coordinator_s"]["parse_parts"]) for r in results],
    )
    row("coordinator: merge (incl. geometry)", [ms(r["coordinator_s"]["merge"]) for r in results])
    row("  of which check_chunks, all tensors", [ms(r["geometry_s"]) for r in results])
    row(
        "coordinator: serialize_manifest",
        [ms(r["coordinator_s"]["serialize_manifest"]) for r in results],
    )
    row("coordinator: total", [ms(r["coordinator_s"]["total"]) for r in results])
    row(
        "manifest: chunks / tensor rows",
        [f"{r['chunks']:,} / {r['tensor_rows']:,}" for r in results],
    )
    row(
        "manifest.json bytes (per chunk)",
        [f"{size(r['manifest_bytes'])} ({r['manifest_bytes_per_chunk']:.0f} B)" for r in results],
    )
    row(
        "settle: all_gather_object bytes received per rank",
        [size(r["settle"]["gather_bytes_per_rank"]) for r in results],
    )
    row(
        "settle: parse_manifest (rank 0; others only for sv.save)",
        [ms(r["settle"]["parse_manifest_s"]) for r in results],
    )
    if all("pairwise" in r for r in results):
        row(
            "geometry, largest tensor: non-empty chunks / pairs",
            [f"{r['pairwise']['solid_chunks']:,} / {r['pairwise']['pairs']:,}" for r in results],
        )
        row(
            "  old pairwise overlap test / new sweep",
            [
                f"{r['pairwise']['pairwise_s']:.2f} s / {ms(r['pairwise']['sweep_s'])}"
                for r in results
            ],
        )
        row(
            "  old pairwise, all tensors (extrapolated from the one)",
            [f"{r['pairwise']['all_tensors_pairwise_s_extrapolated']:.0f} s" for r in results],
        )
    for line in rows:
        log(line)


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
    parser.add_argument("--worlds", default="1024,8192", help="simulated world sizes ('' skips)")
    parser.add_argument(
        "--layers", type=int, default=11, help="simulated model: layers (9 params each)"
    )
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--no-pairwise", action="store_true", help="skip the old O(n^2) test")
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
            f"{len(shapes)} replicated step scalars, per-rank RNG state"
        )
        planning = []
        for world in worlds:
            planning.append(plan_world(world, shapes, not args.no_pairwise, log))
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
