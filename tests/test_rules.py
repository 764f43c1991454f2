"""Sharding rules (format/rules.py) against torch's own layout arithmetic, and the search for
the pieces overlapping a box against a scan of every piece."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from statevault.format.geometry import Box, check_chunks, intersect
from statevault.format.rules import RuleError, ShardRule, parse_rule


@st.composite
def layouts(draw: Any) -> tuple[list[int], ShardRule, list[Any]]:
    """A global shape, a rule over a mesh of up to 3 dimensions, and torch's placements."""
    shape = draw(st.lists(st.integers(0, 11), min_size=1, max_size=3))
    mesh = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    placements: list[tuple[str, int]] = []
    torch_placements: list[Any] = []
    for count in mesh:
        if draw(st.booleans()):
            dim = draw(st.integers(0, len(shape) - 1))
            placements.append(("shard", dim))
            torch_placements.append(Shard(dim))
        else:
            placements.append(("replicate", draw(st.integers(0, count - 1))))
            torch_placements.append(Replicate())
    first = draw(st.integers(0, 3))
    return shape, ShardRule(tuple(mesh), tuple(placements), first), torch_placements


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_every_piece_is_the_one_torch_gives_that_coordinate(
    layout: tuple[list[int], ShardRule, list[Any]],
) -> None:
    shape, rule, placements = layout
    for coordinate in itertools.product(*(range(n) for n in rule.mesh)):
        sizes, offsets = _compute_local_shape_and_global_offset(
            shape, list(rule.mesh), list(coordinate), placements
        )
        assert rule.piece(shape, coordinate) == Box(tuple(offsets), tuple(sizes)), coordinate


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_the_written_pieces_tile_the_tensor_once(
    layout: tuple[list[int], ShardRule, list[Any]],
) -> None:
    shape, rule, _ = layout
    pieces = [rule.piece(shape, coordinate) for coordinate, _ in rule.written()]
    check_chunks(shape, pieces)  # in bounds, disjoint, covering: raises otherwise
    writers = [rank for _, rank in rule.written()]
    assert len(set(writers)) == len(writers)


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_overlapping_finds_exactly_the_pieces_a_scan_finds(
    layout: tuple[list[int], ShardRule, list[Any]], data: Any
) -> None:
    shape, rule, _ = layout
    offsets = [data.draw(st.integers(0, max(0, d - 1))) for d in shape]
    sizes = [data.draw(st.integers(1, max(1, d - o))) for d, o in zip(shape, offsets, strict=True)]
    box = Box(tuple(offsets), tuple(sizes))
    found = sorted((c, r) for c, r, _ in rule.overlapping(shape, box))
    scanned = sorted(
        (c, r)
        for c, r in rule.written()
        if rule.piece(shape, c).numel and intersect(rule.piece(shape, c), box) is not None
    )
    assert found == scanned


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_ranks_and_coordinates_round_trip(layout: tuple[list[int], ShardRule, list[Any]]) -> None:
    _, rule, _ = layout
    listed = ShardRule(rule.mesh, rule.placements, 0, tuple(reversed(range(rule.size))))
    for current in (rule, listed):
        for coordinate in itertools.product(*(range(n) for n in current.mesh)):
            assert current.coordinate_of(current.rank_at(coordinate)) == coordinate
    assert rule.coordinate_of(rule.first_rank + rule.size) is None


def test_a_rank_finds_its_own_fsdp_piece_without_scanning_the_mesh() -> None:
    """At 65,536 ranks the search visits the pieces around the box, not the mesh."""
    world = 1 << 16
    rule = ShardRule((world,), (("shard", 0),))
    shape = (32_000, 4096)
    visited: list[int] = []
    original = rule.piece

    def counting(shape: Any, coordinate: Any) -> Box:
        visited.append(1)
        return original(shape, coordinate)

    object.__setattr__(rule, "piece", counting)
    own = original(shape, (31_999,))
    assert [r for _, r, _ in rule.overlapping(shape, own)] == [31_999]
    assert len(visited) <= 2


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"mesh": [2], "placements": [["shard", 0]], "first_rank": 0}, None),
        ({"mesh": [3], "placements": [["shard", 0]], "first_rank": 0}, "a job of 2"),
        ({"mesh": [2, 1], "placements": [["shard", 0]], "first_rank": 0}, "one placement"),
        ({"mesh": [2], "placements": [["shard", 0, 1]], "first_rank": 0}, "[kind, int]"),
        ({"mesh": [2], "placements": [["shard", True]], "first_rank": 0}, "[kind, int]"),
        ({"mesh": [2], "placements": [["shard", 0]], "first_rank": -1}, "first_rank"),
        ({"mesh": [2], "placements": [["shard", 0]]}, "first_rank"),
        ({"mesh": [2], "placements": [["shard", 0]], "ranks": [0]}, "one rank per"),
        ({"mesh": [2.0], "placements": [["shard", 0]], "first_rank": 0}, "positive ints"),
        ({"mesh": [1] * 9, "placements": [["shard", 0]] * 9, "first_rank": 0}, "1 to 8"),
        ([], "not an object"),
    ],
)
def test_parse_rule_refuses_what_cannot_describe_the_tensor(doc: Any, expected: str | None) -> None:
    if expected is None:
        assert parse_rule(doc, (6, 4), 2).mesh == (2,)
        return
    with pytest.raises(RuleError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        parse_rule(doc, (6, 4), 2)
