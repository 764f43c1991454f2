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
    """Copy the leaves ``leaves`` of ``plan`` into ``arena``; returns views in the same order."""
    staged: dict[int, memoryview] = {}
    for adapter, indices in by_adapter(plan, leaves).items():
        views = adapter.stage_into([plan.leaves[i].value for i in indices], arena)
        staged.update(zip(indices, views, strict=True))
    return [staged[i] for i in leaves]
