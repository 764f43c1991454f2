"""Merged, fetched-ahead reads of resharding loads from object stores (engine/prefetch).

Unit tests drive the prefetcher with an in-memory "file" and a fetch function that counts and
can fail or stall; the end-to-end test loads a sharded checkpoint of 60 tensors from S3 (moto)
and counts the GET requests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statevault as sv
from statevault.engine.prefetch import Prefetcher, plan
from tests import dist_workloads as work
from tests.dist_helpers import run_ranks

DATA = bytes(range(256)) * 4096  # a 1 MiB "file"


class Store:
    """Fetches from DATA, counting requests and the bytes fetched and not yet released."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.requests: list[tuple[int, int]] = []
        self.fail_at = fail_at
        self.delay = delay
        self.lock = threading.Lock()

    def fetch(self, name: str, offset: int, size: int) -> bytes:
        assert name == "f"
        time.sleep(self.delay)
        with self.lock:
            self.requests.append((offset, size))
            if self.fail_at is not None and len(self.requests) > self.fail_at:
                raise OSError("connection reset")
        return DATA[offset : offset + size]


ranges_strategy = st.lists(
    st.tuples(st.integers(0, len(DATA) - 1), st.integers(1, 40_000)).map(
        lambda pair: ("f", pair[0], min(len(DATA), pair[0] + pair[1]))
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ranges=ranges_strategy, limit=st.integers(1, 200_000), gap=st.integers(0, 50_000))
def test_plan_covers_each_range_in_one_request_within_the_limits(
    ranges: list[tuple[str, int, int]], limit: int, gap: int
) -> None:
    requests = plan(ranges, limit, gap)
    for _, start, stop in ranges:
        if stop - start <= limit:  # longer ones are read on their own
            assert any(r.start <= start and stop <= r.stop for r in requests), (start, stop)
    for request in requests:
        assert request.stop - request.start <= limit


@settings(max_examples=100, deadline=None)
@given(ranges=ranges_strategy)
def test_every_planned_range_reads_its_bytes_and_requests_are_merged(
    ranges: list[tuple[str, int, int]],
) -> None:
    store = Store()
    prefetcher = Prefetcher(ranges, store.fetch, request_bytes=256 << 10, gap_bytes=64 << 10)
    try:
        for _, start, stop in ranges:
            out = memoryview(bytearray(stop - start))
            assert prefetcher.read("f", start, out)
            assert bytes(out) == DATA[start:stop]
    finally:
        prefetcher.close()
    assert len(store.requests) == prefetcher.request_count <= len(set(ranges))
    assert all(data is None for data in (r.data for r in prefetcher._requests))


def test_a_range_not_planned_is_left_to_the_caller() -> None:
    store = Store()
    prefetcher = Prefetcher([("f", 100, 200)], store.fetch)
    try:
        out = memoryview(bytearray(50))
        assert not prefetcher.read("f", 120, out)  # inside a request, but not planned
        assert not prefetcher.read("g", 100, memoryview(bytearray(100)))
        assert prefetcher.read("f", 100, memoryview(bytearray(100)))
        assert not prefetcher.read("f", 100, memoryview(bytearray(100)))  # served as planned
    finally:
        prefetcher.close()


def test_a_failed_request_fails_every_read_from_it() -> None:
    store = Store(fail_at=0)
    prefetcher = Prefetcher([("f", 0, 10), ("f", 20, 30)], store.fetch)
    try:
        for start in (0, 20):
            with pytest.raises(OSError, match="connection reset"):
                prefetcher.read("f", start, memoryview(bytearray(10)))
    finally:
        prefetcher.close()


def test_fetchers_stay_within_the_window() -> None:
    """Twelve requests of 64 KiB, a window of two: the fetchers never hold more than the
    window plus the requests in flight, and the reads still get every byte."""
    size = 64 << 10
    ranges = [("f", k * size, (k + 1) * size) for k in range(12)]
    store = Store(delay=0.005)
    prefetcher = Prefetcher(
        ranges, store.fetch, request_bytes=size, gap_bytes=0, in_flight=2, window_bytes=2 * size
    )
    held: list[int] = []
    try:
        time.sleep(0.2)  # let the fetchers run ahead as far as they may
        held.append(prefetcher._held)
        for _, start, stop in ranges:
            out = memoryview(bytearray(stop - start))
            assert prefetcher.read("f", start, out)
            assert bytes(out) == DATA[start:stop]
            held.append(prefetcher._held)
    finally:
        prefetcher.close()
    assert max(held) <= 2 * size + 2 * size  # the window, plus what was in flight
    assert len(store.requests) == 12


@pytest.mark.s3
def test_a_sharded_checkpoint_loads_from_s3_in_a_few_merged_requests(
    tmp_path: Path, s3_bucket: Any
) -> None:
    from tests.s3_server import record_s3_calls

    local = tmp_path / "ck"
    run_ranks(work.many_sharded_save, 2, str(local), 60)
    url = f"{s3_bucket.url}/ck"
    s3_bucket.fs.put(str(local), url, recursive=True)
    expected = sv.load(local)
    with record_s3_calls() as calls:
        loaded = sv.load(url, storage_options=s3_bucket.storage_options)
    gets = calls.of("GetObject")
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # 61 tensors in two chunks each: 122 spans, one request each without merging. Merged: the
    # manifest, each shard's header, and few requests per shard.
    assert len(gets) <= 10, [(c.key, c.range) for c in gets]
    assert np.array_equal(loaded["big"].numpy(), expected["big"].numpy())


@pytest.mark.s3
def test_a_prefetched_load_holds_about_the_window_not_the_whole_load(
    tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 MiB of sharded tensors, each followed by a replicated scalar stored between them,
    loaded from S3 with a 4 MiB window and 1 MiB requests: the load reads its tensors in shard
    order, so the prefetcher never holds more than the window, the requests in flight and one
    partly read request per shard (had it read the scalars first, every request holding one
    would stay fetched until the end: about the whole load)."""
    from statevault.engine import prefetch, regions

    local = tmp_path / "ck"
    run_ranks(work.interleaved_save, 2, str(local), 40, 256)
    url = f"{s3_bucket.url}/ck"
    s3_bucket.fs.put(str(local), url, recursive=True)
    mib = 1 << 20
    monkeypatch.setattr(regions, "WINDOW_BYTES", 4 * mib)
    monkeypatch.setattr(regions, "REQUEST_BYTES", mib)
    monkeypatch.setattr(regions, "MIN_REQUEST_BYTES", mib)
    peak = [0]
    original = prefetch.Prefetcher.read

    def recording(self: prefetch.Prefetcher, file: str, start: int, out: memoryview) -> bool:
        peak[0] = max(peak[0], self._held)
        return original(self, file, start, out)

    monkeypatch.setattr(prefetch.Prefetcher, "read", recording)
    loaded = sv.load(url, storage_options=s3_bucket.storage_options)
    expected = sv.load(local)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    in_flight = prefetch.REQUESTS_IN_FLIGHT
    assert 0 < peak[0] <= (4 + in_flight + 2) * mib, peak[0] / mib


@pytest.mark.s3
def test_a_partial_load_from_s3_checks_only_the_shards_it_reads(
    tmp_path: Path, s3_bucket: Any
) -> None:
    """``load(only=...)`` of one replicated tensor touches only the shard holding it: no size or
    header request goes to the other rank's shard."""
    from statevault.checkpoint import open_checkpoint
    from tests.s3_server import record_s3_calls

    local = tmp_path / "ck"
    run_ranks(work.interleaved_save, 2, str(local), 4, 8)
    url = f"{s3_bucket.url}/ck"
    s3_bucket.fs.put(str(local), url, recursive=True)
    manifest = open_checkpoint(local).manifest
    row = next(t for t in manifest.tensors if t.path == "step0")
    others = {f.name for f in manifest.files} - {row.file}
    assert others, "the fixture has two shards"
    with record_s3_calls() as calls:
        loaded = sv.load(url, only="step0", storage_options=s3_bucket.storage_options)
    assert torch.equal(loaded, torch.tensor(0.0))
    touched = {c.key.rsplit("/", 1)[-1] for c in calls.calls}
    assert not touched & others, touched
