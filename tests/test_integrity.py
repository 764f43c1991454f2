"""Integrity: a checksum per tensor (verified on load by default), one over the safetensors header
of every shard, one over the manifest body, and sizes of every file.

Any single flipped bit, a truncated, deleted or extended shard must make ``sv.load`` raise
CorruptCheckpointError naming the leaf (payload) or the file (header, size), and ``sv.verify``
report it. ``verify=False`` skips the checksums, not the size checks: a load that skips them
still refuses a truncated or missing file, but a flipped payload bit then goes unnoticed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statevault as sv
from tests.hostile_helpers import (
    assert_same,
    attempt,
    bit_flipped,
    flip_bit,
    header_size,
    make_state,
    manifest_path,
    save_small,
    shard_names,
    tensor_rows,
)

# Leaves of make_state() and how to reach them in the loaded state.
LEAVES = [
    "model/weight",
    "model/bias",
    "model/steps",
    "half",
    "arrays/0",
    "arrays/1",
    "arrays/2",
]


def _get(state: object, key_path: str) -> object:
    for part in key_path.split("/"):
        state = state[int(part)] if isinstance(state, list) else state[part]  # type: ignore[index]
    return state


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    return save_small(tmp_path / "ck")


def test_sound_checkpoint_verifies_and_loads_exactly(ck: Path, tmp_path: Path) -> None:
    result = attempt(ck, outside=tmp_path)
    assert result.error is None
    assert_same(result.loaded, make_state())
    assert result.report is not None and result.report.ok, result.report
    assert result.report.tensors == len(LEAVES)
    assert result.report.bytes_checked == sum(row.nbytes for row in tensor_rows(ck))
    assert [row.path for row in tensor_rows(ck)] == LEAVES


# --- (a) payload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("leaf", LEAVES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_payload_bit_flip_names_the_leaf(ck: Path, leaf: str, where: str) -> None:
    row = next(r for r in tensor_rows(ck) if r.path == leaf)
    offset = row.offset + {"first": 0, "middle": row.nbytes // 2, "last": row.nbytes - 1}[where]
    bit = {"first": 0, "middle": 3, "last": 7}[where]
    flip_bit(ck / row.file, offset, bit)
    result = attempt(ck)
    text = result.raised()
    assert f"tensor {leaf} in {row.file}: checksum mismatch" in text
    assert leaf in str(result.error)
    assert f"tensor {leaf} in {row.file}: checksum mismatch" in result.verify_failed()
    # verify=False means: trust the payload bytes. The flip is then not detected (and the
    # value differs from what was saved): this is the one thing verify=False gives up.
    unchecked = sv.load(ck, verify=False)
    original = make_state()
    assert _bytes(_get(unchecked, leaf)) != _bytes(_get(original, leaf))
    flip_bit(ck / row.file, offset, bit)
    assert_same(sv.load(ck, verify=False), original)


def _bytes(value: object) -> bytes:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return bytes(value.contiguous().view(torch.uint8).numpy().tobytes())
    assert isinstance(value, np.ndarray)
    return value.tobytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_payload_bit_flip_is_detected(ck: Path, data: st.DataObject) -> None:
    rows = tensor_rows(ck)
    row = data.draw(st.sampled_from(rows), label="leaf")
    offset = row.offset + data.draw(st.integers(0, row.nbytes - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    with bit_flipped(ck / row.file, offset, bit):
        with pytest.raises(sv.CorruptCheckpointError) as caught:
            sv.load(ck)
        assert caught.value.problems == [f"tensor {row.path} in {row.file}: checksum mismatch"]
        report = sv.verify(ck)
        assert report.problems == [f"tensor {row.path} in {row.file}: checksum mismatch"]


def test_every_damaged_leaf_is_reported(ck: Path) -> None:
    rows = tensor_rows(ck)
    for row in rows:
        flip_bit(ck / row.file, row.offset, 1)
    with pytest.raises(sv.CorruptCheckpointError) as caught:
        sv.load(ck)
    assert f"(and {len(rows) - 1} more)" in str(caught.value)
    assert sorted(caught.value.problems) == sorted(
        f"tensor {r.path} in {r.file}: checksum mismatch" for r in rows
    )
    assert len(sv.verify(ck).problems) == len(rows)


# --- (b) safetensors header ----------------------------------------------------------------------


def test_every_header_bit_flip_names_the_file(ck: Path) -> None:
    for name in shard_names(ck):
        size = header_size(ck, name)
        assert size > 8
        for offset in range(size):
            for bit in range(8):
                with bit_flipped(ck / name, offset, bit):
                    with pytest.raises(sv.CorruptCheckpointError) as caught:
                        sv.load(ck)
                    expected = f"file {name}: safetensors header checksum mismatch"
                    assert caught.value.problems == [expected], (offset, bit)
                    if bit == offset % 8:  # verify each byte once: it is the same check
                        assert sv.verify(ck).problems == [expected], (offset, bit)


def test_header_damage_is_not_checked_with_verify_false(ck: Path) -> None:
    """verify=False reads no header (the manifest locates every tensor): data still loads."""
    name = shard_names(ck)[0]
    with bit_flipped(ck / name, 20, 2):
        assert_same(sv.load(ck, verify=False), make_state())


# --- (c) manifest --------------------------------------------------------------------------------


def test_every_manifest_bit_flip_is_refused(ck: Path) -> None:
    """No single flipped bit anywhere in manifest.json loads: not in the envelope (format,
    version, checksum), not in the body (key names, plain values, offsets, whitespace)."""
    path = manifest_path(ck)
    size = path.stat().st_size
    outcomes: dict[str, int] = {}
    for offset in range(size):
        for bit in range(8):
            with bit_flipped(path, offset, bit):
                try:
                    sv.load(ck)
                except (sv.CorruptCheckpointError, sv.UnsupportedFormatError) as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                else:
                    pytest.fail(f"a flip of bit {bit} of byte {offset} went unnoticed")
                if bit == offset % 8:
                    assert not sv.verify(ck).ok, (offset, bit)
    assert sum(outcomes.values()) == 8 * size
    assert outcomes["UnsupportedFormatError"] >= 1  # format_version 1 -> 3, 5 or 9


@pytest.mark.parametrize(
    "pattern",
    [
        rb'"wei',  # a key name in the tree: weight -> wehght
        rb'"path": "model/bi',  # a key path in a tensor row
        rb"run-\\u03b1",  # a plain str value: \u03b1 -> \u03b0
        rb'"epoch": 7',  # a plain int value: 7 -> 6
        rb'"lr": 0.125',  # a plain float value: 0.125 -> 0.124
        rb'"AP',  # a bytes value
        rb'"offset": \d+',  # a tensor offset
        rb'"size": \d+',  # a file size
    ],
)
def test_manifest_flip_in_key_or_value(ck: Path, pattern: bytes) -> None:
    """Flip bit 0 of the last byte the pattern matches: the manifest is still valid JSON that
    validates (a letter stays a letter, a digit a digit), so only the checksum can tell."""
    path = manifest_path(ck)
    match = re.search(pattern, path.read_bytes())
    assert match is not None, pattern
    flip_bit(path, match.end() - 1, 0)
    result = attempt(ck)
    assert "manifest.json checksum mismatch" in result.raised()
    assert "manifest.json checksum mismatch" in result.verify_failed()


def test_manifest_with_version_zero_is_refused(ck: Path) -> None:
    """The one-bit flip 1 -> 0 of format_version must not be read as a valid older format."""
    path = manifest_path(ck)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"format_version":1,', b'"format_version":0,', 1))
    result = attempt(ck)
    assert "format_version" in result.raised()
    result.verify_failed()


# --- (d), (e), (f) sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("keep", ["none", "header", "one byte short"])
def test_truncated_shard_names_the_file(ck: Path, verify: bool, keep: str) -> None:
    name = shard_names(ck)[0]
    size = (ck / name).stat().st_size
    new_size = {"none": 0, "header": header_size(ck, name), "one byte short": size - 1}[keep]
    os.truncate(ck / name, new_size)
    result = attempt(ck, verify=verify)
    expected = f"file {name}: {new_size} bytes on disk, {size} in the manifest (truncated)"
    assert expected in result.raised()
    assert expected in result.verify_failed()


@pytest.mark.parametrize("verify", [True, False])
def test_deleted_shard_names_the_file(ck: Path, verify: bool) -> None:
    name = shard_names(ck)[0]
    (ck / name).unlink()
    result = attempt(ck, verify=verify)
    assert f"file {name}: cannot be opened (No such file or directory)" in result.raised()
    assert f"file {name}: cannot be opened" in result.verify_failed()


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("extra", [b"\x00", b"x" * 4096])
def test_appended_shard_names_the_file(ck: Path, verify: bool, extra: bytes) -> None:
    name = shard_names(ck)[0]
    size = (ck / name).stat().st_size
    with open(ck / name, "ab") as handle:
        handle.write(extra)
    result = attempt(ck, verify=verify)
    expected = f"file {name}: {size + len(extra)} bytes on disk, {size} in the manifest"
    assert expected in result.raised()
    assert expected in result.verify_failed()


def test_deleted_manifest_is_not_a_checkpoint(ck: Path) -> None:
    manifest_path(ck).unlink()
    with pytest.raises(sv.CheckpointNotFoundError):
        sv.load(ck)
    with pytest.raises(sv.CheckpointNotFoundError):
        sv.verify(ck)


def test_checkpoint_in_several_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With several shards, damage to each one is reported against that shard."""
    from statevault.engine import layout

    real = layout.assign_files
    monkeypatch.setattr(
        layout, "assign_files", lambda sizes, **kw: real(sizes, min_file_bytes=1, **kw)
    )
    ck = save_small(tmp_path / "ck")
    names = shard_names(ck)
    assert len(names) > 2
    for name in names:
        with bit_flipped(ck / name, 3, 0):
            assert sv.verify(ck).problems == [f"file {name}: safetensors header checksum mismatch"]
    for row in tensor_rows(ck):
        if row.nbytes:
            with (
                bit_flipped(ck / row.file, row.offset + row.nbytes - 1, 6),
                pytest.raises(sv.CorruptCheckpointError, match=row.path),
            ):
                sv.load(ck)
    assert_same(sv.load(ck), make_state())


def test_a_manifest_too_large_for_readers_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers refuse what readers would refuse (MAX_MANIFEST_BYTES), before the commit."""
    from statevault.format import manifest

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 2000)
    with pytest.raises(sv.CheckpointError, match="readers accept"):
        sv.save({f"t{i}": np.zeros(1) for i in range(40)}, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []  # the temporary went with the failure


def test_a_large_manifest_is_written_compact_and_reads_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from statevault.format import manifest

    state = {f"t{i}": np.full(3, i, dtype=np.int32) for i in range(5)}
    monkeypatch.setattr(manifest, "COMPACT_ROWS", 2)
    sv.save(state, tmp_path / "compact")
    monkeypatch.setattr(manifest, "COMPACT_ROWS", 1000)
    sv.save(state, tmp_path / "indented")
    compact = manifest_path(tmp_path / "compact").read_bytes()
    assert (
        b"\n" not in compact.rstrip(b"\n")
        and b"\n " in manifest_path(tmp_path / "indented").read_bytes()
    )
    loaded = sv.load(tmp_path / "compact")
    assert all(np.array_equal(loaded[k], v) for k, v in state.items())
    assert sv.verify(tmp_path / "compact").ok
