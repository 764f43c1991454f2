"""Remote storage: fsspec URLs, and the commit protocol without rename on a real S3 server.

Everything S3 runs against moto's server mode on a loopback port (tests/s3_server.py, fixtures
``s3`` and ``s3_bucket`` in conftest.py), reached through s3fs with ``storage_options`` as a
user reaches a bucket. What must hold:

- any fsspec URL round-trips a realistic state exactly (``s3://``, ``memory://``, ``file://``;
  a plain path gives the same result); the shards open with the stock safetensors library;
- on an object store the manifest is the commit: the objects under a checkpoint's prefix are
  exactly its manifest and the shards it lists; a prefix without a manifest is not a checkpoint;
- overwrite=False refuses, overwrite=True replaces and leaves nothing of the old save;
- a connection dropped for good in the middle of a multipart upload, a failed overwrite and a
  process SIGKILLed mid-upload never leave a loadable partial or mixed checkpoint, and a retry
  of the same save succeeds; a connection dropped once is retried by the client;
- loads and verifies read byte ranges, about the checkpoint's bytes and no more;
- a missing bucket fails fast with a statevault error naming the URL;
- a flipped bit in a shard object is caught, naming the tensor.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import statevault as sv
from statevault.format.names import is_marker_name
from tests.s3_server import (
    ACCESS_KEY,
    MANIFEST,
    SECRET_KEY,
    FaultProxy,
    MotoS3Server,
    S3Bucket,
    has_manifest,
    kill_state,
    manifest_body,
    objects_under,
    record_s3_calls,
    shard_names,
)

pytestmark = pytest.mark.s3

S3_SERVER_SCRIPT = Path(__file__).with_name("s3_server.py")
BIG_MIB = 24  # one tensor this large spans several multipart parts


# ---------------------------------------------------------------------------------------------
# States and checks
# ---------------------------------------------------------------------------------------------


def realistic_state(seed: int = 7) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state to save, what a load returns): a trained model and optimizer, tensors of several
    dtypes, numpy arrays and plain values of every kind the format keeps exactly."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randn(8, 16, generator=gen)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {
        "model": model,
        "optimizer": optimizer,
        "tensors": {
            "f32": torch.randn(256, 128, generator=gen),
            "f16": torch.randn(33, 7, generator=gen).half(),
            "bf16": torch.randn(128, 65, generator=gen).to(torch.bfloat16),
            "i64": torch.randint(-(1 << 40), 1 << 40, (100,), generator=gen),
            "u8": torch.randint(0, 256, (3, 5, 7), generator=gen, dtype=torch.uint8),
            "bool": torch.rand(17, generator=gen) > 0.5,
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
        },
        "numpy": [
            np.random.default_rng(seed).standard_normal((40, 30)),
            np.arange(12, dtype=np.int32).reshape(3, 4),
            np.array([True, False, True]),
        ],
        "step": 1234,
        "lr": 3e-4,
        "name": "run-\u03b1",
        "tags": ("a", "b"),
        "by_id": {1: "one", 2: [2, 2]},
        "blob": b"\x00\xffbytes",
        "flag": True,
        "none": None,
    }
    expected = {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    return state, expected


def assert_same(loaded: Any, expected: Any, where: str = "<root>") -> None:
    """Exact equality of nested states: types, key order, dtypes, shapes and every bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), where
        assert (loaded.dtype, loaded.shape) == (expected.dtype, expected.shape), where
        bits = loaded.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bits, expected.contiguous().reshape(-1).view(torch.uint8)), where
    elif isinstance(expected, np.ndarray):
        assert type(loaded) is np.ndarray, where
        assert (loaded.dtype, loaded.shape) == (expected.dtype, expected.shape), where
        assert loaded.tobytes() == expected.tobytes(), where
    elif isinstance(expected, dict):
        assert isinstance(loaded, dict) and list(loaded) == list(expected), where
        for key in expected:
            assert_same(loaded[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected), where
        for i, (a, b) in enumerate(zip(loaded, expected, strict=True)):
            assert_same(a, b, f"{where}/{i}")
    else:
        assert type(loaded) is type(expected) and loaded == expected, where


def big_state(seed: int, mib: int = BIG_MIB) -> dict[str, Any]:
    """One tensor of ``mib`` MiB (several multipart parts) and a few small values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(mib << 18, generator=gen).reshape(-1, 256),
        "small": {"a": torch.randn(7, generator=gen), "b": torch.arange(5)},
        "step": seed,
    }


def assert_exact_listing(fs: Any, prefix: str) -> dict[str, Any]:
    """The objects under ``prefix`` are exactly manifest.json, the shards it lists, with the
    sizes it records, and the marker of the save that wrote them (commit.py). Returns the
    manifest body."""
    body = manifest_body(fs, prefix)
    expected = {MANIFEST, *shard_names(body)}
    found = objects_under(fs, prefix)
    markers = {name for name in found if is_marker_name(name)}
    assert len(markers) == 1, f"objects under {prefix}: one save marker expected: {sorted(found)}"
    assert set(found) - markers == expected, (
        f"objects under {prefix} are not exactly the manifest and its shards: "
        f"extra {sorted(set(found) - markers - expected)}, missing {sorted(expected - set(found))}"
    )
    for entry in body["files"]:
        assert found[entry["name"]] == entry["size"], entry["name"]
    return body


def leaf(tree: Any, key_path: str) -> Any:
    """The value at a manifest key path ("optimizer/state/0/exp_avg") in a nested state."""
    for part in key_path.split("/"):
        if isinstance(tree, dict):
            tree = tree[part] if part in tree else tree[int(part)]
        else:
            tree = tree[int(part)]
    return tree


def error_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def fail_upload_parts_from(nth: int) -> tuple[Callable[..., BaseException | None], list[Any]]:
    """A fault rule: the ``nth`` UploadPart call (1-based) and every later one fail with a
    ConnectionResetError, as when the connection drops and stays down."""
    raised: list[BaseException] = []

    def rule(operation: str, params: dict[str, Any], count: int) -> BaseException | None:
        if operation == "UploadPart" and count >= nth - 1:
            error = ConnectionResetError(
                f"injected: connection dropped during part {params.get('PartNumber')}"
            )
            raised.append(error)
            return error
        return None

    return rule, raised


# ---------------------------------------------------------------------------------------------
# The fixture itself (passes without any statevault S3 support)
# ---------------------------------------------------------------------------------------------


def test_fixture_serves_the_s3_protocol(s3_bucket: S3Bucket) -> None:
    """Multipart and plain uploads, listings, ranged reads, a second client: through s3fs."""
    fs = s3_bucket.fs
    payload = os.urandom(3 << 20)
    with fs.open(f"{s3_bucket.url}/a/b.bin", "wb", block_size=5 << 20) as handle:
        handle.write(payload)
    fs.pipe_file(f"{s3_bucket.url}/a/c.txt", b"hello")
    assert objects_under(fs, f"{s3_bucket.url}/a") == {"b.bin": len(payload), "c.txt": 5}
    with record_s3_calls() as log:
        assert fs.cat_file(f"{s3_bucket.url}/a/b.bin", start=10, end=20) == payload[10:20]
    assert [(c.range, c.content_length) for c in log.of("GetObject")] == [("bytes=10-19", 10)]
    other = s3_bucket.fs.__class__(
        skip_instance_cache=True, use_listings_cache=False, **s3_bucket.storage_options
    )
    assert other.cat_file(f"{s3_bucket.url}/a/c.txt") == b"hello"


def test_fault_proxy_drops_an_upload_that_the_client_retries(
    s3: MotoS3Server, s3_bucket: S3Bucket
) -> None:
    proxy = FaultProxy(s3.endpoint_url, lambda method, target, length, index: index == 0)
    try:
        fs = s3_bucket.fs.__class__(
            skip_instance_cache=True, **s3.storage_options(proxy.endpoint_url)
        )
        payload = os.urandom(2 << 20)
        fs.pipe_file(f"{s3_bucket.url}/x.bin", payload)  # one PUT: dropped, then retried
    finally:
        proxy.close()
    assert [method for method, _, _ in proxy.dropped] == ["PUT"]
    assert s3_bucket.fs.cat_file(f"{s3_bucket.url}/x.bin") == payload


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:statevault. partial restore")
def test_round_trip_to_s3_is_exact(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    state, expected = realistic_state()
    sv.save(state, url, metadata={"note": "s3"}, storage_options=options)

    assert_same(sv.load(url, storage_options=options), expected)
    report = sv.verify(url, storage_options=options)
    assert report.ok, report.problems
    assert report.tensors == len(manifest_body(s3_bucket.fs, url)["tensors"])

    fresh_state, _ = realistic_state(seed=99)  # other weights, same shapes
    fresh_model, fresh_optimizer = fresh_state["model"], fresh_state["optimizer"]
    sv.load(
        url,
        into={"model": fresh_model, "optimizer": fresh_optimizer},
        strict=False,
        storage_options=options,
    )
    assert_same(fresh_model.state_dict(), expected["model"])
    assert_same(fresh_optimizer.state_dict(), expected["optimizer"])

    # The prefix holds the commit record and the shards it lists, nothing else.
    body = assert_exact_listing(s3_bucket.fs, url)

    # Each shard is a valid safetensors file holding the tensors the manifest puts there.
    for name in shard_names(body):
        s3_bucket.fs.get(f"{url}/{name}", str(tmp_path / name))
        tensors = load_file(tmp_path / name)
        rows = [row for row in body["tensors"] if row["file"] == name]
        assert sorted(tensors) == sorted(row["path"] for row in rows), name
        for row in rows:
            original = leaf(expected, row["path"])
            if isinstance(original, np.ndarray):  # safetensors.torch gives numpy leaves as torch
                original = torch.from_numpy(original)
            assert_same(tensors[row["path"]], original, row["path"])


def test_credentials_and_endpoint_never_reach_the_checkpoint(
    s3: MotoS3Server, s3_bucket: S3Bucket
) -> None:
    url = f"{s3_bucket.url}/run/ck"
    sv.save({"w": torch.ones(3), "step": 1}, url, storage_options=s3_bucket.storage_options)
    endpoint = s3.endpoint_url.split("://", 1)[1]
    for name in objects_under(s3_bucket.fs, url):
        data = s3_bucket.fs.cat_file(f"{url}/{name}")
        for secret in (ACCESS_KEY, SECRET_KEY, endpoint):
            assert secret.encode() not in data, f"{secret!r} written into {name}"


@pytest.fixture
def memory_prefix(memory_root: str) -> str:
    return f"{memory_root}/run/ck"


def test_memory_url_round_trip(memory_prefix: str) -> None:
    state, expected = realistic_state()
    sv.save(state, memory_prefix)
    assert_same(sv.load(memory_prefix), expected)
    assert sv.verify(memory_prefix).ok
    fs = fsspec.filesystem("memory")
    assert_exact_listing(fs, memory_prefix)
    fs.rm(f"{memory_prefix}/{MANIFEST}")
    with pytest.raises(sv.CheckpointNotFoundError):
        sv.load(memory_prefix)


def test_file_url_and_plain_path_give_identical_results(tmp_path: Path) -> None:
    state, expected = realistic_state()
    as_url, as_path = tmp_path / "url", tmp_path / "path"
    sv.save(state, f"file://{as_url}")
    sv.save(state, as_path)
    for loaded in (
        sv.load(f"file://{as_url}"),
        sv.load(as_path),
        sv.load(as_url),  # written through a URL, read as a path, and the reverse
        sv.load(f"file://{as_path}"),
    ):
        assert_same(loaded, expected)
    assert sv.verify(f"file://{as_url}").ok and sv.verify(as_path).ok

    def layout(directory: Path) -> tuple[Any, ...]:
        body = json.loads((directory / MANIFEST).read_bytes())["body"]
        rows = [{k: v for k, v in row.items() if k != "file"} for row in body["tensors"]]
        return rows, body["tree"], len(body["files"])

    assert layout(as_url) == layout(as_path)
    for directory in (as_url, as_path):
        assert_exact_listing(fsspec.filesystem("file"), str(directory))


# ---------------------------------------------------------------------------------------------
# The commit: manifest last, overwrite
# ---------------------------------------------------------------------------------------------


def test_prefix_without_manifest_is_not_a_checkpoint(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    sv.save(big_state(1, mib=1), url, storage_options=options)
    shards = shard_names(manifest_body(s3_bucket.fs, url))
    s3_bucket.fs.rm(f"{url}/{MANIFEST}")  # what a save in flight, or a dead one, leaves
    left = set(objects_under(s3_bucket.fs, url))
    assert {name for name in left if not is_marker_name(name)} == set(shards)

    with pytest.raises(sv.CheckpointNotFoundError) as caught:
        sv.load(url, storage_options=options)
    assert url in str(caught.value)
    with pytest.raises(sv.CheckpointNotFoundError):
        sv.verify(url, storage_options=options)

    # Leftovers are not a checkpoint: a save there needs no overwrite=True.
    sv.save(big_state(2, mib=1), url, storage_options=options)
    assert_same(sv.load(url, storage_options=options), big_state(2, mib=1))


def test_overwrite_false_refuses_and_keeps_the_old_checkpoint(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    old, old_expected = realistic_state(seed=1)
    sv.save(old, url, storage_options=options)
    before = objects_under(s3_bucket.fs, url)

    with pytest.raises(sv.CheckpointExistsError) as caught:
        sv.save(big_state(2, mib=1), url, storage_options=options)
    assert url in str(caught.value)

    assert objects_under(s3_bucket.fs, url) == before  # the refused save wrote nothing
    assert_same(sv.load(url, storage_options=options), old_expected)
    assert sv.verify(url, storage_options=options).ok


def test_overwrite_true_replaces_and_leaves_nothing_of_the_old_save(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    old, _ = realistic_state(seed=1)
    sv.save(old, url, storage_options=options)
    old_shards = set(shard_names(manifest_body(s3_bucket.fs, url)))

    new = big_state(2, mib=2)
    sv.save(new, url, overwrite=True, storage_options=options)

    assert_same(sv.load(url, storage_options=options), new)
    assert sv.verify(url, storage_options=options).ok
    body = assert_exact_listing(s3_bucket.fs, url)
    left = old_shards & set(shard_names(body))
    assert not left, (
        f"shards of the old save still under the prefix (names must be per save): {left}"
    )


# ---------------------------------------------------------------------------------------------
# Faults: dropped connections, failed overwrite, killed process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nth", [1, 2], ids=["first-part", "second-part"])
def test_connection_dropped_mid_multipart_upload(s3_bucket: S3Bucket, nth: int) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    state = big_state(3)
    rule, raised = fail_upload_parts_from(nth)

    with record_s3_calls(rule) as log, pytest.raises((OSError, sv.CheckpointError)) as caught:
        sv.save(state, url, storage_options=options)
    parts = log.of("UploadPart")
    assert len(parts) >= nth, (
        f"a {BIG_MIB} MiB shard must go up in multipart parts (never buffered whole); "
        f"calls seen: {sorted(set(log.operations()))}"
    )
    assert raised, "no part failed"
    assert any(error in raised for error in error_chain(caught.value)), (
        f"the dropped connection did not reach the caller: got {caught.value!r}"
    )

    assert not has_manifest(s3_bucket.fs, url), "a failed upload left a committed checkpoint"
    with pytest.raises(sv.CheckpointNotFoundError):
        sv.load(url, storage_options=options)

    # The same save again, the network back: it succeeds and loads exactly.
    sv.save(state, url, storage_options=options)
    assert_same(sv.load(url, storage_options=options), state)
    assert sv.verify(url, storage_options=options).ok
    listed = objects_under(s3_bucket.fs, url)
    assert {MANIFEST, *shard_names(manifest_body(s3_bucket.fs, url))} <= set(listed)


@pytest.mark.parametrize("nth", [1, 2], ids=["first-part", "second-part"])
def test_failed_upload_aborts_its_multipart_upload(s3_bucket: S3Bucket, nth: int) -> None:
    """Beyond the commit rule: an upload begun and never completed nor aborted stays in the
    bucket, invisible to listings and billed, until a lifecycle rule removes it."""
    url = f"{s3_bucket.url}/run/ck"
    rule, raised = fail_upload_parts_from(nth)
    with record_s3_calls(rule), pytest.raises((OSError, sv.CheckpointError)):
        sv.save(big_state(3), url, storage_options=s3_bucket.storage_options)
    assert raised
    assert s3_bucket.pending_multipart_uploads() == [], "a failed save left its upload open"


def test_failed_overwrite_never_leaves_a_mixture(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    old = big_state(4, mib=1)
    sv.save(old, url, storage_options=options)
    new = big_state(5)
    rule, raised = fail_upload_parts_from(2)

    with record_s3_calls(rule), pytest.raises((OSError, sv.CheckpointError)) as caught:
        sv.save(new, url, overwrite=True, storage_options=options)
    assert raised, "the overwrite never reached a second part"
    assert any(error in raised for error in error_chain(caught.value)), repr(caught.value)

    # Documented: there may be no checkpoint at the path now; never the new one, never a mix.
    try:
        loaded = sv.load(url, storage_options=options)
    except sv.CheckpointNotFoundError:
        assert not has_manifest(s3_bucket.fs, url)
    else:
        assert_same(loaded, old)

    sv.save(new, url, overwrite=True, storage_options=options)
    assert_same(sv.load(url, storage_options=options), new)
    assert_exact_listing(s3_bucket.fs, url)  # nothing of the old save or the failed one left


def test_connection_dropped_once_is_retried_by_the_client(
    s3: MotoS3Server, s3_bucket: S3Bucket
) -> None:
    dropped: list[int] = []

    def drop_first_big_upload(method: str, target: str, length: int, index: int) -> bool:
        if method == "PUT" and length >= 1 << 20 and not dropped:
            dropped.append(index)
            return True
        return False

    proxy = FaultProxy(s3.endpoint_url, drop_first_big_upload)
    try:
        url = f"{s3_bucket.url}/run/ck"
        state = big_state(6)
        sv.save(state, url, storage_options=s3.storage_options(proxy.endpoint_url))
        assert proxy.dropped, f"no upload was dropped; requests: {proxy.requests[:10]}"
    finally:
        proxy.close()
    assert_same(sv.load(url, storage_options=s3_bucket.storage_options), state)
    assert_exact_listing(s3_bucket.fs, url)


class Saver:
    """A child process (tests/s3_server.py kill-child) that saves one state when told to."""

    def __init__(self, options: dict[str, Any], url: str, seed: int, log: Path) -> None:
        self.seed = seed
        self.log = log
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(S3_SERVER_SCRIPT),
                "kill-child",
                json.dumps(options),
                url,
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put(None)

    def expect(self, word: str, timeout: float = 60.0) -> None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = f"<nothing in {timeout} s>"
        if line != word:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"saver {self.seed}: expected {word}, got {line}\n{self.stderr()}")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def kill(self) -> list[str]:
        """SIGKILL it; returns the lines it printed after START."""
        self.process.kill()
        self.process.wait()
        self.reader.join(timeout=10)
        rest = []
        while (line := self.lines.get(timeout=10)) is not None:
            rest.append(line)
        return rest

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def test_process_killed_mid_upload(s3: MotoS3Server, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Savers SIGKILLed at random instants of a save, alternately to a fresh prefix and over a
    committed checkpoint: afterwards the URL holds nothing, or exactly the old or the new state
    (verified), never a mixture; a save that returned is committed; a new save there succeeds."""
    shared = f"{s3_bucket.url}/run/ck"  # overwritten by every other saver
    options = s3_bucket.storage_options
    rng = random.Random(20260611)
    seeds = [11, 12, 13, 14]
    urls = {
        seed: shared if i % 2 else f"{s3_bucket.url}/run/fresh-{seed}"
        for i, seed in enumerate(seeds)
    }
    savers = [Saver(options, urls[seed], seed, tmp_path / f"saver-{seed}.log") for seed in seeds]
    try:
        for saver in savers:  # all imported and warmed up: nothing competes for the CPUs
            saver.expect("READY")
        # The checkpoint the first overwriting saver replaces; its time scales the kill delays.
        sv.save({"warm": 1}, f"{s3_bucket.url}/warmup", storage_options=options)
        started = time.monotonic()
        sv.save(kill_state(10), shared, storage_options=options)
        duration = time.monotonic() - started

        committed_at = {shared: 10}
        outcomes = []
        for saver in savers:
            url = urls[saver.seed]
            previous = committed_at.get(url)
            saver.go()
            saver.expect("START")
            delay = rng.uniform(0.0, 1.0) * duration
            time.sleep(delay)
            after = saver.kill()
            s3.wait_idle()  # requests the child had sent may still be applied: let them land

            try:
                loaded = sv.load(url, storage_options=options)
            except sv.CheckpointNotFoundError:
                assert not has_manifest(s3_bucket.fs, url)
                outcome = "none"
            else:
                assert loaded["seed"] in (previous, saver.seed), (loaded["seed"], previous)
                assert_same(loaded, kill_state(loaded["seed"]))
                assert sv.verify(url, storage_options=options).ok
                outcome = "new" if loaded["seed"] == saver.seed else "old"
            if "DONE" in after:
                assert outcome == "new", "a save that returned is not committed"
            outcomes.append((url.rsplit("/", 1)[1], round(delay, 3), outcome, "DONE" in after))

            # A new save to the same URL succeeds (onto leftovers, or over what was committed).
            exists = outcome != "none"
            sv.save(kill_state(saver.seed), url, overwrite=exists, storage_options=options)
            assert_same(sv.load(url, storage_options=options), kill_state(saver.seed))
            if exists:
                assert_exact_listing(s3_bucket.fs, url)
            committed_at[url] = saver.seed
    finally:
        for saver in savers:
            if saver.process.poll() is None:
                saver.process.kill()
                saver.process.wait()
    assert any(not done for *_, done in outcomes), (
        f"no kill landed inside a save (a save takes {duration:.2f} s): {outcomes}"
    )


# ---------------------------------------------------------------------------------------------
# Ranged reads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["load", "verify"])
def test_reads_fetch_byte_ranges_and_about_the_checkpoints_bytes(
    s3_bucket: S3Bucket, operation: str
) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    gen = torch.Generator().manual_seed(8)
    state = {
        "big": torch.randn(4 << 20, generator=gen),  # 16 MiB
        "small": {f"t{i}": torch.randn(100 + i, generator=gen) for i in range(5)},
        "ints": torch.arange(1000),
        "step": 8,
    }
    sv.save(state, url, storage_options=options)
    body = manifest_body(s3_bucket.fs, url)
    shard_bytes = sum(entry["size"] for entry in body["files"])
    tensor_bytes = sum(row["nbytes"] for row in body["tensors"])

    with record_s3_calls() as log:
        if operation == "load":
            assert_same(sv.load(url, storage_options=options), state)
        else:
            assert sv.verify(url, storage_options=options).ok
    shard_gets = [c for c in log.of("GetObject") if not c.key.endswith(MANIFEST)]
    whole = [c.key for c in shard_gets if c.range is None]
    assert not whole, f"shards fetched whole instead of by byte range: {whole}"
    fetched = sum(c.content_length or 0 for c in shard_gets)
    assert tensor_bytes <= fetched, (fetched, tensor_bytes)
    assert fetched <= 1.05 * shard_bytes + (256 << 10), (
        f"{operation} fetched {fetched} B for a checkpoint of {shard_bytes} B in shards: "
        f"{[(c.key, c.range) for c in shard_gets][:20]}"
    )


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["save", "load", "verify"])
def test_missing_bucket_fails_fast_naming_the_url(s3: MotoS3Server, operation: str) -> None:
    bucket = f"sv-no-such-bucket-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/run/ck"
    options = s3.storage_options()
    started = time.monotonic()
    with pytest.raises(sv.CheckpointError) as caught:
        if operation == "save":
            sv.save({"w": torch.ones(2)}, url, storage_options=options)
        elif operation == "load":
            sv.load(url, storage_options=options)
        else:
            sv.verify(url, storage_options=options)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"{operation} took {elapsed:.1f} s to report a missing bucket"
    message = str(caught.value)
    assert url in message, message
    assert SECRET_KEY not in message
    assert not s3.filesystem().exists(bucket), "statevault created a bucket"


