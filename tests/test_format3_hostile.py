"""Format 3 (per-rank indexes, sharding rules) read as hostile input: every inconsistency in the
index table, an index, a rule or the pieces a rule describes is a typed error naming it, never a
wrong tensor, and nothing is read outside the checkpoint. Forged records are re-sealed (every
checksum of the chain recomputed) so that only validation can object; damage that is not
re-sealed is caught by the chain itself."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statevault as sv
from statevault.format.checksum import crc32c_of
from statevault.format.indexed import encode_table, index_name, table_entry
from tests import dist_workloads as work
from tests.dist_helpers import run_ranks
from tests.hostile_helpers import attempt, flip_bit, read_body, refused, write_body

RANKS = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("format3") / "ck"
    run_ranks(work.small_sharded_fixture, RANKS, str(path))  # a DTensor, per-rank state, a tensor
    return path


@pytest.fixture
def ck(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ck"
    shutil.copytree(saved, copy)
    return copy


def read_index(ck: Path, rank: int) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ck / index_name(rank)).read_bytes())
    return doc


def reseal(ck: Path, body: dict[str, Any] | None = None) -> None:
    """The table recomputed from the index files as they are, the manifest from the table."""
    body = read_body(ck) if body is None else body
    indexes = [(ck / index_name(rank)).read_bytes() for rank in range(body["ranks"])]
    table = encode_table((len(data), crc32c_of(data)) for data in indexes)
    (ck / body["indexes"]["name"]).write_bytes(table)
    body["indexes"] = table_entry(body["indexes"]["name"], table).to_json()
    write_body(ck, body)


def rewrite_index(ck: Path, rank: int, change: Callable[[dict[str, Any]], Any]) -> None:
    doc = read_index(ck, rank)
    change(doc)
    (ck / index_name(rank)).write_bytes(json.dumps(doc).encode())
    reseal(ck)


def test_the_fixture_is_format_3_with_a_rule_and_loads(ck: Path) -> None:
    body = read_body(ck)
    assert json.loads((ck / "manifest.json").read_bytes())["format_version"] == 3
    row = body["sharded"][0]
    assert row["chunks"] == [] and row["rule"] == {
        "mesh": [RANKS],
        "placements": [["shard", 0]],
        "first_rank": 0,
    }
    assert body["tree"]["v"]["pos"] == {"$": "per_rank", "slot": 0}
    assert [c["offsets"] for c in read_index(ck, 1)["chunks"]] == [[3, 0]]
    work.check_small_sharded(ck)


def _chunk(doc: dict[str, Any]) -> dict[str, Any]:
    chunk: dict[str, Any] = doc["chunks"][0]
    return chunk


INDEX_CASES: dict[str, tuple[int, Callable[[dict[str, Any]], Any], str]] = {
    "a piece off the rule": (1, lambda d: _chunk(d).update(offsets=[2, 0]), "the rule gives it"),
    "a piece listed twice": (0, lambda d: d["chunks"].append(_chunk(d)), "twice"),
    "a missing piece": (1, lambda d: d["chunks"].clear(), "cover"),
    "a chunk of no sharded tensor": (0, lambda d: _chunk(d).update(sharded=5), "no sharded"),
    "a chunk of no tensor": (0, lambda d: _chunk(d).update(tensor=99), "no tensor of its index"),
    "a chunk offset not an int": (0, lambda d: _chunk(d).update(offsets=[0.0, 0]), "int"),
    "an index of another rank": (0, lambda d: d.update(rank=1), "says it is rank 1"),
    "not an index": (0, lambda d: d.update(format="statevault"), "not a statevault index"),
    "no chunks list": (1, lambda d: d.update(chunks={}), "chunks is missing"),
    "no per-rank state": (1, lambda d: d.update(per_rank=[]), "no per-rank state"),
    "a per-rank tensor outside the index": (
        0,
        lambda d: d["per_rank"].__setitem__(0, {"$": "tensor", "id": 50}),
        "names tensor 50",
    ),
    "a file listed twice": (1, lambda d: d["files"].append(d["files"][0]), "listed twice"),
    "a row outside its file": (1, lambda d: d["tensors"][0].update(offset=1 << 40), "outside"),
    "a row in another rank's file": (
        0,
        lambda d: d["tensors"][0].update(file="data-r00001-00000.safetensors"),
        "neither it nor the manifest lists",
    ),
    "a row of a file no index lists": (
        0,
        lambda d: d["tensors"][0].update(file="data-r00009-00000.safetensors"),
        "neither it nor the manifest lists",
    ),
    # JSON that is no name (found by the fuzz below: a list was hashed as a name)
    "a row's file that is a list": (
        0,
        lambda d: d["tensors"][0].update(file=[]),
        "neither it nor the manifest lists",
    ),
    "a file name that is a list": (
        1,
        lambda d: d["files"][0].update(name=[]),
        "neither it nor the manifest lists",
    ),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_a_forged_index_is_refused(ck: Path, case: str) -> None:
    rank, change, expected = INDEX_CASES[case]
    rewrite_index(ck, rank, change)
    assert expected in refused(ck)


def _rule(body: dict[str, Any]) -> dict[str, Any]:
    rule: dict[str, Any] = body["sharded"][0]["rule"]
    return rule


RULE_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "a mesh larger than the job": (lambda b: _rule(b).update(mesh=[4]), "a job of 2 ranks"),
    "a mesh claiming 2^20 pieces": (lambda b: _rule(b).update(mesh=[1 << 20]), "a job of 2"),
    "a mesh of no dimensions": (lambda b: _rule(b).update(mesh=[]), "mesh must list"),
    "a mesh size of 0": (lambda b: _rule(b).update(mesh=[0]), "positive"),
    "ranks past the world": (lambda b: _rule(b).update(first_rank=1), "first_rank"),
    "explicit ranks past the world": (
        lambda b: (_rule(b).pop("first_rank"), _rule(b).update(ranks=[0, 5])),
        "must lie in",
    ),
    "a rank twice in the mesh": (
        lambda b: (_rule(b).pop("first_rank"), _rule(b).update(ranks=[1, 1])),
        "appears twice",
    ),
    "ranks in the wrong order": (
        lambda b: (_rule(b).pop("first_rank"), _rule(b).update(ranks=[1, 0])),
        "the rule gives it",
    ),
    "a shard of a dimension the tensor lacks": (
        lambda b: _rule(b).update(placements=[["shard", 2]]),
        "dimension 2",
    ),
    "a replica coordinate outside the mesh": (
        lambda b: _rule(b).update(placements=[["replicate", 3]]),
        "coordinate 3",
    ),
    "an unknown placement": (lambda b: _rule(b).update(placements=[["strided", 0]]), "unknown"),
    "a rule that says rank 0 writes nothing": (
        lambda b: _rule(b).update(placements=[["replicate", 1]]),
        "the rule gives rank 0 no piece to write",
    ),
    "a rule that claims more pieces than rows": (
        lambda b: b["sharded"][0].update(shape=[1, 4]),
        "the rule gives it",
    ),
    "overlapping pieces without a rule": (
        lambda b: b["sharded"][0].pop("rule"),
        "",  # the pieces are intact: read_index below moves one
    ),
    "an index table of the wrong size": (lambda b: b["indexes"].update(size=13), "records"),
    "an index table outside the checkpoint": (
        lambda b: b["indexes"].update(name="../indexes.tbl"),
        "not an index table's name",
    ),
    "more ranks than the table holds": (lambda b: b.update(ranks=3), "records"),
    "a tree tensor that is an index's row": (
        lambda b: b["tree"]["v"]["c"].update(id=1),
        "not a row of the manifest",
    ),
    "chunks of a rule tensor in the manifest": (
        lambda b: b["sharded"][0].update(chunks=[{"offsets": [0, 0], "tensor": 0, "rank": 0}]),
        "lists chunks in the manifest",
    ),
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_a_forged_rule_or_table_entry_is_refused(ck: Path, case: str) -> None:
    change, expected = RULE_CASES[case]
    body = read_body(ck)
    change(body)
    if case == "overlapping pieces without a rule":
        write_body(ck, body)
        rewrite_index(ck, 1, lambda d: _chunk(d).update(offsets=[2, 0]))
        expected = "overlap"
    else:
        write_body(ck, body)
    assert expected in refused(ck)


def test_version_2_carries_no_indexes_and_no_rules(ck: Path) -> None:
    body = read_body(ck)
    rule = body["sharded"][0].pop("rule")
    write_body(ck, body, version=2)
    assert "per-rank indexes need format_version 3" in refused(ck)
    body.pop("indexes")
    body["sharded"][0]["rule"] = rule
    write_body(ck, body, version=2)
    assert "a sharding rule needs format_version 3" in refused(ck)


CHAIN_CASES: dict[str, tuple[Callable[[Path], Any], str]] = {
    "a flipped bit in an index": (
        lambda ck: flip_bit(ck / index_name(1), 30, 2),
        "index-r00001.json checksum mismatch",
    ),
    "a truncated index": (
        lambda ck: (ck / index_name(0)).write_bytes((ck / index_name(0)).read_bytes()[:-1]),
        "index-r00000.json holds",
    ),
    "a missing index": (lambda ck: (ck / index_name(1)).unlink(), "index-r00001.json is missing"),
    "a flipped bit in the table": (
        lambda ck: flip_bit(ck / "indexes.tbl", 5, 0),
        "indexes.tbl checksum mismatch",
    ),
    "a missing table": (lambda ck: (ck / "indexes.tbl").unlink(), "indexes.tbl is missing"),
    "an index replaced by a FIFO": (
        lambda ck: ((ck / index_name(1)).unlink(), os.mkfifo(ck / index_name(1))),
        "index-r00001.json is not a regular file",
    ),
    "an index replaced by a symlink": (
        lambda ck: ((ck / index_name(1)).unlink(), (ck / index_name(1)).symlink_to("/etc/passwd")),
        "index-r00001.json",
    ),
}


@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_damage_that_is_not_resealed_is_caught_by_the_chain(ck: Path, case: str) -> None:
    damage, expected = CHAIN_CASES[case]
    damage(ck)
    assert expected in refused(ck)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rank=st.integers(0, RANKS - 1),
    pick=st.integers(0, 10_000),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 1 << 70),
        st.text(max_size=8),
        st.lists(st.integers(-2, 9), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
)
def test_any_resealed_change_to_an_index_loads_the_same_or_is_refused(
    saved: Path, tmp_path_factory: pytest.TempPathFactory, rank: int, pick: int, value: Any
) -> None:
    """One value anywhere in an index replaced, the chain re-sealed: the load either gives
    back exactly the saved state (the change was harmless, say a file's name in an attr) or
    raises CorruptCheckpointError; never another exception, never a different tensor."""
    ck = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(saved, ck)
    doc = read_index(ck, rank)
    slots = list(_slots(doc))
    holder, key = slots[pick % len(slots)]
    holder[key] = value
    (ck / index_name(rank)).write_bytes(json.dumps(doc).encode())
    reseal(ck)
    result = attempt(ck, outside=ck.parent)
    if result.error is None:
        torch.manual_seed(3)
        assert torch.equal(result.loaded["w"], torch.randn(6, 4))
        assert torch.equal(result.loaded["c"], torch.arange(5.0))
    else:
        assert isinstance(result.error, sv.CorruptCheckpointError), result.error


def _slots(node: Any) -> Any:
    """Every (container, key) of a JSON document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, child in list(items):
        yield node, key
        if isinstance(child, (dict, list)) and child:
            yield from _slots(child)


def test_a_reader_of_versions_up_to_2_refuses_it_by_name(
    ck: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the last format-2 reader does with it (checked against that release by hand: the
    same message), by the same rule: the version is read before anything else."""
    from statevault.format import manifest

    monkeypatch.setattr(manifest, "FORMAT_VERSION", 2)
    with pytest.raises(
        sv.UnsupportedFormatError, match=r"format version 3; this one reads up to 2"
    ):
        sv.load(ck)


def test_a_load_of_some_indexes_still_finds_every_piece_they_owe(ck: Path) -> None:
    """A rank that reads only its own index relies on it listing the piece the rule says it
    wrote: one missing is refused then too, not left as a hole in the tensor."""
    from statevault.checkpoint import open_checkpoint

    rewrite_index(ck, 1, lambda d: d["chunks"].clear())
    with pytest.raises(sv.CorruptCheckpointError, match=r"rank 1 does not list the piece"):
        open_checkpoint(ck, ranks=[1])
    assert open_checkpoint(ck, ranks=[0]).manifest.read_ranks == {0}  # rank 0's is whole


def test_checking_the_pieces_a_partial_read_owes_visits_the_ranks_read_not_the_mesh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rank of a 2^20-rank job restoring its own piece checks its own index, not the mesh: a
    walk over every written piece per tensor made each restore O(world x tensors) (17 s per rank
    at 65,536 ranks in the benchmark)."""
    from statevault.format.rules import ShardRule
    from statevault.format.validator import Validator

    def walks_the_mesh(self: ShardRule) -> Any:
        raise AssertionError("the check enumerated every piece of the rule")

    monkeypatch.setattr(ShardRule, "written", walks_the_mesh)
    world = 1 << 20
    rule = ShardRule((world,), (("shard", 0),), 0, None)
    check = Validator("ck").pieces_present
    check(rule, {5}, frozenset({5}), "sharded[0]")  # rank 5 listed its piece
    with pytest.raises(
        sv.CorruptCheckpointError, match=r"rank 7 does not list the piece at \(7,\)"
    ):
        check(rule, {5}, frozenset({5, 7}), "sharded[0]")
    replicated = ShardRule((2, world // 2), (("replicate", 1), ("shard", 0)), 0, None)
    check(replicated, set(), frozenset({3}), "sharded[1]")  # rank 3 holds no written piece


def test_a_refused_open_closes_its_directory_once(ck: Path, tmp_path: Path) -> None:
    """An open refused while reading the indexes closed its directory descriptor and then its
    half-built OpenCheckpoint closed the same number again when collected: by then the number
    named whatever the program opened next."""
    import gc

    from statevault.checkpoint import open_checkpoint

    rewrite_index(ck, 1, lambda d: d["chunks"].clear())
    with pytest.raises(sv.CorruptCheckpointError) as refusal:
        open_checkpoint(ck, ranks=[1])
    other = tmp_path / "other"
    other.write_bytes(b"x")
    fd = os.open(other, os.O_RDONLY)  # the lowest free number: the directory's, just freed
    try:
        del refusal
        gc.collect()
        assert os.read(fd, 1) == b"x"  # still open: nothing closed it behind the program's back
    finally:
        os.close(fd)
