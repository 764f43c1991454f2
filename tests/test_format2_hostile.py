"""Format 2 (distributed checkpoints) read as hostile input: every inconsistency in sharded
tensors, per-rank nodes, the world size and block checksums is a typed error, never a wrong
tensor; and block checksums verify ranged reads."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.engine.regions import RegionReader
from statevault.format.indexed import metadata_names
from statevault.format.manifest import BLOCK_BYTES, serialize_manifest
from tests import dist_workloads as work
from tests.dist_helpers import run_ranks
from tests.hostile_helpers import flip_bit, read_body, refused, rewrite_body, write_body


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("format2") / "ck"
    run_ranks(work.small_sharded_fixture, 2, str(path))
    as_format_2(path)
    return path


def as_format_2(path: Path) -> None:
    """Rewrite a job's format-3 checkpoint as the format-2 one an earlier statevault wrote for
    the same save: every row in manifest.json, no indexes, no rules."""
    manifest = open_checkpoint(path).manifest  # complete: every index read
    names = metadata_names(manifest)
    manifest.indexes = None
    manifest.sharded = [dataclasses.replace(s, rule=None) for s in manifest.sharded]
    (path / "manifest.json").write_bytes(serialize_manifest(manifest))
    for name in names:
        (path / name).unlink()


@pytest.fixture
def ck(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ck"
    shutil.copytree(saved, copy)
    return copy


def test_the_fixture_is_format_2_and_loads(ck: Path) -> None:
    body = read_body(ck)
    assert body["ranks"] == 2 and len(body["sharded"]) == 1
    assert len(body["sharded"][0]["chunks"]) == 2
    work.check_small_sharded(ck)


def _chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = body["sharded"][0]["chunks"]
    return chunks


CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "overlapping chunks": (lambda b: _chunks(b)[1].update(offsets=[2, 0]), "overlap"),
    "a missing chunk": (lambda b: _chunks(b).__delitem__(1), "cover"),
    "a chunk out of bounds": (lambda b: _chunks(b)[1].update(offsets=[4, 0]), "spans"),
    "a chunk offset of the wrong rank": (lambda b: _chunks(b)[1].update(offsets=[3]), "dims"),
    "a chunk offset that is not an int": (lambda b: _chunks(b)[1].update(offsets=[3.0, 0]), "int"),
    "a chunk in no tensor row": (lambda b: _chunks(b)[0].update(tensor=99), "not listed"),
    "a chunk of another dtype": (lambda b: b["sharded"][0].update(dtype="float64"), "stored as"),
    "a bigger global shape": (lambda b: b["sharded"][0].update(shape=[7, 4]), "cover"),
    "no ranks": (lambda b: b.update(ranks=0), "ranks"),
    "too many ranks": (lambda b: b.update(ranks=1 << 30), "ranks"),
    "sharded missing": (lambda b: b.__delitem__("sharded"), "sharded"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_sharded_manifest_is_refused(ck: Path, case: str) -> None:
    change, expected = CASES[case]
    rewrite_body(ck, change)
    assert expected in refused(ck)


def test_a_per_rank_node_with_the_wrong_number_of_branches_is_refused(ck: Path) -> None:
    def drop_branch(body: dict[str, Any]) -> None:
        body["tree"]["v"]["pos"]["ranks"].pop()

    rewrite_body(ck, drop_branch)
    assert "1 branches, not 2" in refused(ck)


def test_a_sharded_node_out_of_range_is_refused(ck: Path) -> None:
    rewrite_body(ck, lambda b: b["tree"]["v"]["w"].update(id=5))
    assert "sharded tensor 5" in refused(ck)


def test_format_1_cannot_carry_sharded_tensors(ck: Path) -> None:
    write_body(ck, read_body(ck), version=1)
    assert "need format_version 2" in refused(ck)


def test_a_damaged_chunk_is_detected(ck: Path) -> None:
    row = open_checkpoint(ck).manifest.tensors[_chunks(read_body(ck))[1]["tensor"]]
    flip_bit(ck / row.file, row.offset + 5, 3)
    assert "checksum mismatch" in refused(ck)


# --- block checksums: verified ranged reads ---------------------------------------------------


@pytest.fixture
def three_blocks(tmp_path: Path) -> Path:
    path = tmp_path / "blocks"
    sv.save({"big": torch.arange(3 * BLOCK_BYTES // 4, dtype=torch.float32)}, path)
    return path


def test_blocks_are_recorded_and_a_span_reads_only_its_blocks(three_blocks: Path) -> None:
    checkpoint = open_checkpoint(three_blocks)
    row = checkpoint.manifest.tensors[0]
    assert len(row.blocks) == 2
    out = bytearray(16)
    with RegionReader(checkpoint.reader, verify=True) as regions:
        regions.read_span(row, BLOCK_BYTES + 8, BLOCK_BYTES + 24, memoryview(out))
        assert regions.bytes_read == BLOCK_BYTES  # the one block holding the span
    expected = np.arange(3 * BLOCK_BYTES // 4, dtype=np.float32).tobytes()
    assert bytes(out) == expected[BLOCK_BYTES + 8 : BLOCK_BYTES + 24]


def test_a_local_span_lands_in_place_with_side_buffers_under_a_block(
    three_blocks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A span whose edge blocks reach outside it is read straight into the destination; only
    the edge parts outside it go through side buffers, each smaller than a block (not a buffer
    of the whole widened span, which for a large tensor would double the memory of a load)."""
    checkpoint = open_checkpoint(three_blocks)
    row = checkpoint.manifest.tensors[0]
    out = memoryview(bytearray(BLOCK_BYTES + 32))
    buffers: list[int] = []
    original = RegionReader._read

    def recording(self: RegionReader, entry: Any, start: int, view: memoryview) -> None:
        if view.obj is not out.obj:
            buffers.append(len(view))
        original(self, entry, start, view)

    monkeypatch.setattr(RegionReader, "_read", recording)
    with RegionReader(checkpoint.reader, verify=True) as regions:
        regions.read_span(row, 100, 100 + len(out), out)
        assert regions.bytes_read == 2 * BLOCK_BYTES  # the two blocks holding the span
    expected = np.arange(3 * BLOCK_BYTES // 4, dtype=np.float32).tobytes()
    assert bytes(out) == expected[100 : 100 + len(out)]
    assert sorted(buffers) == [100, BLOCK_BYTES - 132]


def test_damage_is_caught_in_the_block_read_and_only_there(three_blocks: Path) -> None:
    checkpoint = open_checkpoint(three_blocks)
    row = checkpoint.manifest.tensors[0]
    flip_bit(three_blocks / row.file, row.offset + 2 * BLOCK_BYTES + 100, 0)
    out = memoryview(bytearray(64))
    with RegionReader(checkpoint.reader, verify=True) as regions:
        regions.read_span(row, 0, 64, out)  # block 0 is intact
        with pytest.raises(sv.CorruptCheckpointError, match=r"checksum mismatch in bytes"):
            regions.read_span(row, 2 * BLOCK_BYTES, 2 * BLOCK_BYTES + 64, out)


def test_a_forged_block_checksum_is_caught(three_blocks: Path) -> None:
    def forge(body: dict[str, Any]) -> None:
        body["tensors"][0]["blocks"][0] = "crc32c:00000000"

    rewrite_body(three_blocks, forge)
    checkpoint = open_checkpoint(three_blocks)
    with (
        RegionReader(checkpoint.reader, verify=True) as regions,
        pytest.raises(sv.CorruptCheckpointError),
    ):
        regions.read_span(checkpoint.manifest.tensors[0], 0, 64, memoryview(bytearray(64)))


def test_a_wrong_number_of_block_checksums_is_refused(three_blocks: Path) -> None:
    rewrite_body(three_blocks, lambda b: b["tensors"][0]["blocks"].__delitem__(0))
    assert "block checksums for 3 blocks" in refused(three_blocks)


def test_verify_only_checks_the_subtree_chunks_included(ck: Path) -> None:
    row = open_checkpoint(ck).manifest.tensors[_chunks(read_body(ck))[1]["tensor"]]
    flip_bit(ck / row.file, row.offset + 1, 2)
    damaged = sv.verify(ck, only="w")
    assert not damaged.ok and "checksum mismatch" in damaged.problems[0]
    assert damaged.tensors == 2  # the two chunks of w
    intact = sv.verify(ck, only="c")
    assert intact.ok and intact.bytes_checked == 5 * 4
