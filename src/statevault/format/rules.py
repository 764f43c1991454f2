"""Sharding rules: a regularly sharded tensor described by its rule instead of a row per chunk.

A rule is what a DTensor's layout says (docs/FORMAT.md section 14.2): a device mesh (its shape
and the rank at every coordinate, row-major) and one placement per mesh dimension, ``shard`` on
a tensor dimension (``torch.chunk`` semantics, applied in mesh-dimension order, so two shards of
one tensor dimension nest) or ``replicate`` (with the coordinate on that dimension whose holders
write the piece). From it any reader computes, for any coordinate, the box that coordinate holds
and the rank that wrote it, and for any box it wants, the few pieces that overlap it, without
reading a row per chunk. Pure arithmetic, property-tested against torch's own
``_compute_local_shape_and_global_offset``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from statevault.format.geometry import Box, intersect

SHARD = "shard"
REPLICATE = "replicate"
MAX_MESH_DIMS = 8


class RuleError(ValueError):
    """A rule that cannot describe its tensor (a hostile or damaged record)."""


@dataclass(frozen=True)
class ShardRule:
    """``mesh``: the mesh's shape; ``first_rank``: the ranks are ``first_rank`` onwards in
    row-major order, unless ``ranks`` lists them; ``placements``: per mesh dimension
    ``("shard", tensor_dim)`` or ``("replicate", writer_coordinate)``."""

    mesh: tuple[int, ...]
    placements: tuple[tuple[str, int], ...]
    first_rank: int = 0
    ranks: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return math.prod(self.mesh)

    def rank_at(self, coordinate: Sequence[int]) -> int:
        flat = 0
        for position, extent in zip(coordinate, self.mesh, strict=True):
            flat = flat * extent + position
        return self.ranks[flat] if self.ranks is not None else self.first_rank + flat

    def coordinate_of(self, rank: int) -> tuple[int, ...] | None:
        """The coordinate of ``rank`` in the mesh, or None when it is not in it."""
        if self.ranks is not None:
            flat = self._flat_by_rank.get(rank, -1)
        else:
            flat = rank - self.first_rank if 0 <= rank - self.first_rank < self.size else -1
        if flat < 0:
            return None
        coordinate = []
        for extent in reversed(self.mesh):
            flat, position = divmod(flat, extent)
            coordinate.append(position)
        return tuple(reversed(coordinate))

    def writes(self, coordinate: Sequence[int]) -> bool:
        """Whether the holder at ``coordinate`` is the one that wrote its piece."""
        return all(
            kind == SHARD or position == value
            for (kind, value), position in zip(self.placements, coordinate, strict=True)
        )

    @functools.cached_property
    def _flat_by_rank(self) -> dict[int, int]:
        return {rank: flat for flat, rank in enumerate(self.ranks or ())}

    def piece(self, shape: Sequence[int], coordinate: Sequence[int]) -> Box:
        """The box the holders at ``coordinate`` hold (as DTensor lays it out: an empty piece
        starts at the end of the dimension it is empty in)."""
        offsets = [0] * len(shape)
        sizes = list(shape)
        empty = [False] * len(shape)
        for (kind, value), position, count in zip(
            self.placements, coordinate, self.mesh, strict=True
        ):
            if kind != SHARD:
                continue
            size, start = chunk_of(sizes[value], count, position)
            offsets[value] += start
            sizes[value] = size
            empty[value] = empty[value] or size == 0
        for dim, is_empty in enumerate(empty):
            if is_empty:
                offsets[dim] = shape[dim]
        return Box(tuple(offsets), tuple(sizes))

    def written(self) -> Iterator[tuple[tuple[int, ...], int]]:
        """Every written piece: the coordinate of its writer, and the writer's rank."""
        axes = [
            range(count) if kind == SHARD else range(value, value + 1)
            for (kind, value), count in zip(self.placements, self.mesh, strict=True)
        ]
        for coordinate in itertools.product(*axes):
            yield coordinate, self.rank_at(coordinate)

    def overlapping(
        self, shape: Sequence[int], box: Box
    ) -> Iterator[tuple[tuple[int, ...], int, Box]]:
        """The written pieces that share an element with ``box``: coordinate, rank, piece.
        Only the coordinates whose ranges can overlap are visited, mesh dimension by mesh
        dimension, so a rank wanting its own piece visits a handful, not the whole mesh."""

        def walk(
            dim: int, coordinate: list[int], offsets: list[int], sizes: list[int]
        ) -> Iterator[tuple[tuple[int, ...], int, Box]]:
            if dim == len(self.mesh):
                piece = self.piece(shape, coordinate)
                if piece.numel and intersect(piece, box) is not None:
                    yield tuple(coordinate), self.rank_at(coordinate), piece
                return
            kind, value = self.placements[dim]
            if kind != SHARD:
                yield from walk(dim + 1, [*coordinate, value], offsets, sizes)
                return
            count = self.mesh[dim]
            for position in _positions(sizes[value], count, offsets[value], box, value):
                size, start = chunk_of(sizes[value], count, position)
                inner_offsets, inner_sizes = list(offsets), list(sizes)
                inner_offsets[value] += start
                inner_sizes[value] = size
                yield from walk(dim + 1, [*coordinate, position], inner_offsets, inner_sizes)

        yield from walk(0, [], [0] * len(shape), list(shape))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mesh": list(self.mesh),
            "placements": [[kind, value] for kind, value in self.placements],
        }
        if self.ranks is not None:
            doc["ranks"] = list(self.ranks)
        else:
            doc["first_rank"] = self.first_rank
        return doc


