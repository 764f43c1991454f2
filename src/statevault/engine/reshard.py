"""Resharding reads: fill any box of a logical tensor from the chunks it was saved in.

A *logical* tensor is what a tree node refers to: a plain stored tensor (one chunk covering it)
or a sharded tensor (its chunks). A load asks for a box: the whole tensor (a full load, or a
plain destination) or one rank's piece (a DTensor destination). For each stored chunk the box
overlaps, the overlap's rows are fetched with one verified ranged read and copied into place.
Only numpy is used here: arrays are handled as opaque items of the dtype's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from statevault.engine.parallel import map_threads
from statevault.engine.regions import RegionReader
from statevault.format import dtypes
from statevault.format.geometry import Box, flat_span, overlaps
from statevault.format.manifest import Manifest, TensorEntry

_READ_THREADS = 8


@dataclass(frozen=True)
class Logical:
    """A tensor as the tree sees it, and the stored chunks that hold it."""

    entry: TensorEntry  # path, framework, dtype and attrs; shape is the global shape
    chunks: tuple[tuple[Box, TensorEntry], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def itemsize(self) -> int:
        return dtypes.lookup(self.entry.dtype).itemsize


def plain_logical(manifest: Manifest, index: int) -> Logical:
    entry = manifest.tensors[index]
    return Logical(entry, ((Box((0,) * len(entry.shape), entry.shape), entry),))


def sharded_logical(manifest: Manifest, index: int) -> Logical:
    sharded = manifest.sharded[index]
    chunks = tuple(
        (Box(c.offsets, manifest.tensors[c.tensor].shape), manifest.tensors[c.tensor])
        for c in sharded.chunks
    )
    itemsize = dtypes.lookup(sharded.dtype).itemsize
    whole = TensorEntry(
        path=sharded.path,
        framework=sharded.framework,
        dtype=sharded.dtype,
        shape=sharded.shape,
        file="",
        offset=0,
        nbytes=math.prod(sharded.shape) * itemsize,
        checksum="crc32c:00000000",
        attrs=dict(sharded.attrs),
    )
    return Logical(whole, chunks)


def box_entry(logical: Logical, box: Box) -> TensorEntry:
    """A tensor row describing ``box`` of ``logical`` (what an adapter allocates for it)."""
    entry = logical.entry
    return TensorEntry(
        path=entry.path,
        framework=entry.framework,
        dtype=entry.dtype,
        shape=box.sizes,
        file=entry.file,
        offset=0,
        nbytes=box.numel * logical.itemsize,
        checksum=entry.checksum,
        attrs=dict(entry.attrs),
    )


def read_box(regions: RegionReader, logical: Logical, box: Box, out: memoryview) -> None:
    """Fill ``out`` (the C-ordered bytes of ``box``) from the stored chunks, verified."""
    itemsize = logical.itemsize
    out = out.cast("B") if out.format != "B" else out
    target = _items(out, itemsize, box.sizes)
    stored = [chunk for chunk, _ in logical.chunks]
    jobs = overlaps(stored, box)
    if len(jobs) == 1 or not jobs:
        for index, common in jobs:
            _copy_overlap(regions, logical.chunks[index], common, box, target, out, itemsize)
        return
    map_threads(
        lambda job: _copy_overlap(
            regions, logical.chunks[job[0]], job[1], box, target, out, itemsize
        ),
        jobs,
        min(_READ_THREADS, len(jobs)),
        "statevault-reshard",
    )


def spans_of_box(logical: Logical, box: Box) -> list[tuple[TensorEntry, int, int]]:
    """The byte spans (stored tensor, start, stop) that :func:`read_box` reads for ``box``."""
    itemsize = logical.itemsize
    stored = [chunk for chunk, _ in logical.chunks]
    spans = []
    for index, common in overlaps(stored, box):
        chunk_box, entry = logical.chunks[index]
        start, stop = _overlap_span(chunk_box, common, box, itemsize)
        spans.append((entry, start, stop))
    return spans


def _overlap_span(chunk_box: Box, common: Box, box: Box, itemsize: int) -> tuple[int, int]:
    """The bytes of the stored chunk read for the overlap ``common`` of it and ``box``: the
    overlap itself when it is whole rows on both sides, else the chunk's rows that hold it."""
    inside = common.relative_to(chunk_box)
    if chunk_box.sizes and _whole_rows(common, chunk_box) and _whole_rows(common, box):
        row_bytes = math.prod(common.sizes[1:]) * itemsize
        start = inside.offsets[0] * row_bytes
        return start, start + common.sizes[0] * row_bytes
    if not chunk_box.sizes:  # a 0-d tensor: one item
        return 0, itemsize
    row_items = math.prod(chunk_box.sizes[1:])
    first, stop = flat_span(chunk_box.sizes, inside)
    first_row = first // row_items if row_items else 0
    end_row = -(-stop // row_items) if row_items else 0
    return first_row * row_items * itemsize, end_row * row_items * itemsize


def _whole_rows(region: Box, outer: Box) -> bool:
    """Whether ``region`` spans every trailing dimension of ``outer`` (whole rows of it)."""
    return region.sizes[1:] == outer.sizes[1:]


def _items(view: memoryview, itemsize: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(view, dtype=np.dtype(f"V{itemsize}")).reshape(shape)


def _copy_overlap(
    regions: RegionReader,
    chunk: tuple[Box, TensorEntry],
    common: Box,
    box: Box,
    target: np.ndarray,
    out: memoryview,
    itemsize: int,
) -> None:
    """Read the rows of ``chunk`` that hold ``common`` and copy ``common`` into ``target``
    (whose bytes are ``out``)."""
    chunk_box, entry = chunk
    inside = common.relative_to(chunk_box)
    start, stop = _overlap_span(chunk_box, common, box, itemsize)
    if chunk_box.sizes and _whole_rows(common, chunk_box) and _whole_rows(common, box):
        # Row sharding on both sides: the overlap is one contiguous run of bytes in the chunk
        # and in the destination, read straight into place (no intermediate buffer).
        row_bytes = math.prod(common.sizes[1:]) * itemsize
        first = (common.offsets[0] - box.offsets[0]) * row_bytes
        regions.read_span(entry, start, stop, out[first : first + stop - start])
        return
    destination = tuple(
        slice(o, o + s) for o, s in zip(common.relative_to(box).offsets, common.sizes, strict=True)
    )
    if not chunk_box.sizes:  # a 0-d tensor: one item
        data = bytearray(itemsize)
        regions.read_span(entry, start, stop, memoryview(data))
        target[()] = np.frombuffer(bytes(data), dtype=target.dtype)[0]
        return
    # Whole rows of the chunk's first dimension: the span is widened to row boundaries so that
    # the bytes read reshape to (rows, *trailing dims) and the region is a plain slice of them.
    row_bytes = math.prod(chunk_box.sizes[1:]) * itemsize
    first_row = start // row_bytes if row_bytes else 0
    rows = (stop - start) // row_bytes if row_bytes else 0
    data = bytearray(stop - start)
    regions.read_span(entry, start, stop, memoryview(data))
    block = np.frombuffer(data, dtype=target.dtype).reshape((rows, *chunk_box.sizes[1:]))
    source = (
        slice(inside.offsets[0] - first_row, inside.offsets[0] - first_row + inside.sizes[0]),
        *(slice(o, o + s) for o, s in zip(inside.offsets[1:], inside.sizes[1:], strict=True)),
    )
    target[destination] = block[source]
