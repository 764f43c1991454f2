"""Chunk geometry: property tests of the pure offset arithmetic resharding relies on."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from statevault.format.geometry import (
    Box,
    GeometryError,
    check_chunks,
    flat_span,
    intersect,
    overlaps,
    split_evenly,
)


@st.composite
def tilings(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """A shape and a grid tiling of it: every dimension cut at sorted random points."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    cuts = []
    for extent in shape:
        points = sorted(set(draw(st.lists(st.integers(0, extent), max_size=3))) | {0, extent})
        cuts.append(list(itertools.pairwise(points)) or [(0, 0)])
    boxes = [Box((0,) * ndim, (0,) * ndim)]  # an empty chunk (a rank with no rows) is allowed
    for combo in np.ndindex(*[len(c) for c in cuts]):
        spans = [cuts[d][i] for d, i in enumerate(combo)]
        boxes.append(Box(tuple(a for a, _ in spans), tuple(b - a for a, b in spans)))
    return shape, draw(st.permutations(boxes))


@given(tilings())
def test_a_tiling_is_accepted(case: tuple[tuple[int, ...], list[Box]]) -> None:
    shape, boxes = case
    check_chunks(shape, boxes)


@given(tilings(), st.data())
def test_dropping_a_nonempty_chunk_leaves_a_gap(
    case: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = case
    solid = [b for b in boxes if b.numel]
    if not solid:
        return
    gone = data.draw(st.sampled_from(solid))
    with pytest.raises(GeometryError, match="cover"):
        check_chunks(shape, [b for b in boxes if b is not gone])


@given(tilings(), st.data())
def test_a_duplicated_chunk_overlaps(
    case: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = case
    solid = [b for b in boxes if b.numel]
    if not solid:
        return
    twice = data.draw(st.sampled_from(solid))
    with pytest.raises(GeometryError, match="overlap"):
        check_chunks(shape, [*boxes, twice])


@given(tilings(), st.data())
def test_a_chunk_pushed_out_of_bounds_is_refused(
    case: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = case
    solid = [b for b in boxes if b.numel]
    if not solid:
        return
    moved = data.draw(st.sampled_from(solid))
    dim = data.draw(st.integers(0, len(shape) - 1))
    offsets = list(moved.offsets)
    offsets[dim] = shape[dim] - moved.sizes[dim] + 1
    shifted = Box(tuple(offsets), moved.sizes)
    with pytest.raises(GeometryError, match="spans"):
        check_chunks(shape, [shifted if b is moved else b for b in boxes])


@given(tilings(), st.data())
def test_reassembling_any_box_from_overlaps_is_exact(
    case: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    """What resharding does: fill a wanted box from the stored chunks, via the flat span of each
    overlap inside its chunk. The result equals slicing the original array."""
    shape, boxes = case
    whole = np.arange(math.prod(shape)).reshape(shape)
    stored = {i: whole[_slices(b)].copy() for i, b in enumerate(boxes)}
    offsets = tuple(data.draw(st.integers(0, extent)) for extent in shape)
    sizes = tuple(
        data.draw(st.integers(0, extent - o)) for o, extent in zip(offsets, shape, strict=False)
    )
    wanted = Box(offsets, sizes)
    out = np.full(sizes, -1)
    for index, common in overlaps(boxes, wanted):
        chunk = boxes[index]
        inside = common.relative_to(chunk)
        first, stop = flat_span(chunk.sizes, inside)
        flat = stored[index].reshape(-1)
        span = flat[first:stop]
        # The span holds every element of the region: check it against the chunk itself.
        region = stored[index][_slices(inside)]
        assert set(region.reshape(-1).tolist()) <= set(span.tolist())
        out[_slices(common.relative_to(wanted))] = region
    assert np.array_equal(out, whole[_slices(wanted)])


@given(st.integers(0, 50), st.integers(1, 9))
def test_split_evenly_tiles_like_torch_chunk(extent: int, parts: int) -> None:
    blocks = split_evenly(extent, parts)
    assert len(blocks) == parts
    check_chunks((extent,), [Box((o,), (s,)) for o, s in blocks])
    import torch

    sizes = [len(c) for c in torch.arange(extent).chunk(parts)] if extent else []
    assert [s for _, s in blocks if s] == [s for s in sizes if s]


def test_intersect_and_row_span() -> None:
    a, b = Box((0, 0), (4, 6)), Box((2, 3), (5, 5))
    assert intersect(a, b) == Box((2, 3), (2, 3))
    assert intersect(a, Box((4, 0), (1, 1))) is None
    # Whole rows: the span is exactly the region's elements.
    assert flat_span((4, 6), Box((1, 0), (2, 6))) == (6, 18)
    assert flat_span((4, 6), Box((1, 2), (2, 1))) == (8, 15)


@st.composite
def loose_boxes(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """A shape and in-bounds boxes placed at random: some overlap, some do not."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    boxes = []
    for _ in range(draw(st.integers(0, 6))):
        offsets = tuple(draw(st.integers(0, extent)) for extent in shape)
        sizes = tuple(draw(st.integers(0, e - o)) for o, e in zip(offsets, shape, strict=True))
        boxes.append(Box(offsets, sizes))
    return shape, boxes


@given(loose_boxes())
def test_the_sweep_finds_an_overlap_exactly_when_some_pair_overlaps(
    case: tuple[tuple[int, ...], list[Box]],
) -> None:
    """The overlap test sweeps dimension 0 instead of testing every pair: same verdict."""
    shape, boxes = case
    pairs = [
        (i, j)
        for i, j in itertools.combinations(range(len(boxes)), 2)
        if boxes[i].numel and boxes[j].numel and intersect(boxes[i], boxes[j]) is not None
    ]
    try:
        check_chunks(shape, boxes)
    except GeometryError as exc:
        message = str(exc)
        if pairs:
            assert "overlap" in message
            named = tuple(int(w) for w in message.split()[1:4:2])
            assert named in pairs
        else:
            assert "cover" in message
    else:
        assert not pairs


def test_world_size_row_tilings_are_checked_fast() -> None:
    """FSDP at 8,192 ranks: uneven row shards (half the ranks hold no rows), and a 2-D split
    of 64 x 128; a pairwise test would make ~33M and ~33M box intersections of each."""
    world = 8192
    rows = [Box((o, 0), (s, 4096)) for o, s in split_evenly(4096, world)]
    grid = [Box((r, c), (1, 2)) for r, c in itertools.product(range(64), range(0, 256, 2))]
    started = time.perf_counter()
    check_chunks((4096, 4096), rows)
    check_chunks((64, 256), grid)
    assert time.perf_counter() - started < 2.0
    with pytest.raises(GeometryError, match="chunks 4095 and 8192 overlap"):
        check_chunks((4096, 4096), [*rows, rows[4095]])
    with pytest.raises(GeometryError, match="overlap"):
        check_chunks((64, 256), [*grid, Box((40, 1), (1, 2))])
    with pytest.raises(GeometryError, match="cover"):
        check_chunks((4096, 4096), rows[:-4097])


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True))
