"""The pieces of how a run ends (manager/closing.py), one at a time: a dropped manager is closed
by the next manager of its run, never by its finalizer; the announced wait says so and
abandons on its limit; a forked child neither waits for nor closes its parent's managers.
(The whole matrix of endings is tests/test_exit_matrix.py.)"""

from __future__ import annotations

import gc
import inspect
import io
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import statevault as sv
from statevault.manager import closing
from statevault.manager.naming import LOCK_FILE
from tests.manager_helpers import child_env, saved_step_of, small_state, step_dir


def test_a_dropped_manager_is_closed_by_the_next_one_of_its_run_not_by_its_finalizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    closed_in_finalizer: list[str] = []
    original_close = sv.CheckpointManager.close

    def close(self: sv.CheckpointManager) -> None:
        if any(frame.function == "__del__" for frame in inspect.stack()):
            closed_in_finalizer.append(self.directory)
        original_close(self)

    monkeypatch.setattr(sv.CheckpointManager, "close", close)
    mgr = sv.CheckpointManager(run, async_save=True)
    mgr.save(1, small_state(1))  # in flight when the program lets go of the manager
    del mgr
    gc.collect()
    assert closed_in_finalizer == []
    with sv.CheckpointManager(run) as again:  # not refused: the dropped one is closed first
        assert again.all_steps() == [1]
    assert saved_step_of(step_dir(run, 1)) == 1
    assert closed_in_finalizer == []


def test_the_announced_wait_says_so_after_a_second_and_abandons_at_its_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    abandoned: list[bool] = []
    started = time.monotonic()
    ended_by_itself = closing.wait_announced(
        lambda: False, "the copy to memory://x", lambda: abandoned.append(True), limit_s=1.3
    )
    elapsed = time.monotonic() - started
    assert not ended_by_itself and abandoned == [True]
    assert 1.3 <= elapsed < 3.0
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("statevault: waiting for the copy to memory://x to finish")
    assert "abandoning the copy to memory://x" in lines[1]
    quick = closing.wait_announced(lambda: True, "nothing", lambda: abandoned.append(False))
    assert quick and abandoned == [True]


def test_the_grace_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATEVAULT_EXIT_GRACE_S", "7.5")
    assert closing.exit_grace_s() == 7.5
    monkeypatch.setenv("STATEVAULT_EXIT_GRACE_S", "soon")
    assert closing.exit_grace_s() == closing.DEFAULT_GRACE_S


FORKING = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import statevault as sv

    mgr = sv.CheckpointManager(sys.argv[1], async_save=True)
    mgr.save(1, {"w": np.ones(4)})
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # the child ends normally: its exit hooks run
    _, status = os.waitpid(pid, 0)
    print("CHILD", status, flush=True)
    mgr.save(2, {"w": np.ones(4)})  # the parent still holds the run
    mgr.close()
    print("DONE", flush=True)
    """
)


def test_a_forked_child_neither_closes_nor_waits_for_its_parents_manager(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", FORKING, str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "CHILD 0" in result.stdout and "DONE" in result.stdout
    assert "waiting for" not in result.stderr
    with sv.CheckpointManager(run) as mgr:
        assert mgr.all_steps() == [1, 2]
    assert (run / LOCK_FILE).read_bytes() == b"", "released once, by the parent"
