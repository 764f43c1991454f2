"""Stage: copy (or view) what a save writes, so that training may go on mutating its state.

A synchronous save views host memory in place (the caller is blocked anyway). An asynchronous one
copies the state into the staging arena (reusable host memory, pinned for CUDA copies) and
returns; the background write reads the copies. The staging budget bounds that memory: a state
larger than the budget is staged in pieces of whole files, and every piece but the last is
written before the call returns (the documented cost of a small budget).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from statevault.adapters import adapter_for
from statevault.checkpoint.job import SaveJob
from statevault.engine.arena import StagingArena
from statevault.engine.plan import plan_save
from statevault.engine.staging import by_adapter, stage, stage_into


def default_staging_budget() -> int:
    """Half of the machine's physical memory."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def stage_job(
    job: SaveJob, arena: StagingArena, budget: int
) -> tuple[list[int], dict[int, memoryview]]:
    """Stage ``job``: the files of its last piece and their staged leaf bytes (every piece but
    the last written here when the state is over the budget)."""
    started = time.perf_counter()
    if not job.asynchronous:
        views = stage(job.plan)
        job.timings["stage_s"] = time.perf_counter() - started
        return list(range(len(job.files))), dict(enumerate(views))
    pieces = _pieces(job, budget)
    for piece in pieces[:-1]:
        arena.reset()
        job.write(piece, _stage_files(job, piece, arena))
    arena.reset()
    staged = _stage_files(job, pieces[-1], arena)
    job.timings["stage_s"] = time.perf_counter() - started
    return pieces[-1], staged


def _stage_files(
    job: SaveJob, file_indices: Sequence[int], arena: StagingArena
) -> dict[int, memoryview]:
    leaves = sorted(j for i in file_indices for j in job.files[i])
    return dict(zip(leaves, stage_into(job.plan, leaves, arena), strict=True))


def prepare_staging(
    state: Any, arena: StagingArena, budget: int, reserve_optimizer_moments: bool
) -> None:
    """Get staging memory ready for ``state`` in the background, off the training path."""
    plan = plan_save(state)
    for adapter, indices in by_adapter(plan).items():
        adapter.prepare_staging([plan.leaves[i].value for i in indices], arena)
    wanted = plan.total_bytes
    if reserve_optimizer_moments and isinstance(state, Mapping):
        wanted += unborn_moment_bytes(state)
    arena.prewarm(min(wanted, budget) + 64 * len(plan.leaves))


def _pieces(job: SaveJob, budget: int) -> list[list[int]]:
    """Consecutive groups of whole files, each within the budget (a lone big file excepted)."""
    pieces: list[list[int]] = [[]]
    used = 0
    for index, members in enumerate(job.files):
        size = sum(job.plan.leaves[j].spec.nbytes + 64 for j in members)
        if pieces[-1] and used + size > budget:
            pieces.append([])
            used = 0
        pieces[-1].append(index)
        used += size
    return pieces


def unborn_moment_bytes(state: Mapping[str, Any]) -> int:
    """What the state will grow by at its first save: an optimizer that has not stepped yet has
    no moments; count two per parameter (Adam's), which is what most optimizers grow to."""
    total = 0
    for value in state.values():
        groups = getattr(value, "param_groups", None)
        if isinstance(groups, list) and not getattr(value, "state", True):
            params = [p for group in groups for p in group.get("params", [])]
            total += 2 * sum(_array_bytes(p) for p in params)
    return total


def _array_bytes(value: Any) -> int:
    adapter = adapter_for(value)
    if adapter is None:
        return 0
    local_shard = getattr(adapter, "local_shard", None)
    sharded = local_shard(value, "") if local_shard is not None else None
    if sharded is not None:  # a DTensor: this rank stages only its piece
        value = sharded[0]
    return adapter.describe(value, "").nbytes
