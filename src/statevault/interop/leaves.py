"""The arrays of an encoded (sub)tree, named by key path: what an export writes.

Walks a manifest's tree (``statevault.format.tree`` nodes) without decoding it: dicts, ordered
dicts, lists and tuples holding arrays are descended, Stateful objects are stepped through to
their state (so ``model/0.weight``, as everywhere in statevault), ``tensor`` and ``sharded``
nodes become :class:`Leaf` rows. Everything else is counted as skipped: one per plain value
(numbers, strings, ``None``, numpy scalars) or container of plain values only (a list of ints
counts once), and one per per-rank subtree (RNG streams, data positions: one value per saving
rank, not weights).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from statevault.errors import CorruptCheckpointError
from statevault.format import tree as tree_codec
from statevault.format import tree_paths

_MAX_DEPTH = 200


@dataclass(frozen=True)
class Leaf:
    """One array to export: the parts of its key path relative to the exported subtree (each
    a dict key's display text or a list index), the tag of its node (``tensor`` or
    ``sharded``) and the row id it refers to."""

    parts: tuple[str, ...]
    kind: str
    id: int

    @property
    def name(self) -> str:
        """The key path as statevault shows it: ``model/0.weight``."""
        return "/".join(self.parts)


@dataclass
class Leaves:
    arrays: list[Leaf] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # what was not exported, by kind


def collect(node: Any, where: str = "checkpoint") -> Leaves:
    """The array leaves of ``node`` in tree order, and counts of what was skipped."""
    found = Leaves()
    _walk(node, (), found, 0, where)
    return found


def _walk(node: Any, path: tuple[str, ...], found: Leaves, depth: int, where: str) -> None:
    if depth > _MAX_DEPTH:
        raise CorruptCheckpointError(f"{where}: tree nested deeper than {_MAX_DEPTH} levels")
    if _holds_no_array(node):  # a plain value, or a container of plain values: one skipped
        found.skipped["per_rank" if _tag(node) == "per_rank" else "value"] += 1
        return
    if type(node) is list:
        for index, item in enumerate(node):
            _walk(item, (*path, _part(index)), found, depth + 1, where)
        return
    if type(node) is not dict:
        found.skipped["value"] += 1  # None, bool, int, float, str
        return
    tag = node.get("$")
    if tag in ("tensor", "sharded") and type(node.get("id")) is int:
        found.arrays.append(Leaf(path, tag, node["id"]))
    elif tag == "tuple" and type(node.get("items")) is list:
        for index, item in enumerate(node["items"]):
            _walk(item, (*path, _part(index)), found, depth + 1, where)
    elif tag in ("dict", "odict"):
        for key, value in _dict_items(node, where):
            _walk(value, (*path, _part(key)), found, depth + 1, where)
    elif tag == "stateful":
        _walk(node.get("state"), path, found, depth + 1, where)
    elif tag == "per_rank":
        found.skipped["per_rank"] += 1
    else:  # float, complex, bytes, npscalar
        found.skipped["value"] += 1


def _part(key: object) -> str:
    return tree_codec.join_path("", key)


def _tag(node: Any) -> Any:
    return node.get("$") if type(node) is dict else None


def _holds_no_array(node: Any) -> bool:
    return not tree_paths.tensor_ids(node) and not tree_paths.tensor_ids(node, tag="sharded")


def _dict_items(node: dict[str, Any], where: str) -> list[tuple[object, Any]]:
    if type(node.get("v")) is dict:
        return list(node["v"].items())
    pairs = []
    for pair in node.get("items", []):
        if type(pair) is not list or len(pair) != 2:
            raise CorruptCheckpointError(f"{where}: a dict node holds a malformed pair")
        key = tree_codec.decode(pair[0], _no_tensor, where)
        pairs.append((key, pair[1]))
    return pairs


def _no_tensor(index: int) -> Any:
    raise CorruptCheckpointError(f"a dict key refers to tensor {index}")
