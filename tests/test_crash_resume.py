"""Crash and resume, end to end: examples/train_lm.py killed at random moments ends bit-identical.

A real training program (a small character-level transformer with dropout, AdamW, a warmup +
cosine schedule, a shuffled data order; see examples/train_lm.py) is SIGKILLed many times at
seeded random moments: at random steps, right after start (during startup and restore), and in
the middle of saves (after its ``saving N`` line, while the checkpoint is staged or written in the
background). It also gets one SIGTERM, after which it must save at its next step and exit 0.
After each interruption every committed checkpoint verifies, and each restart resumes through
``restore()`` from the newest one. At the end the loss curve (float.hex) and the parameters'
checksum equal those of an uninterrupted run, bit for bit.

Restarts are forked from a warm server that has imported torch and the program once, so a
restart costs milliseconds instead of a torch import; each child runs ``train_lm.main(argv)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import statevault as sv

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SEED = 20240611
STEPS = 64
SAVE_EVERY = 4
BALLAST_MIB = 4  # makes a save take long enough (tens of ms) for kills to land inside it
ARGS = ["--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--slow-save", str(BALLAST_MIB)]
LINE_TIMEOUT = 60.0  # seconds without any output before a test gives up on a child

SERVER = r"""
import os, sys, tempfile, threading, traceback
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import train_lm

# Warm up once (a fresh start and a resume) so that lazy imports and first-call setup are paid
# here, not in every child; afterwards no thread but this one may be alive, or fork is unsafe.
with tempfile.TemporaryDirectory() as scratch:
    for _ in range(2):
        train_lm.main(["--run-dir", scratch, "--steps", "2", "--save-every", "1"])
assert threading.active_count() == 1, threading.enumerate()

