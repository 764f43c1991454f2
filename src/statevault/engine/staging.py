"""Stage: view (synchronous save) or copy (asynchronous save) every leaf's bytes on the host.

After staging the caller's objects are no longer needed: what is written is the staged bytes. A
synchronous save blocks the caller until the write is done, so host tensors are viewed in place
(:func:`stage`); an asynchronous save copies them into its arena (:func:`stage_into`), since
training mutates them as soon as save() returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from statevault.engine.arena import StagingArena
from statevault.engine.parallel import (
    BATCHES_PER_THREAD,
    PARALLEL_MIN_BYTES,
    byte_batches,
    cpu_threads,
    run_batches,
)
from statevault.engine.plan import SavePlan


def by_adapter(plan: SavePlan, leaves: Sequence[int] | None = None) -> dict[Any, list[int]]:
    """Leaf indices grouped by the adapter that handles them (in leaf order within a group),
    so that each framework stages its leaves in one batch (one device synchronization)."""
    groups: dict[Any, list[int]] = {}
    for index in leaves if leaves is not None else range(len(plan.leaves)):
        groups.setdefault(plan.leaves[index].adapter, []).append(index)
    return groups


def stage(plan: SavePlan) -> list[memoryview]:
    """The bytes of each leaf of ``plan``, in leaf order; device copies are batched per adapter."""
    staged: dict[int, memoryview] = {}
    for adapter, indices in by_adapter(plan).items():
        views = adapter.stage([plan.leaves[i].value for i in indices])
        for index, view in zip(indices, views, strict=True):
            if len(view) != plan.leaves[index].spec.nbytes:
                raise RuntimeError(f"staging {plan.leaves[index].path} produced a wrong size")
            staged[index] = view
    return [staged[i] for i in range(len(plan.leaves))]


def stage_into(plan: SavePlan, leaves: Sequence[int], arena: StagingArena) -> list[memoryview]:
    """Copy the leaves ``leaves`` of ``plan`` into ``arena``; returns views in the same order.

    Host arrays of torch and numpy (plain memcpy, the GIL released, into an arena that is safe
    to take from in several threads) are copied by one thread per CPU pulling batches from a
    shared queue, so a busy CPU only slows the batches it takes; device arrays stay in one
    batch per framework (one stream, one synchronization)."""
    staged: dict[int, memoryview] = {}
    for adapter, indices in by_adapter(plan, leaves).items():
        batches = _host_batches(plan, indices, adapter.framework)
        if len(batches) == 1:
            views = adapter.stage_into([plan.leaves[i].value for i in indices], arena)
            staged.update(zip(indices, views, strict=True))
            continue

        def stage_batch(batch: list[int], adapter: Any = adapter) -> None:
            views = adapter.stage_into([plan.leaves[i].value for i in batch], arena)
            staged.update(zip(batch, views, strict=True))

        run_batches(batches, stage_batch, cpu_threads(), "statevault-stage")
    return [staged[i] for i in leaves]


_HOST_FRAMEWORKS = ("torch", "numpy")


def _host_batches(plan: SavePlan, indices: Sequence[int], framework: str) -> list[list[int]]:
    """``indices`` cut into batches of about equal bytes when they are host arrays worth
    copying in parallel, else one batch."""
    threads = cpu_threads()
    total = sum(plan.leaves[i].spec.nbytes for i in indices)
    on_host = all(plan.leaves[i].spec.attrs.get("device", "cpu") == "cpu" for i in indices)
    if framework not in _HOST_FRAMEWORKS or not on_host or threads < 2:
        return [list(indices)]
    if total < PARALLEL_MIN_BYTES:
        return [list(indices)]
    cut = byte_batches([plan.leaves[i].spec.nbytes for i in indices], threads * BATCHES_PER_THREAD)
    return [[indices[k] for k in batch] for batch in cut]