def test_bit_flip_in_a_shard_object_names_the_tensor(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    state, _ = realistic_state()
    sv.save(state, url, storage_options=options)
    row = next(
        r for r in manifest_body(s3_bucket.fs, url)["tensors"] if r["path"] == "tensors/bf16"
    )
    shard = f"{url}/{row['file']}"
    data = bytearray(s3_bucket.fs.cat_file(shard))
    data[row["offset"] + row["nbytes"] // 2] ^= 0x10
    s3_bucket.fs.pipe_file(shard, bytes(data))

    with pytest.raises(sv.CorruptCheckpointError) as caught:
        sv.load(url, storage_options=options)
    assert "tensors/bf16" in str(caught.value)
    report = sv.verify(url, storage_options=options)
    assert not report.ok
    assert any("tensors/bf16" in problem for problem in report.problems), report.problems


def test_a_save_never_touches_foreign_objects_in_its_prefix() -> None:
    """Like a non-empty foreign directory on disk: refused, and nothing of it is deleted."""

    fs = fsspec.filesystem("memory")
    fs.pipe("/foreign/ck/notes.txt", b"keep me")
    with pytest.raises(sv.CheckpointExistsError, match=r"notes\.txt"):
        sv.save({"a": np.ones(3)}, "memory://foreign/ck")
    with pytest.raises(sv.CheckpointExistsError):
        sv.save({"a": np.ones(3)}, "memory://foreign/ck", overwrite=True)
    assert fs.cat("/foreign/ck/notes.txt") == b"keep me"
    sv.save({"a": np.ones(3)}, "memory://foreign/ck2")
    fs.pipe("/foreign/ck2/notes.txt", b"added later")
    sv.save({"a": np.zeros(3)}, "memory://foreign/ck2", overwrite=True)
    assert fs.cat("/foreign/ck2/notes.txt") == b"added later", "overwrite removes only shards"
    assert sv.load("memory://foreign/ck2")["a"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.s3
def test_a_partial_load_fetches_only_its_subtrees_bytes(s3_bucket: S3Bucket) -> None:
    url = f"{s3_bucket.url}/run/ck"
    options = s3_bucket.storage_options
    gen = torch.Generator().manual_seed(9)
    state = {
        "model": {"w": torch.randn(1 << 18, generator=gen), "b": torch.randn(7, generator=gen)},
        "optimizer": {"m": torch.randn(4 << 20, generator=gen)},  # 16 MiB not to be fetched
        "step": 3,
    }
    sv.save(state, url, storage_options=options)
    with record_s3_calls() as log:
        model = sv.load(url, only="model", storage_options=options)
    assert torch.equal(model["w"], state["model"]["w"]) and torch.equal(
        model["b"], state["model"]["b"]
    )
    shard_gets = [c for c in log.of("GetObject") if not c.key.endswith(MANIFEST)]
    fetched = sum(c.content_length or 0 for c in shard_gets)
    wanted = (1 << 18) * 4 + 7 * 4
    assert wanted <= fetched <= wanted + (64 << 10), f"fetched {fetched} B for {wanted} B"