for line in sys.stdin:
    words = line.split(" ", 1)
    if words[0].strip() == "quit":
        break
    argv = words[1].split()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(1, f"PID {os.getpid()}\n".encode())
            code = train_lm.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    # A newline first: a child killed in the middle of a line must not swallow this one.
    os.write(1, f"\nEXIT {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
"""


class Server:
    """A warm process that forks one train_lm child per ``run`` and reports its lines."""

    def __init__(self, workdir: Path) -> None:
        script = workdir / "fork_server.py"
        script.write_text(SERVER)
        self.stderr_path = workdir / "server.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(EXAMPLES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            cwd=workdir,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = LINE_TIMEOUT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output for {timeout} s; {self.stderr_tail()}") from None
        if line is None:
            raise AssertionError(f"the fork server died; {self.stderr_tail()}")
        return line

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return "server stderr:\n" + self.stderr_path.read_text()[-3000:]

    def run(self, run_dir: Path) -> Child:
        assert self.proc.stdin is not None
        argv = ["--run-dir", str(run_dir), "--print-progress", *ARGS]
        self.proc.stdin.write("run " + " ".join(argv) + "\n")
        self.proc.stdin.flush()
        first = self.next_line()
        assert first.startswith("PID "), first
        return Child(self, int(first.split()[1]))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@dataclass
class Child:
    """One run of train_lm forked by the server; ``lines`` is what it printed so far."""

    server: Server
    pid: int
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def next_line(self, timeout: float = LINE_TIMEOUT) -> str | None:
        """The child's next line, or None once it has exited (then ``exit_code`` is set)."""
        if self.exit_code is not None:
            return None
        line = self.server.next_line(timeout)
        if line.startswith(f"EXIT {self.pid} "):
            self.exit_code = int(line.split()[2])
            return None
        self.lines.append(line)
        return line

    def wait_for(self, predicate: Callable[[str], bool]) -> str | None:
        """Read until a line satisfies ``predicate``; None if the child exited first."""
        while (line := self.next_line()) is not None:
            if predicate(line):
                return line
        return None

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it exited just now: finish() says how
            os.kill(self.pid, number)

    def finish(self) -> int:
        while self.next_line() is not None:
            pass
        assert self.exit_code is not None
        return self.exit_code

    def resumed_from(self) -> int | None:
        """The step the child said it resumed from; None for a fresh start."""
        line = next(x for x in self.lines if x.startswith(("resumed ", "fresh")))
        return None if line == "fresh" else int(line.split()[1])

    def begun_saves(self) -> list[int]:
        return [int(x.split()[1]) for x in self.lines if x.startswith("saving ")]

    def last(self, prefix: str) -> int | None:
        found = [int(x.split()[1]) for x in self.lines if x.startswith(prefix)]
        return found[-1] if found else None


def step_of(line: str) -> int | None:
    words = line.split()
    return int(words[1]) if len(words) >= 2 and words[0] == "step" else None


def committed_steps(run: Path) -> list[int]:
    return sorted(
        int(p.name.split("_")[1])
        for p in run.glob("step_*")
        if p.is_dir() and p.name[5:].isdigit() and (p / "manifest.json").exists()
    )


def leftover_temporaries(run: Path, step: int | None = None) -> list[str]:
    pattern = "step_*.tmp-*" if step is None else f"step_{step:09d}.tmp-*"
    return sorted(p.name for p in run.glob(pattern))


def read_final(run: Path) -> dict[str, object]:
    final: dict[str, object] = json.loads((run / "final.json").read_text())
    return final


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("crash-resume-server")
    running = Server(workdir)
    yield running
    running.close()


@pytest.fixture(scope="module")
def reference(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The uninterrupted run: its final.json (loss curve as float.hex, parameters' checksum)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    child = server.run(run)
    code = child.finish()
    assert code == 0, f"{child.lines[-5:]} {server.stderr_tail()}"
    assert child.resumed_from() is None
    final = read_final(run)
    assert final["steps"] == STEPS
    return final


@dataclass
class Interruption:
    kind: str  # what the plan asked for: "step", "mid-save", "early", "sigterm"
    last_step: int | None  # the last step the child reported finishing
    save_in_flight: int | None  # a save begun and not committed when the signal landed
    temporaries_left: list[str]  # what the save in flight left behind for the next start to sweep
    exit_code: int


def interrupt(child: Child, kind: str, rng: random.Random, run: Path) -> Interruption | None:
    """Drive ``child`` to the moment the plan names, signal it, and describe where it landed.

    Returns None when the child finished before that moment came.
    """
    if kind == "early":
        time.sleep(rng.uniform(0.0, 0.4))  # startup: lock, sweep, restore, first steps
    else:
        started = child.wait_for(lambda line: line.startswith(("resumed ", "fresh")))
        if started is None:
            return None
        resumed = child.resumed_from()
        base = -1 if resumed is None else resumed
        # Strike well before the end, so that the plan cannot run out of steps.
        target = min(base + rng.randint(1, 2 * SAVE_EVERY), STEPS - 4 * SAVE_EVERY)
        if kind == "mid-save":
            hit = child.wait_for(lambda x: x.startswith("saving ") and int(x.split()[1]) >= target)
            if hit is None:
                return None
            time.sleep(rng.uniform(0.0, 0.04))  # a save takes tens of ms: land inside it
        else:  # "step" or "sigterm"
            hit = child.wait_for(lambda x: (step_of(x) or -1) >= target)
            if hit is None:
                return None
            time.sleep(rng.uniform(0.0, 0.02))
    child.signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
    code = child.finish()
    if code == 0 and kind != "sigterm" and "finished" in child.lines:
        return None
    committed = committed_steps(run)
    begun = child.begun_saves()
    in_flight = begun[-1] if begun and begun[-1] not in committed else None
    left = [] if in_flight is None else leftover_temporaries(run, in_flight)
    return Interruption(kind, child.last("step "), in_flight, left, code)


def check_every_committed_checkpoint_verifies(run: Path) -> list[int]:
    steps = committed_steps(run)
    for step in steps:
        report = sv.verify(run / f"step_{step:09d}")
        assert report.ok, f"committed checkpoint {step} does not verify: {report.problems}"
    return steps


def test_random_kills_resume_bit_identically(
    server: Server, reference: dict[str, object], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    plan = ["mid-save"] * 6 + ["step"] * 6 + ["early"] * 3
    rng.shuffle(plan)
    plan.insert(rng.randint(2, len(plan) - 2), "sigterm")
    run = tmp_path / "run"
    interruptions: list[Interruption] = []
    newest_before: int | None = None
    for kind in plan:
        child = server.run(run)
        landed = interrupt(child, kind, rng, run)
        # Each restart resumed from the newest checkpoint committed before it started.
        if any(x.startswith(("resumed ", "fresh")) for x in child.lines):
            assert child.resumed_from() == newest_before, (kind, child.lines[:3])
        steps = committed_steps(run)
        newest_before = steps[-1] if steps else None
        if landed is None:  # finished before the planned moment: the plan is over
            break
        interruptions.append(landed)
        if kind == "sigterm":
            assert landed.exit_code == 0, f"SIGTERM: exit {landed.exit_code}: {child.lines[-5:]}"
            preempted = child.last("preempted ")
            assert preempted is not None, child.lines[-5:]
            assert preempted in committed_steps(run), "the preemption save is durable at exit"
            assert preempted == landed.last_step, "it saved the step it was at, then exited"
        else:
            assert landed.exit_code == -signal.SIGKILL, (kind, landed.exit_code)
        check_every_committed_checkpoint_verifies(run)

    child = server.run(run)  # the last restart runs to the end
    assert child.finish() == 0, child.lines[-5:]
    assert "finished" in child.lines
    assert child.resumed_from() == newest_before, (child.lines[:3], newest_before)
    check_every_committed_checkpoint_verifies(run)
    assert leftover_temporaries(run) == [], "a dead save's leftovers were not swept"

    kills = [i for i in interruptions if i.kind != "sigterm"]
    mid_save = [i for i in kills if i.save_in_flight is not None]
    summary = (
        f"{len(kills)} SIGKILLs ({len(mid_save)} mid-save, "
        f"{sum(bool(i.temporaries_left) for i in kills)} left a temporary directory to sweep) "
        f"+ {len(interruptions) - len(kills)} SIGTERM; landed at steps "
        f"{[i.last_step for i in interruptions]}; mid-save at saves "
        f"{[i.save_in_flight for i in mid_save]}; run directory: {sorted(os.listdir(run))}"
    )
    print(summary)
    assert len(kills) >= 12, summary
    assert len(mid_save) >= 3, summary
    assert any(i.kind == "sigterm" for i in interruptions), summary

    final = read_final(run)
    assert final["losses"] == reference["losses"], "the loss curve differs from the reference"
    assert final["parameters_sha256"] == reference["parameters_sha256"]


def flip_byte_in_largest_shard(checkpoint: Path, shared: bool = False) -> Path:
    """Flip a byte in place (as a bad sector would) in the largest shard the checkpoint wrote
    itself, or with ``shared``, in the largest it shares with other checkpoints (a hard link
    of an incremental save: the unchanging ballast)."""
    shards = [p for p in checkpoint.glob("*.safetensors") if (p.stat().st_nlink > 1) == shared]
    shard = max(shards, key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as handle:  # in place: every name of the inode sees it
        handle.seek(shard.stat().st_size // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0x10]))
    return shard


def killed_after_third_durable_save(server: Server, run: Path) -> list[int]:
    """Run the job until its third save is durable, SIGKILL it, and return the committed steps
    (each checked to verify)."""
    child = server.run(run)
    third = 3 * SAVE_EVERY
    reached = child.wait_for(lambda x: x.startswith("durable ") and int(x.split()[1]) >= third)
    assert reached is not None, child.lines[-5:]
    child.signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    return check_every_committed_checkpoint_verifies(run)


def test_corrupt_newest_checkpoint_falls_back_and_ends_bit_identical(
    server: Server, reference: dict[str, object], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    steps = killed_after_third_durable_save(server, run)
    assert len(steps) >= 2, steps
    newest, previous = steps[-1], steps[-2]
    newest_dir = run / f"step_{newest:09d}"
    flip_byte_in_largest_shard(newest_dir)
    assert not sv.verify(newest_dir).ok

    child = server.run(run)
    assert child.finish() == 0, child.lines[-5:]
    warnings = [x for x in child.lines if x.startswith("warning ")]
    assert any("skipping damaged checkpoint" in x and newest_dir.name in x for x in warnings), (
        child.lines[:5]
    )
    assert child.resumed_from() == previous
    # The damaged checkpoint was kept for inspection (moved aside when its step was saved again).
    assert list(run.glob(f"{newest_dir.name}.corrupt-*")), sorted(os.listdir(run))
    check_every_committed_checkpoint_verifies(run)

    final = read_final(run)
    assert final["losses"] == reference["losses"]
    assert final["parameters_sha256"] == reference["parameters_sha256"]


def test_a_damaged_shared_file_damages_every_checkpoint_sharing_it_and_resume_skips_them(
    server: Server, reference: dict[str, object], tmp_path: Path
) -> None:
    """The price of incremental saves (README "Incremental checkpoints"): a file shared by hard
    link is one file on disk, so damage to it damages every checkpoint that lists it. Resume
    skips them all, goes back to the newest checkpoint that does not share it (or starts afresh)
    and still ends bit-identical."""
    run = tmp_path / "run"
    steps = killed_after_third_durable_save(server, run)
    shard = flip_byte_in_largest_shard(run / f"step_{steps[-1]:09d}", shared=True)
    inode = shard.stat().st_ino
    damaged = [s for s in steps if inode in _inodes(run / f"step_{s:09d}")]
    assert len(damaged) >= 2, "the ballast is shared"
    for step in steps:
        assert sv.verify(run / f"step_{step:09d}").ok == (step not in damaged), step
    whole = [s for s in steps if s not in damaged]

    child = server.run(run)
    assert child.finish() == 0, child.lines[-5:]
    assert child.resumed_from() == (whole[-1] if whole else None)
    final = read_final(run)
    assert final["losses"] == reference["losses"]
    assert final["parameters_sha256"] == reference["parameters_sha256"]


def _inodes(checkpoint: Path) -> set[int]:
    return {p.stat().st_ino for p in checkpoint.glob("*.safetensors")}
