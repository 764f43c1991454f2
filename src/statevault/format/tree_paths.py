"""Finding things in an encoded tree without decoding it: the node at a key path (a partial
load, ``inspect --only``), the child of a container, and the tensor ids a subtree refers to
(what a load must read)."""

from __future__ import annotations

from typing import Any

from statevault.errors import CorruptCheckpointError
from statevault.format.tree import MAX_DEPTH, Node, RankPicker, decode, join_path


def subtree(node: Node, path: str, where: str = "checkpoint", rank: int = 0) -> Node:
    """The encoded node at key path ``path`` (``model`` or ``optimizer/state/0``), matching each
    component against the display text of dict keys and against list and tuple indices; a
    Stateful node is stepped through to its state, a per-rank node to branch ``rank`` (modulo
    its length). KeyError when nothing is there."""
    current = node
    for part in [p for p in path.split("/") if p]:
        current = _child(_unwrap(current, rank), part)
        if current is _MISSING:
            raise KeyError(f"{where} has nothing at {path!r} (no {part!r} there)")
    return current


_MISSING = object()


def subtree_child(node: Node, key: object) -> Node:
    """The child of a container node under ``key`` (matched by its display text), or None."""
    child = _child(_unwrap(node), join_path("", key))
    return None if child is _MISSING else child


def _unwrap(node: Node, rank: int = 0) -> Node:
    return unwrap(node, lambda count: rank % count)


def unwrap(node: Node, pick_rank: RankPicker) -> Node:
    """Step through stateful nodes to their state and per-rank nodes to the branch
    ``pick_rank(len(branches))``; a per-rank node without branches is returned as it is."""
    for _ in range(MAX_DEPTH):
        if type(node) is not dict or node.get("$") not in ("stateful", "per_rank"):
            return node
        if node["$"] == "stateful":
            node = node.get("state")
            continue
        branches = node.get("ranks")
        if type(branches) is not list or not branches:
            return node
        node = branches[pick_rank(len(branches))]
    return node


def _child(node: Node, part: str) -> Node:
    items: Any = None
    if type(node) is list:
        items = node
    elif type(node) is dict and node.get("$") == "tuple":
        items = node.get("items")
    if items is not None:
        if type(items) is list and part.isdigit() and int(part) < len(items):
            return items[int(part)]
        return _MISSING
    if type(node) is not dict or node.get("$") not in ("dict", "odict"):
        return _MISSING
    if type(node.get("v")) is dict:
        return node["v"].get(part, _MISSING)
    for pair in node.get("items", []):
        if type(pair) is list and len(pair) == 2 and _key_text(pair[0]) == part:
            return pair[1]
    return _MISSING


def _key_text(key_node: Node) -> str:
    try:
        key = decode(key_node, lambda i: None)
    except CorruptCheckpointError:
        return ""
    return join_path("", key)


_LEAF_TAGS = frozenset({"tensor", "sharded"})  # nodes that hold only an id: nothing inside


def tensor_ids(node: Node, depth: int = 0, tag: str = "tensor") -> set[int]:
    """The ids of every ``tag`` node (``tensor`` or ``sharded``) an encoded subtree refers to
    (what a partial load must read). Nodes deeper than ``MAX_DEPTH`` are not visited (the
    decoder refuses such trees), nor the inside of tensor nodes (the decoder reads only their
    ``id``)."""
    found: set[int] = set()
    # A loop over an explicit stack, not recursion: this walks every node of every load.
    stack: list[tuple[Any, int]] = [(node, depth)]
    pop, push = stack.pop, stack.append
    while stack:
        item, level = pop()
        if level > MAX_DEPTH:
            continue
        if type(item) is dict:
            kind = item.get("$")
            if type(kind) is str and kind in _LEAF_TAGS:
                if kind == tag and type(item.get("id")) is int:
                    found.add(item["id"])
                continue
            children: Any = item.values()
        elif type(item) is list:
            children = item
        else:
            continue
        level += 1
        for child in children:
            if type(child) is dict or type(child) is list:
                push((child, level))
    return found
