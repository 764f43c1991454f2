"""Two tiers: a fast local run directory replicated to S3 (moto's server) in the background.

What must hold: every ``replicate_every``-th save and every preemption save is copied, committed
remotely with the manifest last, byte for byte what the local tier holds; each tier keeps its own
retention; a checkpoint being copied is never deleted locally meanwhile; ``restore`` picks the
newest valid checkpoint across both tiers (a new node with an empty local tier resumes from S3,
in the same run); a replication failure is raised by the next ``save`` / ``wait`` / ``close``
and never leaves a committed partial replica; a transient failure is retried.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import botocore.exceptions
import numpy as np
import pytest

import statevault as sv
from statevault.manager.naming import RUN_FILE
from statevault.manager.replication import copy_checkpoint
from statevault.storage import resolve
from tests.manager_helpers import small_state
from tests.s3_server import S3Bucket, has_manifest, objects_under, record_s3_calls

pytestmark = pytest.mark.s3


def _manager(
    local: Path, bucket: S3Bucket, every: int = 1, replica_max_to_keep: int = 3, **options: Any
) -> sv.CheckpointManager:
    replica = sv.Replica(
        f"{bucket.url}/run",
        every=every,
        max_to_keep=replica_max_to_keep,
        storage_options=bucket.storage_options,
    )
    return sv.CheckpointManager(local, replicate_to=replica, **options)


def _committed_on_s3(bucket: S3Bucket) -> list[int]:
    names = objects_under(bucket.fs, f"{bucket.url}/run")
    return sorted(int(n.split("/")[0][5:]) for n in names if n.endswith("/manifest.json"))


def test_every_kth_save_is_replicated_with_its_own_retention(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    local = tmp_path / "fast"
    with _manager(local, s3_bucket, max_to_keep=2, every=2, replica_max_to_keep=2) as m:
        for step in range(1, 7):
            m.save(step, small_state(step))
        m.wait()
        assert m.all_steps() == [5, 6]
        assert m.replica_steps() == [4, 6]
    assert _committed_on_s3(s3_bucket) == [4, 6]
    # The replica is the local checkpoint, byte for byte, manifest included.
    for name, size in objects_under(s3_bucket.fs, f"{s3_bucket.url}/run/step_000000006").items():
        local_bytes = (local / "step_000000006" / name).read_bytes()
        assert size == len(local_bytes)
        assert s3_bucket.fs.cat_file(f"{s3_bucket.url}/run/step_000000006/{name}") == local_bytes
    assert sv.verify(
        f"{s3_bucket.url}/run/step_000000006", storage_options=s3_bucket.storage_options
    ).ok


def test_new_node_with_an_empty_local_tier_resumes_from_s3(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    local = tmp_path / "node-a"
    with _manager(local, s3_bucket, max_to_keep=2, every=2) as mgr:
        run_id = mgr.run_id
        for step in range(1, 6):
            mgr.save(step, small_state(step))
    shutil.rmtree(local)  # the pod is rescheduled: its emptyDir is gone

    with _manager(tmp_path / "node-b", s3_bucket, max_to_keep=2, every=2) as mgr:
        assert mgr.all_steps() == []
        restored = mgr.restore()
        assert restored is not None
        assert (restored.step, restored.tier) == (4, "replica")
        assert np.array_equal(restored.state["w"], small_state(4)["w"])
        assert mgr.run_id == run_id, "the same run continues on the new node"
        for step in range(5, 9):
            mgr.save(step, small_state(step))
        mgr.wait()
        assert mgr.replica_steps() == [4, 6, 8]  # the replica keeps 3 (its default), same run
    record = json.loads(s3_bucket.fs.cat_file(f"{s3_bucket.url}/run/{RUN_FILE}"))
    assert record["sessions"][-1]["resumed_from"] == {
        "run_id": run_id,
        "step": 4,
        "tier": "replica",
    }


def test_restore_takes_the_newest_across_tiers_and_skips_damage(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    local = tmp_path / "fast"
    with _manager(local, s3_bucket, max_to_keep=None, every=2) as mgr:
        for step in range(1, 4):
            mgr.save(step, small_state(step))
    # local: 1 2 3; replica: 2
    with _manager(local, s3_bucket, max_to_keep=None, every=2) as mgr:
        restored = mgr.restore()
        assert restored is not None and (restored.step, restored.tier) == (3, "local")
    for step in (2, 3):  # damage the local copies of 2 and 3
        shard = next((local / f"step_{step:09d}").glob("data-*.safetensors"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    with _manager(local, s3_bucket, max_to_keep=None, every=2) as mgr:
        with pytest.warns(UserWarning, match="skipping damaged"):
            restored = mgr.restore()
        assert restored is not None and (restored.step, restored.tier) == (2, "replica")


def test_preemption_save_is_on_the_replica_before_save_returns(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    with _manager(tmp_path / "fast", s3_bucket, every=100, save_on_preemption=False) as mgr:
        mgr.save(1, small_state(1))
        mgr.request_preemption()
        assert mgr.should_save(2)
        mgr.save(2, small_state(2))
        assert mgr.preempted
        assert has_manifest(s3_bucket.fs, f"{s3_bucket.url}/run/step_000000002")
        assert not has_manifest(s3_bucket.fs, f"{s3_bucket.url}/run/step_000000001")


def _denied(operation: str, params: dict[str, Any], count: int) -> BaseException | None:
    if operation in ("PutObject", "UploadPart", "CreateMultipartUpload") and "step_" in str(
        params.get("Key")
    ):
        return botocore.exceptions.ClientError(
            {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, operation
        )
    return None


def test_a_replication_failure_is_raised_by_wait_and_commits_nothing(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    mgr = _manager(tmp_path / "fast", s3_bucket, every=1)
    try:
        with record_s3_calls(fail=_denied):
            mgr.save(1, small_state(1))
            with pytest.raises(sv.StorageError, match="access denied"):
                mgr.wait()
        assert not has_manifest(s3_bucket.fs, f"{s3_bucket.url}/run/step_000000001")
        assert mgr.all_steps() == [1], "the local checkpoint is unaffected"
        mgr.save(2, small_state(2))  # the next replication works again
        mgr.wait()
        assert mgr.replica_steps() == [2]
    finally:
        mgr.close()


def test_a_replication_failure_is_raised_by_the_next_save(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    mgr = _manager(tmp_path / "fast", s3_bucket, every=1)
    try:
        with record_s3_calls(fail=_denied):
            mgr.save(1, small_state(1))
            mgr._replicator._pool.submit(lambda: None).result()  # type: ignore[union-attr]
        with pytest.raises(sv.StorageError):
            mgr.save(2, small_state(2))
    finally:
        mgr.close()


def test_a_transient_error_during_the_copy_is_retried(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    failures: list[str] = []

    def flaky(operation: str, params: dict[str, Any], count: int) -> BaseException | None:
        key = str(params.get("Key"))
        if operation == "PutObject" and "data-" in key and len(failures) < 2:
            failures.append(key)
            return ConnectionResetError(104, "Connection reset by peer (injected)")
        return None

    with _manager(tmp_path / "fast", s3_bucket) as mgr:
        with record_s3_calls(fail=flaky) as log:
            mgr.save(1, small_state(1))
            mgr.wait()
        assert mgr.replica_steps() == [1]
    shard_puts = [c for c in log.of("PutObject") if "data-" in c.key]
    assert [c.failed is not None for c in shard_puts] == [True, True, False], shard_puts
    assert sv.verify(
        f"{s3_bucket.url}/run/step_000000001", storage_options=s3_bucket.storage_options
    ).ok


def test_copy_streams_in_bounded_parts_and_refuses_a_damaged_source(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    source = tmp_path / "ck"
    sv.save({"big": np.arange(6 << 20, dtype=np.float32)}, source)  # 24 MiB in one shard
    target = resolve(f"{s3_bucket.url}/copy/ck", s3_bucket.storage_options)
    with record_s3_calls() as log:
        assert copy_checkpoint(str(source), target, part_bytes=1 << 20)
    assert len(log.of("UploadPart")) >= 2, "a large file goes up as a multipart upload"
    # The manifest is the last object written.
    puts = [c for c in log.calls if c.operation in ("PutObject", "CompleteMultipartUpload")]
    assert puts[-1].key.endswith("manifest.json")
    assert (
        sv.load(target.url, storage_options=s3_bucket.storage_options)["big"][-1] == (6 << 20) - 1
    )
    assert not copy_checkpoint(str(source), target), "already replicated: nothing to do"

    shard = next(source.glob("data-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    other = resolve(f"{s3_bucket.url}/copy/other", s3_bucket.storage_options)
    with pytest.raises(sv.CorruptCheckpointError, match="not replicating"):
        copy_checkpoint(str(source), other)
    assert not objects_under(s3_bucket.fs, f"{s3_bucket.url}/copy/other")
