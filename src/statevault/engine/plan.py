"""Prepare: turn a user's state into a tree of nodes and a list of array leaves to store.

Tied tensors (the same tensor reached by two key paths, like shared embedding weights) become one
leaf referenced twice, so they are stored once and come back tied.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statevault.adapters import ArrayAdapter, ArraySpec, adapter_for
from statevault.errors import UnsupportedValueError
from statevault.format import tree
from statevault.stateful import is_stateful, type_name


@dataclass
class Leaf:
    """One array to store: the object, how to read it, and the first key path reaching it."""

    path: str
    adapter: ArrayAdapter
    value: Any
    spec: ArraySpec


@dataclass
class SavePlan:
    tree: tree.Node
    metadata: tree.Node
    leaves: list[Leaf] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(leaf.spec.nbytes for leaf in self.leaves)

    def frameworks(self) -> set[str]:
        return {leaf.adapter.framework for leaf in self.leaves}


class _Planner:
    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self.seen: dict[Hashable, int] = {}

    def encode_leaf(self, value: Any, path: str) -> tree.Node | None:
        if _is_numpy_scalar(value):
            return self.numpy_scalar(value, path)
        adapter = adapter_for(value)
        if adapter is not None:
            return {"$": "tensor", "id": self.array(adapter, value, path)}
        if is_stateful(value):
            state = value.state_dict()
            return {
                "$": "stateful",
                "type": type_name(value),
                "state": tree.encode(state, self.encode_leaf, path),
            }
        return None

    def array(self, adapter: ArrayAdapter, value: Any, path: str) -> int:
        spec = adapter.describe(value, path)  # validates first: identity needs a plain tensor
        identity = adapter.identity(value)
        if identity is not None and identity in self.seen:
            return self.seen[identity]
        self.leaves.append(Leaf(path, adapter, value, spec))
        index = len(self.leaves) - 1
        if identity is not None:
            self.seen[identity] = index
        return index

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


def plan_save(state: Any, metadata: Any = None) -> SavePlan:
    """Encode ``state`` and ``metadata``; raises UnsupportedValueError naming a bad key path."""
    planner = _Planner()
    encoded = tree.encode(state, planner.encode_leaf)
    encoded_metadata = tree.encode(metadata, _reject_arrays("metadata"), "metadata")
    return SavePlan(encoded, encoded_metadata, planner.leaves)


def _reject_arrays(root: str) -> tree.LeafEncoder:
    def encode_leaf(value: Any, path: str) -> None:
        raise UnsupportedValueError(
            path,
            f"{root} holds plain values only (numbers, str, bytes, lists, dicts), "
            f"not {type(value).__qualname__}",
        )

    return encode_leaf
