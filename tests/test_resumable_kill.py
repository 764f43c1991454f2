"""Kill and resume with ``sv.resumable`` and ``CheckpointManager``: bit-identical batches.

tests/resumable_train.py (3 epochs, 2 DataLoader workers, random augmentation in the workers,
dropout) is SIGKILLed at 3 random steps and restarted each time (each run is forked from a warm
server: a restart costs milliseconds, not seconds of imports); every restart resumes through
``mgr.restore(into=state)``. Steps after the last checkpoint are trained again after a restart,
so the run's history is each step's last log line. That history (the keys of every batch, a
hash of its augmented values, the loss) and the final parameters must equal an uninterrupted
run's, bit for bit. The kill points are drawn at random for each run of the test; set
STATEVAULT_KILL_SEED to replay one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

SCRIPT = Path(__file__).with_name("resumable_train.py")
ROOT = SCRIPT.parent.parent
STEPS = 15  # 3 epochs of 5 batches

pytestmark = pytest.mark.timeout(300)


class Runs:
    """The program's runs, forked by one warm server (``resumable_train.py --serve``)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def start(self, name: str, pause: float) -> int:
        """Start a run; its pid."""
        work = self.work
        argv = [f"--run={work / name}", f"--log={work / f'{name}.log'}"]
        argv += [f"--out={work / f'{name}.safetensors'}", f"--pause={pause}"]
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(argv) + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline())

    def exit_code(self) -> int:
        """Wait for the run started last; its exit code (-9 once killed)."""
        assert self.server.stdout is not None
        return int(self.server.stdout.readline())

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=60)


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _history(log: Path) -> dict[int, str]:
    """Each step's last line: what the run that went on from there trained on."""
    return {int(line.split(" ", 1)[0]): line for line in _lines(log)}


def _kill_at(runs: Runs, pid: int, log: Path, step: int) -> None:
    """SIGKILL the run ``pid`` once its log reaches ``step`` (lines before it was started count
    too: a restart trains steps again from its checkpoint)."""
    seen = len(_lines(log))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        fresh = _lines(log)[seen:]
        if any(int(line.split(" ", 1)[0]) >= step for line in fresh):
            os.kill(pid, signal.SIGKILL)
            assert runs.exit_code() == -signal.SIGKILL
            return
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in 120 s")


def test_three_kills_resume_bit_identically(tmp_path: Path) -> None:
    seed = int(os.environ.get("STATEVAULT_KILL_SEED", random.randrange(10**6)))
    kills = sorted(random.Random(seed).sample(range(1, STEPS - 1), 3))
    note = f"(kills at steps {kills}; STATEVAULT_KILL_SEED={seed} replays them)"
    runs = Runs(tmp_path)
    try:
        runs.start("reference", pause=0.0)
        assert runs.exit_code() == 0
        log = tmp_path / "killed.log"
        for step in kills:
            _kill_at(runs, runs.start("killed", pause=0.05), log, step)
        runs.start("killed", pause=0.0)
        assert runs.exit_code() == 0, note
    finally:
        runs.close()
    assert len(_lines(log)) > STEPS, f"no step was trained twice: the kills missed {note}"
    assert _history(log) == _history(tmp_path / "reference.log"), note
    final = safetensors.torch.load_file(str(tmp_path / "killed.safetensors"))
    expected = safetensors.torch.load_file(str(tmp_path / "reference.safetensors"))
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), f"{name} differs {note}"