def chunk_of(extent: int, count: int, position: int) -> tuple[int, int]:
    """(size, start) of piece ``position`` of ``count`` when ``extent`` elements are split as
    ``torch.chunk`` splits them: pieces of ``ceil(extent / count)``, the last ones short or
    empty; an empty piece starts at ``extent``."""
    full = -(-extent // count) if count else 0
    start = min(extent, full * position)
    end = min(extent, full * (position + 1))
    return max(0, end - start), start


def _positions(extent: int, count: int, base: int, box: Box, dim: int) -> range:
    """The positions along one shard dimension whose pieces can overlap ``box`` on ``dim``."""
    full = -(-extent // count) if count else 0
    if full == 0:
        return range(0)
    low = box.offsets[dim] - base
    high = low + box.sizes[dim]  # exclusive, relative to this level's start
    first = max(0, low // full)
    last = min(count - 1, (high - 1) // full) if high > 0 else -1
    return range(first, last + 1)


def parse_rule(doc: Any, shape: Sequence[int], world: int) -> ShardRule:
    """A rule read from a manifest, checked before any of it is used: a bounded mesh whose
    every coordinate names a distinct rank of the job, placements that name tensor dimensions
    and coordinates inside the mesh."""
    if type(doc) is not dict:
        raise RuleError("the rule is not an object")
    mesh = doc.get("mesh")
    if type(mesh) is not list or not 1 <= len(mesh) <= MAX_MESH_DIMS:
        raise RuleError(f"mesh must list 1 to {MAX_MESH_DIMS} sizes")
    if any(type(d) is not int or d < 1 for d in mesh):
        raise RuleError("mesh sizes must be positive ints")
    size = math.prod(mesh)
    if size > world:
        raise RuleError(f"a mesh of {size} coordinates in a job of {world} ranks")
    placements = _placements(doc.get("placements"), mesh, len(shape))
    if "ranks" in doc:
        ranks = doc["ranks"]
        if type(ranks) is not list or len(ranks) != size:
            raise RuleError(f"ranks must list one rank per mesh coordinate ({size})")
        if any(type(r) is not int or not 0 <= r < world for r in ranks):
            raise RuleError(f"ranks must lie in 0..{world - 1}")
        if len(set(ranks)) != size:
            raise RuleError("a rank appears twice in the mesh")
        return ShardRule(tuple(mesh), placements, 0, tuple(ranks))
    first = doc.get("first_rank")
    if type(first) is not int or first < 0 or first + size > world:
        raise RuleError(f"first_rank must leave the mesh's {size} ranks inside 0..{world - 1}")
    return ShardRule(tuple(mesh), placements, first, None)


def _placements(doc: Any, mesh: list[int], ndim: int) -> tuple[tuple[str, int], ...]:
    if type(doc) is not list or len(doc) != len(mesh):
        raise RuleError("placements must give one placement per mesh dimension")
    placements = []
    for item, count in zip(doc, mesh, strict=True):
        if type(item) is not list or len(item) != 2 or type(item[1]) is not int:
            raise RuleError("a placement is [kind, int]")
        kind, value = item
        if kind == SHARD and not 0 <= value < ndim:
            raise RuleError(f"a shard placement names dimension {value} of a {ndim}-d tensor")
        if kind == REPLICATE and not 0 <= value < count:
            raise RuleError(f"a replicate placement names coordinate {value} of {count}")
        if kind not in (SHARD, REPLICATE):
            raise RuleError(f"unknown placement {str(kind)[:20]!r}")
        placements.append((str(kind), value))
    return tuple(placements)
