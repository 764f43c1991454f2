"""Preemption: SIGTERM (Kubernetes) and SIGUSR1 (SLURM) set a flag and do no I/O; the next
should_save is True, the loop saves that step durably and exits cleanly; the program's own
handler is chained, and put back on close (manager/preemption.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest

import statevault as sv
from tests.manager_helpers import Child, step_dir

# The documented loop, with the program's own handler installed before the manager. The handler
# records what it saw: the loop's step and the run directory's entries at that instant (after
# statevault's handler ran, since statevault chains to it). Break only after a save, so that a
# signal arriving between should_save and the check can never skip the preemption save.
TRAIN_SCRIPT = """
import json, os, signal, sys, time
import numpy as np
import statevault as sv

run, marker = sys.argv[1], sys.argv[2]
current = {"step": 0}

def on_signal(number, frame):
    entries = sorted(os.listdir(run))
    with open(marker, "w") as handle:
        json.dump({"signal": number, "step": current["step"], "entries": entries}, handle)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGUSR1, on_signal)
mgr = sv.CheckpointManager(run, save_interval_steps=1000)
print("ENTRIES " + json.dumps(sorted(os.listdir(run))), flush=True)
saved = []
for step in range(1, 2001):
    current["step"] = step
    if mgr.should_save(step):
        mgr.save(step, {"w": np.full(256, step, dtype=np.int64), "step": step})
        saved.append(step)
        if mgr.preempted:
            break
    if step == 1:
        print("IN_LOOP", flush=True)
    time.sleep(0.005)
else:
    print("NEVER_PREEMPTED", flush=True)
    sys.exit(3)
mgr.close()
print("SAVED " + json.dumps(saved), flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_makes_the_loop_save_its_next_step_and_exit_cleanly(
    tmp_path: Path, signum: signal.Signals
) -> None:
    run, marker = tmp_path / "run", tmp_path / "marker.json"
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    child = Child(script, str(run), str(marker), cwd=tmp_path)
    try:
        entries_before = json.loads(child.expect("ENTRIES ").split(" ", 1)[1])
        child.expect("IN_LOOP")  # step 1's should_save has returned False
        child.proc.send_signal(signum)
        code, lines = child.finish(timeout=60)
    finally:
        child.kill()
    assert code == 0, f"exit {code}: {lines} {child.stderr()}"
    saved = json.loads(next(line for line in lines if line.startswith("SAVED ")).split(" ", 1)[1])

    assert len(saved) == 1, "exactly one save: the preemption save"
    step = saved[0]
    assert step > 1, "the save happened in the loop after the signal, not in the handler"
    seen = json.loads(marker.read_text())
    assert seen["signal"] == signum, "the program's own handler was chained"
    assert step in (seen["step"], seen["step"] + 1), "saved at the next should_save"
    assert seen["entries"] == entries_before, "statevault's handler wrote nothing"

    ck = step_dir(run, step)
    assert sv.verify(ck).ok
    state = sv.load(ck)
    assert state["step"] == step
    assert np.array_equal(state["w"], np.full(256, step, dtype=np.int64))
    with sv.CheckpointManager(run) as mgr:
        assert mgr.all_steps() == [step]
        restored = mgr.restore()
        assert restored is not None and restored.step == step


class OwnHandler:
    """The program's own signal handler: records the signals it was called with."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, number: int, frame: FrameType | None) -> None:
        self.calls.append(number)


@pytest.fixture
def own_handler() -> Iterator[OwnHandler]:
    """Install a Python handler for both signals (as a program would); restore afterwards."""
    handler = OwnHandler()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s in saved:
        signal.signal(s, handler)
    try:
        yield handler
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


def test_close_puts_the_previous_handlers_back(tmp_path: Path, own_handler: OwnHandler) -> None:
    mine = own_handler
    mgr = sv.CheckpointManager(tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) is not mine
    assert signal.getsignal(signal.SIGUSR1) is not mine
    mgr.close()
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGUSR1) is mine


def test_handlers_are_not_installed_when_save_on_preemption_is_off(
    tmp_path: Path, own_handler: OwnHandler
) -> None:
    mine = own_handler
    with sv.CheckpointManager(tmp_path / "run", save_on_preemption=False):
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGUSR1) is mine


def test_a_signal_in_process_sets_the_flag_and_chains(
    tmp_path: Path, own_handler: OwnHandler
) -> None:
    import os

    with sv.CheckpointManager(tmp_path / "run", save_interval_steps=1000) as mgr:
        assert not mgr.should_save(7)
        os.kill(os.getpid(), signal.SIGUSR1)  # runs the Python handler before the next line
        assert own_handler.calls == [signal.SIGUSR1]
        assert mgr.should_save(7)
        assert mgr.save(7, {"w": np.arange(4)})
        assert mgr.preempted


def test_request_preemption_makes_should_save_true_until_saved(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, save_interval_steps=1000) as mgr:
        assert not mgr.preempted
        assert not mgr.should_save(7)
        mgr.request_preemption()
        assert mgr.should_save(7)
        assert mgr.save(7, {"w": np.arange(4)})
        assert mgr.all_steps() == [7], "a preemption save is durable when save returns"
        assert sv.verify(step_dir(run, 7)).ok
        assert mgr.preempted, "the flag stays: the program should exit"
        assert not mgr.should_save(8), "one preemption save; then the usual cadence"
        assert mgr.should_save(1000)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_preemption_save_is_committed_when_save_returns(tmp_path: Path, async_save: bool) -> None:
    run = tmp_path / "run"
    mgr = sv.CheckpointManager(run, save_interval_steps=1000, async_save=async_save)
    try:
        mgr.request_preemption()
        assert mgr.save(3, {"w": np.arange(1 << 16)})
        assert (step_dir(run, 3) / "manifest.json").is_file()
        assert sv.verify(step_dir(run, 3)).ok
    finally:
        mgr.close()


def test_the_documented_loop_never_exits_without_the_preemption_save(tmp_path: Path) -> None:
    """The loop of the manager's docstring and the README::

        if mgr.should_save(step): mgr.save(...)
        if mgr.preempted: break

    A signal may land after should_save(step) returned False and before the check (here made
    deterministic with request_preemption at that point). The loop must not exit unsaved."""
    run = tmp_path / "run"
    with sv.CheckpointManager(run, save_interval_steps=1000) as mgr:
        exited_at = None
        for step in range(1, 10):
            if mgr.should_save(step):
                mgr.save(step, {"w": np.full(4, step)})
            if step == 3:
                mgr.request_preemption()  # the signal handler runs here
            if mgr.preempted:
                exited_at = step
                break
        assert exited_at is not None
        assert mgr.all_steps(), f"the loop exited at step {exited_at} without a preemption save"


def test_sigterm_kills_again_once_managers_closed_out_of_order(tmp_path: Path) -> None:
    """Two managers closed in the order they were opened: the default SIGTERM is back."""
    code = (
        "import os, signal, time, statevault as sv\n"
        f"a = sv.CheckpointManager({str(tmp_path / 'a')!r})\n"
        f"b = sv.CheckpointManager({str(tmp_path / 'b')!r})\n"
        "a.close(); b.close()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('survived')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
    assert "survived" not in result.stdout
