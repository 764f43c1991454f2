"""Prepare: turn a user's state into a tree of nodes and a list of array leaves to store.

Tied tensors (the same tensor reached by two key paths, like shared embedding weights) become one
leaf referenced twice, so they are stored once and come back tied.

In a distributed save (``per_rank=True``) two more kinds of leaf appear: the local shard of a
sharded tensor (a DTensor: the node is ``{"$": "sharded", "id": leaf}``) and the values of
per-rank subtrees (``sv.PerRank(...)`` and ``sv.RNGState()``), whose leaves are numbered after
every shared leaf, so that shared leaf numbers agree on every rank whatever each rank holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statevault.adapters import ArrayAdapter, ArraySpec, adapter_for
from statevault.adapters.base import ShardInfo
from statevault.errors import UnsupportedValueError
from statevault.format import tree
from statevault.state.per_rank import PerRank, is_per_rank
from statevault.state.stateful import as_stateful, type_name


@dataclass
class Leaf:
    """One array to store: the object, how to read it, and the first key path reaching it."""

    path: str
    adapter: ArrayAdapter
    value: Any
    spec: ArraySpec
    shard: ShardInfo | None = None  # set for the local piece of a sharded tensor
    per_rank: bool = False  # reached only through a per-rank subtree
    # A module's parameter that does not require gradients (a frozen base, say): a hint that
    # it will not change, for the layout of an incremental save (checkpoint/reuse.py).
    frozen: bool = False


@dataclass
class SavePlan:
    tree: tree.Node
    metadata: tree.Node
    leaves: list[Leaf] = field(default_factory=list)
    shared_count: int = -1  # leaves numbered before the per-rank ones (-1: all of them)

    def __post_init__(self) -> None:
        if self.shared_count < 0:
            self.shared_count = len(self.leaves)

    @property
    def total_bytes(self) -> int:
        return sum(leaf.spec.nbytes for leaf in self.leaves)

    def frameworks(self) -> set[str]:
        return {leaf.adapter.framework for leaf in self.leaves}


class _Planner:
    def __init__(self, per_rank: bool) -> None:
        self.leaves: list[Leaf] = []
        self.seen: dict[Hashable, int] = {}
        self.split_ranks = per_rank
        self.in_rank_subtree = False
        self.deferred: list[tuple[dict[str, Any], Any, str]] = []
        self.frozen: set[str] = set()  # key paths of frozen parameters (Leaf.frozen)

    def encode_leaf(self, value: Any, path: str) -> tree.Node | None:
        if _is_numpy_scalar(value):
            return self.numpy_scalar(value, path)
        if is_per_rank(value):
            return self.per_rank(value, path)
        adapter = adapter_for(value)
        if adapter is not None:
            local_shard = getattr(adapter, "local_shard", None)
            sharded = local_shard(value, path) if local_shard is not None else None
            if sharded is not None:
                local, info = sharded
                return {"$": "sharded", "id": self.shard(adapter, local, info, path)}
            return {"$": "tensor", "id": self.array(adapter, value, path)}
        stateful = as_stateful(value)
        if stateful is not None:
            return self.stateful(value, stateful, path)
        return None

    def stateful(self, value: Any, stateful: Any, path: str) -> tree.Node:
        named = getattr(value, "named_parameters", None)
        if callable(named):  # a module: which of its parameters are frozen (duck-typed)
            with contextlib.suppress(Exception):  # a hint only: never fail a save for it
                self.frozen.update(
                    tree.join_path(path, name)
                    for name, parameter in named()
                    if getattr(parameter, "requires_grad", True) is False
                )
        return {
            "$": "stateful",
            "type": type_name(value),
            "state": tree.encode(stateful.state_dict(), self.encode_leaf, path),
        }

    def array(self, adapter: ArrayAdapter, value: Any, path: str) -> int:
        spec = adapter.describe(value, path)  # validates first: identity needs a plain tensor
        identity = adapter.identity(value)
        if identity is not None and identity in self.seen:
            return self.seen[identity]
        leaf = Leaf(path, adapter, value, spec, per_rank=self.in_rank_subtree)
        leaf.frozen = path in self.frozen
        self.leaves.append(leaf)
        index = len(self.leaves) - 1
        if identity is not None:
            self.seen[identity] = index
        return index

    def shard(self, adapter: ArrayAdapter, local: Any, info: ShardInfo, path: str) -> int:
        """A leaf for this rank's piece of a sharded tensor (tied pieces stay one leaf)."""
        if self.in_rank_subtree:
            raise UnsupportedValueError(
                path, "a DTensor inside sv.PerRank(...) or RNGState: per-rank state is plain"
            )
        spec = adapter.describe(local, path)
        identity = adapter.identity(local)
        key = ("sharded", identity) if identity is not None else None
        if key is not None and key in self.seen:
            return self.seen[key]
        leaf = Leaf(path, adapter, local, spec, info, self.in_rank_subtree)
        leaf.frozen = path in self.frozen
        self.leaves.append(leaf)
        if key is not None:
            self.seen[key] = len(self.leaves) - 1
        return len(self.leaves) - 1

    def per_rank(self, value: Any, path: str) -> tree.Node:
        inner = value.value if isinstance(value, PerRank) else value
        if not self.split_ranks or self.in_rank_subtree:  # one process: an ordinary subtree
            if isinstance(value, PerRank):
                return tree.encode(inner, self.encode_leaf, path)
            return self.stateful(inner, inner, path)  # RNGState
        placeholder: dict[str, Any] = {"$": "per_rank", "local": None}
        self.deferred.append((placeholder, inner, path))
        return placeholder

    def encode_deferred(self) -> None:
        """Encode the per-rank subtrees after every shared leaf is numbered."""
        self.in_rank_subtree = True
        for placeholder, value, path in self.deferred:
            placeholder["local"] = tree.encode(value, self.encode_leaf, path)
        self.in_rank_subtree = False

    def numpy_scalar(self, value: Any, path: str) -> tree.Node:
        name = value.dtype.name
        if name not in tree.NUMPY_SCALAR_DTYPES:
            raise UnsupportedValueError(path, f"numpy scalar of dtype {name} is not supported")
        return {
            "$": "npscalar",
            "dtype": name,
            "v": tree.encode(value.item(), self.encode_leaf, path),
        }


def _is_numpy_scalar(value: Any) -> bool:
    return isinstance(value, np.generic)


def plan_save(state: Any, metadata: Any = None, *, per_rank: bool = False) -> SavePlan:
    """Encode ``state`` and ``metadata``; raises UnsupportedValueError naming a bad key path.

    ``per_rank``: a distributed save, where per-rank subtrees become ``per_rank`` nodes whose
    ``local`` branch holds this rank's values."""
    planner = _Planner(per_rank)
    encoded = tree.encode(state, planner.encode_leaf)
    shared = len(planner.leaves)
    planner.encode_deferred()
    encoded_metadata = tree.encode(metadata, _reject_arrays("metadata"), "metadata")
    return SavePlan(encoded, encoded_metadata, planner.leaves, shared)


def _reject_arrays(root: str) -> tree.LeafEncoder:
    def encode_leaf(value: Any, path: str) -> None:
        raise UnsupportedValueError(
            path,
            f"{root} holds plain values only (numbers, str, bytes, lists, dicts), "
            f"not {type(value).__qualname__}",
        )

    return encode_leaf
