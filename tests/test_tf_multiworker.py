"""MultiWorkerMirroredStrategy with two worker processes on localhost: every worker takes part,
only the chief writes (and holds the run lock), nothing is left behind, every worker restores,
and SIGTERM on one worker leads to one coordinated save at the same step on all of them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")

import statevault as sv

WORKER = Path(__file__).with_name("tf_worker.py")
ROOT = WORKER.parent.parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_pair(run: Path, out: Path, sigterm_at: dict[int, int]) -> list[subprocess.Popen[str]]:
    """Both workers of one training job (TF_CONFIG with two free ports)."""
    out.mkdir()
    cluster = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps(config),
            "PYTHONPATH": str(ROOT / "src"),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        extra = [str(sigterm_at[index])] if index in sigterm_at else []
        command = [sys.executable, str(WORKER), str(run), str(out / f"w{index}.json"), *extra]
        processes.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    return processes


def finish_pair(processes: list[subprocess.Popen[str]], out: Path) -> list[dict[str, Any]]:
    try:
        errors = [p.communicate(timeout=180)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(processes, errors, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((out / f"w{i}.json").read_text()) for i in range(2)]


def sessions(run: Path) -> int:
    return len(json.loads((run / "run.json").read_text())["sessions"])


@pytest.mark.timeout(600)
def test_two_workers_save_on_the_chief_stop_together_and_resume(tmp_path: Path) -> None:
    run, straight = tmp_path / "run", tmp_path / "straight"  # SIGTERM on worker 1 after step 6
    # One job at a time: two jobs' collectives polling on two cores slow both down a lot.
    first = finish_pair(start_pair(run, tmp_path / "out1", {1: 6}), tmp_path / "out1")
    uninterrupted = finish_pair(start_pair(straight, tmp_path / "ref", {}), tmp_path / "ref")

    assert [w["chief"] for w in first] == [True, False]
    assert all(w["preempted"] and w["step"] == 6 for w in first)  # agreed at the same step
    assert first[0]["digest"] == first[1]["digest"]
    # Only the chief wrote: the committed checkpoints, its lock file and run.json (one session:
    # the other worker never opened a manager); no temporary directory of any worker is left.
    assert sorted(os.listdir(run)) == [
        ".statevault.lock",
        "run.json",
        "step_000000004",
        "step_000000006",
    ]
    assert sessions(run) == 1
    assert sorted(os.listdir(tmp_path)) == ["out1", "ref", "run", "straight"]
    assert sv.verify(run / "step_000000006").ok

    second = finish_pair(start_pair(run, tmp_path / "out2", sigterm_at={}), tmp_path / "out2")
    assert [w["restored"] for w in second] == [6, 6]  # every worker restored
    assert all(not w["preempted"] and w["step"] == 12 and w["iterations"] == 12 for w in second)
    assert sorted(p for p in os.listdir(run) if p.startswith("step_")) == [
        "step_000000006",
        "step_000000008",
        "step_000000012",
    ]
    assert sessions(run) == 2
    # The interrupted job ends exactly where an uninterrupted one ends, on both workers.
    assert {w["digest"] for w in second} == {w["digest"] for w in uninterrupted}
    assert len({w["digest"] for w in uninterrupted}) == 1
