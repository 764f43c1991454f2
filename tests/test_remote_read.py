"""Remote reads issue few large requests: O(files), not O(tensors).

What must hold: the wanted tensors of a file are fetched in offset order, merged into requests
of at most ``REQUEST_BYTES`` across gaps of at most ``GAP_BYTES`` (planning is pure and tested
on its own); a whole load of a checkpoint of hundreds of tensors makes a handful of GETs; a
damaged tensor is still reported by name (the others of its request intact), a failed request
names every tensor in it, and problems are collected, not raised one by one; a partial load
still fetches about its own bytes; a tensor cut across requests loads exactly and is verified.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.engine import reader as reader_module
from statevault.engine.reader import plan_requests
from statevault.format.manifest import TensorEntry
from statevault.storage.fsspec_storage import FsspecStorage
from tests.s3_server import MANIFEST, S3Bucket, manifest_body, record_s3_calls

MIB = 1 << 20


def _row(file: str, offset: int, nbytes: int) -> TensorEntry:
    return TensorEntry(f"t@{offset}", "numpy", "uint8", (nbytes,), file, offset, nbytes, "")


def _ranges(requests: list[Any]) -> list[tuple[str, int, int, list[tuple[int, int, int]]]]:
    return [
        (r.file, r.start, r.stop, [(p.index, p.start, p.stop) for p in r.parts]) for r in requests
    ]


# ---- planning (pure) ---------------------------------------------------------------------------


def test_adjacent_and_near_ranges_merge_far_ones_do_not() -> None:
    rows = [_row("a", 100, 50), _row("a", 150, 10), _row("a", 170, 30), _row("a", 10_000, 5)]
    requests = plan_requests(list(enumerate(rows)), request_bytes=MIB, gap_bytes=100)
    assert _ranges(requests) == [
        ("a", 100, 200, [(0, 0, 50), (1, 0, 10), (2, 0, 30)]),
        ("a", 10_000, 10_005, [(3, 0, 5)]),
    ]


def test_requests_follow_offsets_per_file_whatever_the_order_asked() -> None:
    rows = {7: _row("b", 0, 8), 3: _row("a", 40, 8), 5: _row("a", 0, 8), 1: _row("b", 8, 8)}
    requests = plan_requests(list(rows.items()), request_bytes=MIB, gap_bytes=MIB)
    assert _ranges(requests) == [
        ("a", 0, 48, [(5, 0, 8), (3, 0, 8)]),
        ("b", 0, 16, [(7, 0, 8), (1, 0, 8)]),
    ]


def test_requests_are_capped_and_a_long_tensor_is_cut_across_them() -> None:
    rows = [_row("a", 0, 300), _row("a", 300, 1000), _row("a", 1300, 0), _row("a", 1300, 50)]
    requests = plan_requests(list(enumerate(rows)), request_bytes=400, gap_bytes=10)
    assert _ranges(requests) == [
        ("a", 0, 300, [(0, 0, 300)]),
        ("a", 300, 700, [(1, 0, 400)]),
        ("a", 700, 1100, [(1, 400, 800)]),
        ("a", 1100, 1350, [(1, 800, 1000), (2, 0, 0), (3, 0, 50)]),
    ]
    for request in requests:
        assert request.stop - request.start <= 400


def test_a_tensor_alone_needs_no_merging() -> None:
    assert _ranges(plan_requests([(0, _row("a", 64, 16))])) == [("a", 64, 80, [(0, 0, 16)])]
    assert plan_requests([]) == []


# ---- on S3 (moto) ------------------------------------------------------------------------------


def _many(count: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            f"w{i:04d}": rng.standard_normal(64 + i % 200, np.float32) for i in range(count)
        },
        "step": 3,
    }


def _shard_gets(log: Any) -> list[Any]:
    return [c for c in log.of("GetObject") if not c.key.endswith(MANIFEST)]


def _equal(loaded: Any, state: dict[str, Any]) -> None:
    assert loaded["step"] == state["step"]
    assert loaded["layers"].keys() == state["layers"].keys()
    for key, value in state["layers"].items():
        np.testing.assert_array_equal(loaded["layers"][key], value)


@pytest.mark.s3
def test_a_load_of_many_tensors_makes_requests_per_file_not_per_tensor(
    s3_bucket: S3Bucket,
) -> None:
    url = f"{s3_bucket.url}/ck"
    options = s3_bucket.storage_options
    state = _many(600)
    sv.save(state, url, storage_options=options)
    files = len(manifest_body(s3_bucket.fs, url)["files"])

    for operation in ("load", "verify"):
        with record_s3_calls() as log:
            if operation == "load":
                _equal(sv.load(url, storage_options=options), state)
            else:
                assert sv.verify(url, storage_options=options).ok
        gets = _shard_gets(log)
        # Per file: its header (checked first) and one request for 600 small tensors.
        assert len(gets) <= 2 * files, (operation, [(c.key, c.range) for c in gets])
        assert all(c.range is not None for c in gets)


@pytest.mark.s3
def test_a_damaged_tensor_in_a_merged_request_is_named(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/ck"
    options = s3_bucket.storage_options
    state = _many(200, seed=1)
    sv.save(state, url, storage_options=options)
    rows = manifest_body(s3_bucket.fs, url)["tensors"]
    bad = [r for r in rows if r["path"] in ("layers/w0050", "layers/w0120")]
    shard = f"{url}/{bad[0]['file']}"
    data = bytearray(s3_bucket.fs.cat_file(shard))
    for row in bad:
        data[row["offset"] + row["nbytes"] // 2] ^= 0x04
    s3_bucket.fs.pipe_file(shard, bytes(data))

    with pytest.raises(sv.CorruptCheckpointError) as caught:
        sv.load(url, storage_options=options)
    assert "layers/w0050" in str(caught.value) and "(and 1 more)" in str(caught.value)
    problems = sv.verify(url, storage_options=options).problems
    assert len(problems) == 2, problems
    assert "tensor layers/w0050 in" in problems[0] and "checksum mismatch" in problems[0]
    assert "tensor layers/w0120 in" in problems[1]
    # The tensors around them came through the same request intact.
    assert np.array_equal(sv.load(url, only="layers/w0051", storage_options=options),
                          state["layers"]["w0051"])  # fmt: skip


@pytest.mark.s3
def test_a_partial_read_fetches_about_its_bytes_across_gaps(s3_bucket: S3Bucket) -> None:
    """Wanted tensors far apart are fetched by separate requests (the bytes between them are
    not); near ones share a request (the small gap fetched and dropped)."""
    url = f"{s3_bucket.url}/ck"
    options = s3_bucket.storage_options
    rng = np.random.default_rng(2)
    sizes = {"a": 1000, "big": MIB, "b": 3000, "near": 1000, "c": 500}  # float32 counts
    state = {name: rng.standard_normal(count, np.float32) for name, count in sizes.items()}
    sv.save(state, url, storage_options=options)
    with record_s3_calls() as log:
        loaded = sv.load(url, only="a", storage_options=options)
    np.testing.assert_array_equal(loaded, state["a"])
    fetched = sum(c.content_length or 0 for c in _shard_gets(log))
    assert 4000 <= fetched < 4000 + (64 << 10), fetched

    checkpoint = open_checkpoint(url, options)
    index = {row.path: i for i, row in enumerate(checkpoint.manifest.tensors)}
    wanted = [index["c"], index["a"], index["b"]]
    with record_s3_calls() as log:
        outcome = checkpoint.reader.read(wanted, _scratch, verify=True)
    assert not outcome.problems and outcome.bytes_read == 4 * (1000 + 3000 + 500)
    for name in ("a", "b", "c"):
        assert bytes(outcome.arrays[index[name]]) == state[name].tobytes()  # type: ignore[arg-type]
    gets = sorted(c.content_length or 0 for c in _shard_gets(log))
    assert gets == [4 * 1000, 4 * (3000 + 1000 + 500)], gets


@pytest.mark.s3
def test_a_long_tensor_cut_across_requests_loads_and_is_verified(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "REQUEST_BYTES", MIB)
    url = f"{s3_bucket.url}/ck"
    options = s3_bucket.storage_options
    rng = np.random.default_rng(3)
    state = {"long": rng.standard_normal(5 * MIB // 4 + 7, np.float32), "small": np.arange(9)}
    sv.save(state, url, storage_options=options)
    with record_s3_calls() as log:
        loaded = sv.load(url, storage_options=options)
    np.testing.assert_array_equal(loaded["long"], state["long"])
    np.testing.assert_array_equal(loaded["small"], state["small"])
    gets = _shard_gets(log)
    assert 6 <= len(gets) <= 8, [(c.range, c.content_length) for c in gets]  # header + 5-6 + 1

    row = next(r for r in manifest_body(s3_bucket.fs, url)["tensors"] if r["path"] == "long")
    shard = f"{url}/{row['file']}"
    data = bytearray(s3_bucket.fs.cat_file(shard))
    data[row["offset"] + 3 * MIB + 5] ^= 0x01  # in the fourth request of the tensor
    s3_bucket.fs.pipe_file(shard, bytes(data))
    with pytest.raises(sv.CorruptCheckpointError, match=r"tensor long in .*checksum mismatch"):
        sv.load(url, storage_options=options)


# ---- failures, on memory:// ----------------------------------------------------------------------


def test_a_failed_request_names_each_of_its_tensors_and_is_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "memory://statevault-remote-read/failed"
    state = _many(30, seed=4)
    sv.save(state, url, overwrite=True)
    calls: list[tuple[int, int]] = []
    original = FsspecStorage.read_range

    def failing(self: FsspecStorage, path: str, offset: int, size: int) -> bytes:
        calls.append((offset, size))
        if size > 1000:  # the tensors' request, not a header
            raise ConnectionResetError("connection reset by peer")
        return original(self, path, offset, size)

    monkeypatch.setattr(FsspecStorage, "read_range", failing)
    checkpoint = open_checkpoint(url)
    outcome = checkpoint.reader.read(range(len(checkpoint.manifest.tensors)), _scratch, verify=True)
    assert len(calls) == 1, calls
    assert len(outcome.problems) == 30, outcome.problems
    assert all("read failed (connection reset by peer)" in p for p in outcome.problems)
    assert [p.split(" in ")[0] for p in outcome.problems] == [
        f"tensor {row.path}" for row in checkpoint.manifest.tensors
    ]
    report = sv.verify(url)
    assert not report.ok and "layers/w0000" in report.problems[0]


def test_a_load_through_a_counting_storage_is_one_request_per_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "memory://statevault-remote-read/counted"
    state = _many(400, seed=5)
    sv.save(state, url, overwrite=True)
    calls: list[tuple[str, int, int]] = []
    original = FsspecStorage.read_range

    def counting(self: FsspecStorage, path: str, offset: int, size: int) -> bytes:
        calls.append((path, offset, size))
        return original(self, path, offset, size)

    monkeypatch.setattr(FsspecStorage, "read_range", counting)
    _equal(sv.load(url), state)
    files = open_checkpoint(url).manifest.files
    assert len(calls) == len(files), calls
    assert sum(size for _, _, size in calls) == sum(f.size - f.header_size for f in files)


def _scratch(entry: TensorEntry) -> tuple[object, memoryview]:
    buffer = bytearray(entry.nbytes)
    return buffer, memoryview(buffer)
