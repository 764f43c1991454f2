"""Chunk geometry, pure offset arithmetic: where the pieces of a sharded tensor lie.

A *chunk* is a box inside a tensor of global shape ``G``: ``offsets[d] + sizes[d] <= G[d]`` for
every dimension ``d``. A sharded tensor is stored as chunks that must be in bounds, pairwise
disjoint and together cover the whole tensor (:func:`check_chunks`). A load into another layout
asks, for the box it wants, which stored chunks overlap it and where (:func:`overlaps`); the
bytes of an overlap inside a stored chunk lie in one flat span (:func:`flat_span`) that a ranged
read fetches. Nothing here imports torch: the functions are property-tested on their own.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """A chunk: the box ``[offsets, offsets + sizes)`` of a tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (which must contain it)."""
        return Box(
            tuple(o - b for o, b in zip(self.offsets, outer.offsets, strict=True)), self.sizes
        )


class GeometryError(ValueError):
    """Chunks that do not tile their tensor: out of bounds, overlapping or leaving a gap."""


def intersect(a: Box, b: Box) -> Box | None:
    """The box where ``a`` and ``b`` overlap, or None when they share no element."""
    offsets = []
    sizes = []
    for a_off, a_size, b_off, b_size in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True):
        start = max(a_off, b_off)
        end = min(a_off + a_size, b_off + b_size)
        if end <= start:
            return None
        offsets.append(start)
        sizes.append(end - start)
    return Box(tuple(offsets), tuple(sizes))


def check_chunks(shape: Sequence[int], chunks: Sequence[Box], complete: bool = True) -> None:
    """Raise GeometryError unless ``chunks`` are in bounds, disjoint and cover ``shape``
    (``complete``; else some of a tensor's chunks, which need not cover it).

    Empty chunks (a rank holding no rows of an unevenly sharded tensor) are allowed anywhere in
    bounds. The overlap test sweeps the chunks in order of their start in dimension 0 and
    compares each only with the chunks still open there: O(n log n) for the row tilings of
    FSDP (at most one chunk is open), O(n k) when k chunks share rows (a k-way split of the
    other dimensions), never more than the n^2 / 2 pairs of a plain pairwise test. The coverage
    test is a sum of volumes, exact once chunks are disjoint.
    """
    shape = tuple(shape)
    for index, chunk in enumerate(chunks):
        if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
            raise GeometryError(f"chunk {index} has {len(chunk.offsets)} dims, tensor {len(shape)}")
        for dim, (offset, size, extent) in enumerate(
            zip(chunk.offsets, chunk.sizes, shape, strict=True)
        ):
            if offset < 0 or size < 0 or offset + size > extent:
                raise GeometryError(
                    f"chunk {index} spans [{offset}, {offset + size}) in dim {dim} of size {extent}"
                )
    solid = [(i, c) for i, c in enumerate(chunks) if c.numel > 0]
    overlap = _first_overlap(solid)
    if overlap is not None:
        raise GeometryError(f"chunks {overlap[0]} and {overlap[1]} overlap")
    covered = sum(chunk.numel for _, chunk in solid)
    if complete and covered != math.prod(shape):
        raise GeometryError(f"chunks cover {covered} of the tensor's {math.prod(shape)} elements")


def _first_overlap(solid: Sequence[tuple[int, Box]]) -> tuple[int, int] | None:
    """Two non-empty chunks that overlap (their indices, lower first), or None.

    A sweep over dimension 0: chunks are taken by their start there; a heap keyed by their end
    holds the chunks still open, and each chunk is compared only with those (which overlap it in
    dimension 0 by construction). 0-d chunks (a scalar tensor) all overlap one another.
    """
    if not solid:
        return None
    if not solid[0][1].offsets:
        return (solid[0][0], solid[1][0]) if len(solid) > 1 else None
    ordered = sorted(solid, key=lambda item: item[1].offsets[0])
    open_chunks: list[tuple[int, int, Box]] = []  # (end in dim 0, index, chunk)
    for index, chunk in ordered:
        start = chunk.offsets[0]
        while open_chunks and open_chunks[0][0] <= start:
            heapq.heappop(open_chunks)
        for _, other_index, other in open_chunks:
            if intersect(chunk, other) is not None:
                return min(index, other_index), max(index, other_index)
        heapq.heappush(open_chunks, (start + chunk.sizes[0], index, chunk))
    return None


def overlaps(stored: Sequence[Box], wanted: Box) -> list[tuple[int, Box]]:
    """For a wanted box, each stored chunk it overlaps: (chunk index, overlap in global coords)."""
    found = []
    for index, chunk in enumerate(stored):
        if chunk.numel == 0:
            continue
        common = intersect(chunk, wanted)
        if common is not None:
            found.append((index, common))
    return found


def flat_span(sizes: Sequence[int], region: Box) -> tuple[int, int]:
    """The [first, last + 1) flat (row-major) element indices of ``region`` inside an array of
    shape ``sizes``: the smallest contiguous span holding every element of the region.

    For the usual row sharding (the region spans whole trailing dimensions) the span holds
    exactly the region's elements, so a ranged read fetches nothing more.
    """
    if region.numel == 0:
        return 0, 0
    first = 0
    last = 0
    for size, offset, extent in zip(sizes, region.offsets, region.sizes, strict=True):
        first = first * size + offset
        last = last * size + offset + extent - 1
    return first, last + 1


def split_evenly(extent: int, parts: int) -> list[tuple[int, int]]:
    """(offset, size) of ``parts`` row blocks of ``extent`` rows, as torch.chunk splits them:
    ceil-sized blocks, the trailing ones shorter or empty (the uneven-shard layout of DTensor)."""
    step = -(-extent // parts) if parts else 0
    blocks = []
    for part in range(parts):
        start = min(part * step, extent)
        blocks.append((start, min(step, extent - start)))
    return blocks
