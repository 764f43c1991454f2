"""Find where each saved tensor is going: which tree nodes a load restores into DTensors.

A load with ``into=`` walks the destination objects beside the saved tree. Where a destination
tensor is a DTensor, the saved tensor (plain or sharded) is read only for the box this rank
holds; every other tensor is read whole. Stateful destinations are walked through their current
``state_dict()``; an optimizer that has not stepped yet has no state to walk, so its saved
moments take the layout of their parameter when the shapes agree (Adam's moments do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from statevault.adapters.torch_dtensor import is_dtensor
from statevault.format import tree_paths
from statevault.state.per_rank import PerRank
from statevault.state.stateful import as_stateful

TargetKey = tuple[str, int]  # ("tensor" | "sharded", id in the manifest)
_MAX_DEPTH = 200


def find_targets(into: Any, node: Any, pick_rank: Callable[[int], int]) -> dict[TargetKey, Any]:
    """The DTensor destination of each tensor node of ``node`` that has one."""
    found: dict[TargetKey, Any] = {}
    _walk(into, node, found, pick_rank, 0)
    return found


def _unwrap(node: Any, pick_rank: Callable[[int], int]) -> Any:
    unwrapped = tree_paths.unwrap(node, pick_rank)
    return None if type(unwrapped) is dict and unwrapped.get("$") == "per_rank" else unwrapped


def _walk(
    target: Any, node: Any, found: dict[TargetKey, Any], pick: Callable[[int], int], depth: int
) -> None:
    if depth > _MAX_DEPTH:
        return
    node = _unwrap(node, pick)
    if is_dtensor(target):
        tagged = type(node) is dict and node.get("$") in ("tensor", "sharded")
        if tagged and type(node.get("id")) is int:
            found.setdefault((node["$"], node["id"]), target)
        return
    if isinstance(target, PerRank):
        _walk(target.value, node, found, pick, depth + 1)
        return
    if _is_unstepped_optimizer(target):
        _walk_unstepped(target, node, found, pick, depth)
        return
    stateful = as_stateful(target)
    if stateful is not None:
        _walk(stateful.state_dict(), node, found, pick, depth + 1)
        return
    if isinstance(target, Mapping):
        for key, value in target.items():
            _walk(value, tree_paths.subtree_child(node, key), found, pick, depth + 1)
    elif isinstance(target, (list, tuple)):
        for index, value in enumerate(target):
            _walk(value, tree_paths.subtree_child(node, index), found, pick, depth + 1)


def _is_unstepped_optimizer(target: Any) -> bool:
    groups = getattr(target, "param_groups", None)
    state = getattr(target, "state", None)
    return isinstance(groups, list) and isinstance(state, Mapping) and not state


def _walk_unstepped(
    optimizer: Any, node: Any, found: dict[TargetKey, Any], pick: Callable[[int], int], depth: int
) -> None:
    """Saved moments of an optimizer with no state yet: each takes its parameter's layout; the
    caller keeps a target only where the saved shape equals the parameter's."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = tree_paths.subtree_child(_unwrap(node, pick), "state")
    for index, param in enumerate(params):
        if not is_dtensor(param):
            continue
        moments = _unwrap(tree_paths.subtree_child(states, index), pick)
        if type(moments) is not dict:
            continue
        for child in _children(moments):
            _walk(param, child, found, pick, depth + 1)


def _children(node: dict[str, Any]) -> list[Any]:
    if type(node.get("v")) is dict:
        return list(node["v"].values())
    items = node.get("items")
    if type(items) is list:
        return [pair[1] for pair in items if type(pair) is list and len(pair) == 2]
    return []
