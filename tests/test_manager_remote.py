"""CheckpointManager on object stores: an S3 run directory (moto's server) and memory://.

What must hold, exactly as on a local disk: retention deletes old checkpoints (the manifest
first) only after a newer one is committed; a new manager resumes from the newest valid
checkpoint and skips a damaged one; run.json records the sessions; annotations count for best-N
retention; a manifest-less prefix is never loaded and is swept only once it is old (it may be a
save in flight); the run lease admits one writer and is taken over when its holder is dead.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import numpy as np
import pytest

import statevault as sv
from statevault.checkpoint.commit import marker_bytes
from statevault.manager.naming import LOCK_FILE, RUN_FILE
from tests.manager_helpers import small_state
from tests.s3_server import S3Bucket, has_manifest, objects_under, record_s3_calls

pytestmark = pytest.mark.s3


def _save(mgr: sv.CheckpointManager, steps: list[int]) -> None:
    for step in steps:
        assert mgr.save(step, small_state(step), metrics={"loss": 1.0 / (step + 1)})


def _prefixes(bucket: S3Bucket, run: str) -> set[str]:
    return {name.split("/", 1)[0] for name in objects_under(bucket.fs, run)}


def test_retention_and_resume_on_s3(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/runs/exp1"
    options = s3_bucket.storage_options
    with sv.CheckpointManager(run, max_to_keep=2, storage_options=options) as mgr:
        assert mgr.directory == run
        assert mgr.restore() is None
        _save(mgr, [10, 20, 30, 40])
        assert mgr.all_steps() == [30, 40]
        assert mgr.path(40) == f"{run}/step_000000040"
        assert _prefixes(s3_bucket, run) == {
            "step_000000030",
            "step_000000040",
            RUN_FILE,
            LOCK_FILE,
        }
    assert LOCK_FILE not in _prefixes(s3_bucket, run), "close() releases the lease"

    with sv.CheckpointManager(run, max_to_keep=2, storage_options=options) as mgr:
        assert mgr.all_steps() == [30, 40]
        restored = mgr.restore()
        assert restored is not None and restored.step == 40
        assert np.array_equal(restored.state["w"], small_state(40)["w"])
        _save(mgr, [50])
        assert mgr.all_steps() == [40, 50]
    record = json.loads(s3_bucket.fs.cat_file(f"{run}/{RUN_FILE}"))
    assert len(record["sessions"]) == 2
    assert record["sessions"][1]["resumed_from"]["step"] == 40


def test_retention_deletes_the_manifest_first(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    with sv.CheckpointManager(run, max_to_keep=1, storage_options=s3_bucket.storage_options) as m:
        _save(m, [1])
        with record_s3_calls() as log:
            _save(m, [2])
    deletes = [c for c in log.calls if c.operation in ("DeleteObject", "DeleteObjects")]
    assert deletes, log.operations()
    assert deletes[0].operation == "DeleteObject"
    assert deletes[0].key.endswith("step_000000001/manifest.json")
    assert _prefixes(s3_bucket, run) == {"step_000000002", RUN_FILE}


def test_restore_skips_a_damaged_checkpoint_on_s3(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    with sv.CheckpointManager(run, max_to_keep=None, storage_options=options) as mgr:
        _save(mgr, [1, 2])
    shard = next(n for n in objects_under(s3_bucket.fs, f"{run}/step_000000002") if "data" in n)
    key = f"{run}/step_000000002/{shard}"
    data = bytearray(s3_bucket.fs.cat_file(key))
    data[-1] ^= 0x40
    s3_bucket.fs.pipe_file(key, bytes(data))
    with sv.CheckpointManager(run, max_to_keep=None, storage_options=options) as mgr:
        with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_000000002"):
            restored = mgr.restore()
        assert restored is not None and restored.step == 1
    assert has_manifest(s3_bucket.fs, f"{run}/step_000000002"), "damaged ones are kept"


def test_manifest_less_prefix_is_swept_only_once_old(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    with sv.CheckpointManager(run, storage_options=options) as mgr:
        _save(mgr, [1])
    # A save of step 2 in flight (or dead): its marker, shards, no manifest.
    orphan = f"{run}/step_000000002/data-r00000-00000-deadbeef.safetensors"
    s3_bucket.fs.pipe_file(f"{run}/step_000000002/.statevault-save-deadbeef", marker_bytes())
    s3_bucket.fs.pipe_file(orphan, b"x" * 100)
    with sv.CheckpointManager(run, storage_options=options) as mgr:
        assert mgr.all_steps() == [1]
        restored = mgr.restore()
        assert restored is not None and restored.step == 1
    assert s3_bucket.fs.exists(orphan), "a young manifest-less prefix may be a save in flight"
    quick_sweep = sv.RunOptions(stale_after_seconds=0.0)
    with sv.CheckpointManager(run, storage_options=options, options=quick_sweep) as mgr:
        assert mgr.all_steps() == [1]
    assert not s3_bucket.fs.exists(orphan), "an old one is swept"


def test_a_save_over_a_dead_saves_leftovers_commits_cleanly(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    dead = f"{run}/step_000000005"
    s3_bucket.fs.pipe_file(f"{dead}/.statevault-save-0badf00d", marker_bytes())
    s3_bucket.fs.pipe_file(f"{dead}/data-r00000-00000-0badf00d.safetensors", b"x")
    with sv.CheckpointManager(run, storage_options=options) as mgr:
        _save(mgr, [5])
        assert mgr.all_steps() == [5]
    names = objects_under(s3_bucket.fs, f"{run}/step_000000005")
    assert "manifest.json" in names
    assert not [n for n in names if "0badf00d" in n], "the dead save's shard was removed"
    assert sv.verify(f"{run}/step_000000005", storage_options=options).ok


def test_one_writer_per_s3_run(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    with (
        sv.CheckpointManager(run, storage_options=options),
        pytest.raises(sv.RunLockedError, match="pid"),
    ):
        sv.CheckpointManager(run, storage_options=options)
    with sv.CheckpointManager(run, storage_options=options) as mgr:  # released on close
        _save(mgr, [1])


def _plant_lease(bucket: S3Bucket, run: str, host: str, pid: int, age_s: float) -> None:
    record = {
        "owner": uuid.uuid4().hex,
        "host": host,
        "pid": pid,
        "started": time.time() - age_s,
        "heartbeat": time.time() - age_s,
        "lease_seconds": 60.0,
    }
    bucket.fs.pipe_file(f"{run}/{LOCK_FILE}", json.dumps(record).encode())


def _lease_host(bucket: S3Bucket, run: str) -> str | None:
    try:
        record = json.loads(bucket.fs.cat_file(f"{run}/{LOCK_FILE}"))
    except FileNotFoundError:
        return None
    return record.get("host") if isinstance(record, dict) else None


def test_lease_of_a_live_holder_elsewhere_refuses_a_stale_one_is_taken_over(
    s3_bucket: S3Bucket,
) -> None:
    run = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    _plant_lease(s3_bucket, run, "other-node", 4242, age_s=5)
    with pytest.raises(sv.RunLockedError, match="pid 4242 on other-node"):
        sv.CheckpointManager(run, storage_options=options)
    _plant_lease(s3_bucket, run, "other-node", 4242, age_s=120)  # no heartbeat for 2 min
    with sv.CheckpointManager(run, storage_options=options) as mgr:
        _save(mgr, [1])
        holder = json.loads(s3_bucket.fs.cat_file(f"{run}/{LOCK_FILE}"))
        assert holder["pid"] == os.getpid()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    _plant_lease(s3_bucket, run, socket.gethostname(), dead, age_s=0)
    with sv.CheckpointManager(run, storage_options=s3_bucket.storage_options) as mgr:
        _save(mgr, [1])


def test_a_lost_lease_stops_the_next_save(s3_bucket: S3Bucket) -> None:
    run = f"{s3_bucket.url}/run"
    with sv.CheckpointManager(
        run, storage_options=s3_bucket.storage_options, options=sv.RunOptions(lease_seconds=0.4)
    ) as mgr:
        _save(mgr, [1])
        # Someone takes the run over. A taker holds the run only if its record is still there
        # when it reads it back (lease.py); a heartbeat of ours that read our record just before
        # the plant overwrites it, so the taker writes again, as a real one retries.
        deadline = time.monotonic() + 20  # a heartbeat notices (late on a loaded machine)
        while getattr(mgr._dir.lock, "lost", None) is None and time.monotonic() < deadline:
            if _lease_host(s3_bucket, run) != "other-node":
                _plant_lease(s3_bucket, run, "other-node", 7, age_s=0)
            time.sleep(0.05)
        with pytest.raises(sv.RunLockedError, match="lost the lease"):
            mgr.save(2, small_state(2))
        assert not has_manifest(s3_bucket.fs, f"{run}/step_000000002")


@pytest.fixture
def memory_run(memory_root: str) -> str:
    return f"{memory_root}/run"


def test_memory_run_best_retention_with_annotations(memory_run: str) -> None:
    with sv.CheckpointManager(memory_run, max_to_keep=1, best_metric="val") as mgr:
        for step, val in [(1, 0.3), (2, 0.5), (3, 0.4)]:
            mgr.save(step, small_state(step), metrics={"val": val})
        assert mgr.all_steps() == [1, 3]
        mgr.annotate(3, {"val": 0.1})
        assert mgr.all_steps() == [3] and mgr.best_step() == 3
    with sv.CheckpointManager(memory_run, max_to_keep=1, best_metric="val") as mgr:
        assert mgr.metadata(3)["metrics"]["val"] == 0.1  # the annotation was stored
        restored = mgr.restore()
        assert restored is not None and restored.step == 3


def test_fork_from_an_s3_run_into_a_local_run(s3_bucket: S3Bucket, tmp_path: object) -> None:
    base = f"{s3_bucket.url}/base"
    options = s3_bucket.storage_options
    with sv.CheckpointManager(base, storage_options=options) as mgr:
        _save(mgr, [7])
    with sv.CheckpointManager(os.path.join(str(tmp_path), "ft")) as mgr:
        restored = mgr.restore(source=base, source_storage_options=options)
        assert restored is not None and restored.step == 7 and restored.tier == "source"


def test_async_saves_and_preemption_on_a_memory_run(memory_run: str) -> None:
    with sv.CheckpointManager(
        memory_run, max_to_keep=2, async_save=True, save_on_preemption=False
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, small_state(step))
        mgr.request_preemption()
        assert mgr.should_save(4)
        mgr.save(4, small_state(4))
        assert mgr.preempted
        assert mgr.all_steps() == [3, 4]
    with sv.CheckpointManager(memory_run) as mgr:
        restored = mgr.restore()
        assert restored is not None and restored.step == 4
        assert np.array_equal(restored.state["w"], small_state(4)["w"])


def test_lease_without_conditional_create_reads_its_record_back(
    memory_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the store has no conditional create, the lease is written, then read back after
    settle_seconds: a competitor whose record landed meanwhile wins, and this one is refused."""
    from statevault.manager import lease as lease_module
    from statevault.storage.fsspec_storage import FsspecStorage
    from statevault.storage.location import resolve

    def no_conditional_create(self: object, path: str, data: bytes) -> bool:
        raise NotImplementedError

    monkeypatch.setattr(FsspecStorage, "create_exclusive", no_conditional_create)
    where = resolve(f"{memory_run}/{LOCK_FILE}")
    competitor = {"owner": "other", "host": "other-node", "pid": 1, "heartbeat": time.time()}

    def competitor_writes_meanwhile(seconds: float) -> None:
        where.storage.write_bytes(where.path, json.dumps(competitor).encode())

    monkeypatch.setattr(lease_module.time, "sleep", competitor_writes_meanwhile)
    with pytest.raises(sv.RunLockedError, match="pid 1 on other-node"):
        lease_module.LeaseLock(where).acquire()

    monkeypatch.setattr(lease_module.time, "sleep", lambda seconds: None)
    where.storage.remove_file(where.path)
    lock = lease_module.LeaseLock(where)
    lock.acquire()  # alone: its own record is read back
    try:
        assert (
            json.loads(where.storage.read_bytes(where.path, 0, where.storage.size(where.path)))[
                "owner"
            ]
            == lock.owner
        )
    finally:
        lock.release()
    assert not where.storage.exists(where.path)


def test_a_file_url_takes_the_local_fast_path(tmp_path: object) -> None:
    run = os.path.join(str(tmp_path), "run")
    with sv.CheckpointManager(f"file://{run}", max_to_keep=1) as mgr:
        assert mgr.directory == run and mgr.path(1) == os.path.join(run, "step_000000001")
        _save(mgr, [1, 2])
        assert sorted(os.listdir(run)) == [LOCK_FILE, RUN_FILE, "step_000000002"]
        with pytest.raises(sv.RunLockedError):  # the flock of a local run
            sv.CheckpointManager(run)
