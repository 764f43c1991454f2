"""One writer per run: the OS lock (released by the kernel when its holder dies) and the
heartbeat lease that decides on filesystems without a shared flock (manager/lock.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

import statevault as sv
import statevault.manager.lock as lock_module
from statevault.manager.lock import RunLock
from statevault.manager.naming import LOCK_FILE, RUN_FILE
from tests.manager_helpers import Child, save_steps

HOLDER_SCRIPT = """
import sys, time
import statevault as sv

mgr = sv.CheckpointManager(sys.argv[1])
print("READY", flush=True)
time.sleep(120)
"""


def _no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem whose flock is not available (some NFS, CIFS and Lustre mounts)."""

    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("statevault.manager.lock.fcntl.flock", flock)


def _write_holder(run: Path, **record: Any) -> bytes:
    run.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record).encode()
    (run / LOCK_FILE).write_bytes(data)
    return data


def _holder(run: Path) -> dict[str, Any]:
    """The holder record; retried, as a live holder rewrites it (truncate, then write)."""
    for _ in range(50):
        try:
            record: dict[str, Any] = json.loads((run / LOCK_FILE).read_bytes())
            return record
        except ValueError:
            time.sleep(0.005)
    raise AssertionError(f"no holder record in {run / LOCK_FILE}")


def test_a_second_manager_in_the_same_process_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run) as mgr:
        save_steps(mgr, [1])
        with pytest.raises(sv.RunLockedError, match=f"pid {os.getpid()}") as info:
            sv.CheckpointManager(run)
        assert str(run) in str(info.value)
        save_steps(mgr, [2])  # the holder is unaffected
        assert mgr.all_steps() == [1, 2]


def test_a_live_manager_in_another_process_blocks_and_sigkill_frees_the_run_at_once(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    script = tmp_path / "hold.py"
    script.write_text(HOLDER_SCRIPT)
    child = Child(script, str(run), cwd=tmp_path)
    try:
        child.expect("READY")
        with pytest.raises(sv.RunLockedError, match=f"pid {child.pid} on"):
            sv.CheckpointManager(run)
        assert _holder(run)["pid"] == child.pid
        child.proc.kill()
        assert child.proc.wait(timeout=10) == -9
    finally:
        child.kill()

    assert _holder(run)["pid"] == child.pid, "a SIGKILLed holder leaves its record behind"
    started = time.perf_counter()
    mgr = sv.CheckpointManager(run)
    elapsed = time.perf_counter() - started
    try:
        assert elapsed < 1.0, f"opening after the holder died took {elapsed:.2f} s"
        assert _holder(run)["pid"] == os.getpid()
        save_steps(mgr, [1])
    finally:
        mgr.close()


def test_another_hosts_fresh_heartbeat_without_flock_means_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    record = _write_holder(
        run,
        host="node-elsewhere-17",
        pid=4242,
        started=time.time() - 30,
        heartbeat=time.time() - 1,
        lease_seconds=60,
    )
    _no_flock(monkeypatch)
    with pytest.raises(sv.RunLockedError, match="pid 4242 on node-elsewhere-17"):
        sv.CheckpointManager(run)
    assert (run / LOCK_FILE).read_bytes() == record, "the live holder's record is untouched"
    assert not (run / RUN_FILE).exists(), "a refused manager writes nothing into the run"


def test_another_hosts_old_heartbeat_without_flock_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    lease = lock_module.DEFAULT_LEASE_SECONDS
    _write_holder(
        run,
        host="node-elsewhere-17",
        pid=4242,
        started=time.time() - 3 * lease,
        heartbeat=time.time() - lease - 5,
        lease_seconds=lease,
    )
    _no_flock(monkeypatch)
    with sv.CheckpointManager(run) as mgr:
        holder = _holder(run)
        assert holder["host"] == socket.gethostname()
        assert holder["pid"] == os.getpid()
        save_steps(mgr, [1])


def test_lease_is_measured_against_lease_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    _no_flock(monkeypatch)
    path = str(run / LOCK_FILE)
    _write_holder(run, host="node-elsewhere-17", pid=4242, heartbeat=time.time() - 20)
    with pytest.raises(sv.RunLockedError):
        RunLock(path, lease_seconds=30).acquire()
    taker = RunLock(path, lease_seconds=10)
    taker.acquire()
    try:
        assert _holder(run)["pid"] == os.getpid()
    finally:
        taker.release()


def test_a_dead_pid_on_this_host_without_flock_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    run = tmp_path / "run"
    _write_holder(run, host=socket.gethostname(), pid=dead_pid, heartbeat=time.time())
    _no_flock(monkeypatch)
    with sv.CheckpointManager(run):
        assert _holder(run)["pid"] == os.getpid()


def test_a_live_pid_on_this_host_without_flock_means_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    _write_holder(run, host=socket.gethostname(), pid=os.getppid(), heartbeat=time.time())
    _no_flock(monkeypatch)
    with pytest.raises(sv.RunLockedError, match=f"pid {os.getppid()}"):
        sv.CheckpointManager(run)


def test_a_second_manager_in_the_same_process_is_refused_without_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem without flock the heartbeat record is the only protection; a second
    manager of the same process must still be refused, as it is where flock works."""
    run = tmp_path / "run"
    _no_flock(monkeypatch)
    with sv.CheckpointManager(run) as mgr:
        save_steps(mgr, [1])
        second = None
        try:
            with pytest.raises(sv.RunLockedError):
                second = sv.CheckpointManager(run)
        finally:
            if second is not None:
                second.close()


def test_the_holder_refreshes_its_heartbeat(tmp_path: Path) -> None:
    path = str(tmp_path / LOCK_FILE)
    lock = RunLock(path, lease_seconds=0.2)
    lock.acquire()
    try:
        first = _holder(tmp_path)
        assert first["pid"] == os.getpid() and first["lease_seconds"] == 0.2
        beats = {first["heartbeat"]}
        deadline = time.monotonic() + 2.0
        while len(beats) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
            beats.add(_holder(tmp_path)["heartbeat"])
        assert len(beats) >= 3, "the heartbeat is rewritten every lease/4"
        assert max(beats) > first["heartbeat"]
        assert _holder(tmp_path)["started"] == first["started"]
    finally:
        lock.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == b""
    time.sleep(0.1)
    assert (tmp_path / LOCK_FILE).read_bytes() == b"", "no heartbeat after release"


FORKING_HOLDER_SCRIPT = """
import multiprocessing, sys, time
import statevault as sv


def worker() -> None:  # a DataLoader worker, or any multiprocessing fork: outlives its parent
    time.sleep(120)


mgr = sv.CheckpointManager(sys.argv[1])
child = multiprocessing.get_context("fork").Process(target=worker, daemon=False)
child.start()
print("READY", child.pid, flush=True)
time.sleep(120)
"""


def test_a_forked_child_does_not_keep_the_lock_of_its_sigkilled_parent(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = tmp_path / "hold_and_fork.py"
    script.write_text(FORKING_HOLDER_SCRIPT)
    holder = Child(script, str(run), cwd=tmp_path)
    worker_pid = None
    try:
        worker_pid = int(holder.expect("READY").split()[1])
        holder.proc.kill()
        assert holder.proc.wait(timeout=10) == -9
        assert lock_module.pid_alive(worker_pid), "the forked worker outlives its parent"
        mgr = sv.CheckpointManager(run)  # the restarted job: the run is free at once
        try:
            save_steps(mgr, [1])
            assert mgr.all_steps() == [1]
        finally:
            mgr.close()
    finally:
        holder.kill()
        if worker_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGKILL)
