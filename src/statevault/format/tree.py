"""Key-path flattening of nested state into JSON nodes, and back.

A state is a tree of dicts, lists, tuples, plain values and leaves (arrays, Stateful objects).
:func:`encode` turns it into JSON-safe nodes with the exact python types kept:

=====================  ==================================================================
value                  node
=====================  ==================================================================
None, bool, int, str   itself
float                  itself when finite, else ``{"$": "float", "v": "nan" | "inf" | "-inf"}``
complex                ``{"$": "complex", "re": float, "im": float}``
bytes                  ``{"$": "bytes", "b64": ...}``
list                   a JSON array of nodes
tuple                  ``{"$": "tuple", "items": [...]}``
dict / OrderedDict     ``{"$": "dict" | "odict", "v": {...}}`` when every key is a str, else
                       ``"items": [[key, value], ...]``; ``"meta"`` holds torch's ``_metadata``
array leaf             ``{"$": "tensor", "id": n}``: row n of the manifest's ``tensors``
numpy scalar           ``{"$": "npscalar", "dtype": "float32", "v": node}``
Stateful object        ``{"$": "stateful", "type": "pkg.Class", "state": node}``
sharded tensor         ``{"$": "sharded", "id": n}``: row n of ``sharded`` (format 2)
per-rank subtree       ``{"$": "per_rank", "ranks": [node, ...]}``: one per saving rank (2)
=====================  ==================================================================

Any other value raises :class:`UnsupportedValueError` naming its key path. This module is pure:
what counts as an array leaf or a Stateful object is decided by the callbacks it is given.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from statevault.errors import CorruptCheckpointError, UnsupportedValueError

Node = Any
MAX_DEPTH = 200
# The numpy scalar types the format stores (their values are exact as python numbers).
NUMPY_SCALAR_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)
_MAX_INT_BITS = 13_000  # ~3,900 digits: below python's 4,300-digit limit for int <-> str
_PLAIN_KEY_TYPES = (str, int, float, bool, type(None), bytes, tuple)

# Called with (value, key_path) for every value that is not a container or plain value.
# Returns a node (tensor, stateful, npscalar) or None when it does not recognise the value.
LeafEncoder = Callable[[Any, str], "Node | None"]
# Called with a tensor node's id, returns the loaded array.
TensorResolver = Callable[[int], Any]
# Called with the number of branches of a per_rank node, returns the branch to decode (the
# caller's rank, or its documented stand-in when the world size changed).
RankPicker = Callable[[int], int]


def join_path(parent: str, key: object) -> str:
    """The display key path of ``key`` under ``parent``: ``model/layer.weight``, ``state/0``."""
    text = key.decode("latin-1") if isinstance(key, bytes) else str(key)
    return f"{parent}/{text}" if parent else text


def encode(value: Any, encode_leaf: LeafEncoder, path: str = "", depth: int = 0) -> Node:
    """The JSON node of ``value``; ``encode_leaf`` handles arrays and Stateful objects."""
    if depth > MAX_DEPTH:
        raise UnsupportedValueError(path, f"nesting deeper than {MAX_DEPTH} levels")
    if type(value) is int and value.bit_length() > _MAX_INT_BITS:
        raise UnsupportedValueError(path, "integers beyond 3900 decimal digits are not supported")
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return _encode_float(value)
    if type(value) is complex:
        return {"$": "complex", "re": _encode_float(value.real), "im": _encode_float(value.imag)}
    if type(value) is bytes:
        return {"$": "bytes", "b64": base64.b64encode(value).decode("ascii")}
    if type(value) is list:
        return [encode(v, encode_leaf, join_path(path, i), depth + 1) for i, v in enumerate(value)]
    if type(value) is tuple:
        items = [encode(v, encode_leaf, join_path(path, i), depth + 1) for i, v in enumerate(value)]
        return {"$": "tuple", "items": items}
    if type(value) in (dict, OrderedDict):
        return _encode_dict(value, encode_leaf, path, depth)
    node = encode_leaf(value, path)
    if node is not None:
        return node
    raise UnsupportedValueError(path, _unsupported_hint(value))


def _encode_float(value: float) -> Node:
    if math.isfinite(value):
        return value
    return {"$": "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _encode_dict(value: dict[Any, Any], encode_leaf: LeafEncoder, path: str, depth: int) -> Node:
    tag = "odict" if type(value) is OrderedDict else "dict"
    node: dict[str, Any] = {"$": tag}
    if all(type(k) is str for k in value):
        node["v"] = {
            k: encode(v, encode_leaf, join_path(path, k), depth + 1) for k, v in value.items()
        }
    else:
        node["items"] = [
            [_encode_key(k, path), encode(v, encode_leaf, join_path(path, k), depth + 1)]
            for k, v in value.items()
        ]
    meta = getattr(value, "_metadata", None)
    if meta is not None:
        node["meta"] = encode(meta, _no_leaves, join_path(path, "_metadata"), depth + 1)
    return node


def _encode_key(key: object, path: str) -> Node:
    if not isinstance(key, _PLAIN_KEY_TYPES) or (type(key) not in _PLAIN_KEY_TYPES):
        raise UnsupportedValueError(
            join_path(path, key),
            f"dict key of type {type(key).__name__}; keys must be str, int, float, bool, "
            "None, bytes or tuples of these",
        )
    return encode(key, _no_leaves, path)


def _no_leaves(value: Any, path: str) -> None:
    return None


def _unsupported_hint(value: Any) -> str:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, dict):
        return f"a {kind} (a dict subclass); convert it with dict(...) before saving"
    if isinstance(value, (list, tuple)):
        return f"a {kind} (a list/tuple subclass); convert it to a plain list or tuple"
    return (
        f"values of type {kind} are not supported; store tensors, arrays, numbers, str, bytes, "
        "None, or dicts/lists/tuples of these, or give the object state_dict() and "
        "load_state_dict() methods so that it is saved as a Stateful"
    )


class _Decoder:
    """Rebuilds a tree from nodes read from a manifest. Every node is checked: input is hostile."""

    def __init__(
        self,
        resolve_tensor: TensorResolver,
        where: str,
        resolve_sharded: TensorResolver | None,
        pick_rank: RankPicker | None,
        ranks: int | None = None,
    ) -> None:
        self.ranks = ranks
        self.resolve_tensor = resolve_tensor
        self.resolve_sharded = resolve_sharded
        self.pick_rank = pick_rank
        self.where = where

    def fail(self, path: str, detail: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.where}: malformed tree at {path or '<root>'}: {detail}"
        )

    def node(self, node: Node, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nesting deeper than {MAX_DEPTH} levels")
        if node is None or type(node) in (bool, int, str, float):
            return node
        if type(node) is list:
            return [self.node(v, join_path(path, i), depth + 1) for i, v in enumerate(node)]
        if type(node) is not dict:
            raise self.fail(path, f"unexpected JSON value of type {type(node).__name__}")
        tag = node.get("$")
        handler = _TAG_HANDLERS.get(tag) if isinstance(tag, str) else None
        if handler is None:
            raise self.fail(path, f"unknown node type {tag!r}")
        return handler(self, node, path, depth)

    def field(self, node: dict[str, Any], name: str, kind: type, path: str) -> Any:
        value = node.get(name)
        if type(value) is not kind:
            raise self.fail(path, f"field {name!r} should be a {kind.__name__}")
        return value

    def float_(self, node: dict[str, Any], path: str, depth: int) -> float:
        text = node.get("v")
        if text not in ("nan", "inf", "-inf"):
            raise self.fail(path, f"bad float {text!r}")
        return float(text)

    def number(self, value: Any, path: str) -> float:
        result = self.node(value, path, MAX_DEPTH)
        if type(result) not in (int, float):
            raise self.fail(path, "expected a number")
        try:
            return float(result)
        except OverflowError:
            raise self.fail(path, "number out of range") from None

    def complex_(self, node: dict[str, Any], path: str, depth: int) -> complex:
        return complex(self.number(node.get("re"), path), self.number(node.get("im"), path))

    def bytes_(self, node: dict[str, Any], path: str, depth: int) -> bytes:
        text = self.field(node, "b64", str, path)
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise self.fail(path, f"bad base64: {exc}") from None

    def tuple_(self, node: dict[str, Any], path: str, depth: int) -> tuple[Any, ...]:
        items = self.field(node, "items", list, path)
        return tuple(self.node(v, join_path(path, i), depth + 1) for i, v in enumerate(items))

    def dict_(self, node: dict[str, Any], path: str, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = OrderedDict() if node["$"] == "odict" else {}
        if "v" in node:
            for key, value in self.field(node, "v", dict, path).items():
                result[key] = self.node(value, join_path(path, key), depth + 1)
        else:
            for pair in self.field(node, "items", list, path):
                if type(pair) is not list or len(pair) != 2:
                    raise self.fail(path, "dict items must be [key, value] pairs")
                key = self.key(pair[0], path, depth + 1)
                try:
                    hash(key)
                except TypeError:
                    raise self.fail(path, f"unhashable dict key {key!r}") from None
                result[key] = self.node(pair[1], join_path(path, key), depth + 1)
        if "meta" in node:
            if type(result) is not OrderedDict:
                raise self.fail(path, "only an odict node may have meta")
            meta = self.node(node["meta"], join_path(path, "_metadata"), depth + 1)
            result._metadata = meta  # type: ignore[attr-defined]
        return result

    def key(self, node: Node, path: str, depth: int) -> Any:
        """A dict key: a plain value only (writers never put arrays or states in keys)."""
        if type(node) is dict and node.get("$") not in _KEY_TAGS:
            raise self.fail(path, f"a dict key cannot be a {str(node.get('$'))[:40]!r} node")
        if type(node) is list:
            raise self.fail(path, "a dict key cannot be a list")
        if type(node) is dict and node.get("$") == "tuple":
            items = self.field(node, "items", list, path)
            return tuple(self.key(item, path, depth + 1) for item in items)
        return self.node(node, path, depth)

    def tensor(self, node: dict[str, Any], path: str, depth: int) -> Any:
        return self.resolve_tensor(self.field(node, "id", int, path))

    def sharded(self, node: dict[str, Any], path: str, depth: int) -> Any:
        index = self.field(node, "id", int, path)
        if self.resolve_sharded is None:
            raise self.fail(path, "a sharded tensor in a checkpoint without sharded tensors")
        return self.resolve_sharded(index)

    def per_rank(self, node: dict[str, Any], path: str, depth: int) -> Any:
        branches = self.field(node, "ranks", list, path)
        if not branches or (self.ranks is not None and len(branches) != self.ranks):
            raise self.fail(
                path, f"a per_rank node with {len(branches)} branches, not {self.ranks}"
            )
        if self.pick_rank is None:  # validate every branch, give back rank 0's
            decoded = [
                self.node(b, join_path(path, f"<rank {i}>"), depth + 1)
                for i, b in enumerate(branches)
            ]
            return decoded[0]
        chosen = self.pick_rank(len(branches))
        return self.node(branches[chosen], path, depth + 1)

    def npscalar(self, node: dict[str, Any], path: str, depth: int) -> Any:
        import numpy as np

        dtype_name = self.field(node, "dtype", str, path)
        value = self.node(node.get("v"), path, depth + 1)
        if type(value) not in (bool, int, float, complex):
            raise self.fail(
                path, f"numpy scalar value must be a number, not {type(value).__name__}"
            )
        if dtype_name not in NUMPY_SCALAR_DTYPES:
            raise self.fail(path, f"numpy scalar dtype {dtype_name[:40]!r} is not one writers use")
        try:
            return np.dtype(dtype_name).type(value)
        except (TypeError, ValueError, OverflowError):
            raise self.fail(path, f"bad numpy scalar {dtype_name}:{value!r}") from None

    def stateful(self, node: dict[str, Any], path: str, depth: int) -> Any:
        self.field(node, "type", str, path)
        return self.node(node.get("state"), path, depth + 1)


_KEY_TAGS = frozenset(["float", "complex", "bytes", "tuple"])

_TAG_HANDLERS: dict[str, Callable[[_Decoder, dict[str, Any], str, int], Any]] = {
    "float": _Decoder.float_,
    "complex": _Decoder.complex_,
    "bytes": _Decoder.bytes_,
    "tuple": _Decoder.tuple_,
    "dict": _Decoder.dict_,
    "odict": _Decoder.dict_,
    "tensor": _Decoder.tensor,
    "npscalar": _Decoder.npscalar,
    "stateful": _Decoder.stateful,
    "sharded": _Decoder.sharded,
    "per_rank": _Decoder.per_rank,
}


def decode(
    node: Node,
    resolve_tensor: TensorResolver,
    where: str = "checkpoint",
    *,
    resolve_sharded: TensorResolver | None = None,
    pick_rank: RankPicker | None = None,
    ranks: int | None = None,
) -> Any:
    """The tree a node encodes; tensors come from ``resolve_tensor(id)``, sharded tensors from
    ``resolve_sharded(id)``; ``pick_rank`` chooses the branch of per-rank nodes (default: every
    branch is checked and rank 0's is returned).

    Raises CorruptCheckpointError for anything malformed (``where`` names the checkpoint).
    """
    try:
        decoder = _Decoder(resolve_tensor, where, resolve_sharded, pick_rank, ranks)
        return decoder.node(node, "", 0)
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: tree nested too deeply") from None
