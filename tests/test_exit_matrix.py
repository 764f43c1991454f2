"""Every way a process ends, as a matrix: entry point x store x ending (README "How a run ends").

Each case is a child process (tests/exit_child.py) that trains and saves, then ends: normally
without ``close()``, by an exception, by ``sys.exit``, or by SIGTERM, one SIGINT, two SIGINTs or
SIGKILL sent by the test while a save is in flight. For every case:

- the process ends within a bound: the save in flight (every shard write sleeps
  ``SLOW_S``) plus the exit grace, with room for a loaded machine;
- it ends with the exit code the ending implies, and no "Exception ignored" noise;
- every checkpoint it leaves listed verifies (nothing torn), and a new manager opening the run
  leaves no leftovers of statevault's behind;
- an ending that lets Python exit finishes the save in flight (and says so on stderr when that
  takes over a second); a second Ctrl-C abandons it cleanly (no temporary left).

The endings of one (entry, store) pair run side by side, to keep the matrix within a few
minutes on two cores; a failure lists every case that failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import statevault as sv
from statevault.manager.index import scan_run
from statevault.storage.location import resolve
from tests.manager_helpers import child_env

CHILD = Path(__file__).with_name("exit_child.py")
ENDINGS = ("normal", "exception", "exit", "sigterm", "sigint", "sigint2", "sigkill")
MANAGERS = ("sync", "async", "tiers", "dist")
GRACE_S = 10.0
SLACK_S = 40.0  # imports and a loaded two-core machine


@dataclass
class Case:
    entry: str
    store: str
    ending: str
    root: str  # the checkpoint root or run: a local path or URL
    local_dir: str  # the fast tier of a two-tier run
    workdir: Path
    ranks: list[subprocess.Popen[bytes]] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def slow_s(self) -> float:
        return 3.0 if self.entry in ("async", "tiers", "dist") else 0.5

    def out(self, rank: int = 0) -> str:
        return (self.workdir / f"out{rank}").read_text(errors="replace")

    def err(self, rank: int = 0) -> str:
        return (self.workdir / f"err{rank}").read_text(errors="replace")

    def describe(self) -> str:
        streams = "".join(
            f"\n--- rank {r} stdout:\n{self.out(r)[-1500:]}\n--- rank {r} stderr:\n"
            f"{self.err(r)[-3000:]}"
            for r in range(len(self.ranks))
        )
        return f"[{self.entry}/{self.store}/{self.ending}] codes {self.codes}{streams}"


def _start(case: Case, s3_options: dict[str, Any] | None) -> None:
    env = child_env()
    env["EXIT_SLOW_S"] = str(case.slow_s)
    env["STATEVAULT_EXIT_GRACE_S"] = str(GRACE_S)
    env["STATEVAULT_COLLECTIVE_TIMEOUT_S"] = "15"
    env["OMP_NUM_THREADS"] = "1"
    if s3_options is not None:
        env["EXIT_S3_OPTIONS"] = json.dumps(s3_options)
    ending = "signal" if case.ending.startswith("sig") else case.ending
    world = 2 if case.entry == "dist" else 1
    store = case.workdir / "rendezvous"  # a file, not a port: nothing else can take it
    for rank in range(world):
        rank_env = dict(env)
        if world > 1:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(world), EXIT_RENDEZVOUS=str(store))
        args = [sys.executable, str(CHILD), case.entry, case.store, ending, case.root]
        with (
            open(case.workdir / f"out{rank}", "wb") as out,
            open(case.workdir / f"err{rank}", "wb") as err,
        ):
            case.ranks.append(
                subprocess.Popen([*args, case.local_dir], stdout=out, stderr=err, env=rank_env)
            )


def _wait_for(case: Case, text: str, timeout: float, stream: str = "out") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        read = case.out if stream == "out" else case.err
        if all(text in read(r) for r in range(len(case.ranks))):
            return True
        if any(p.poll() is not None for p in case.ranks):
            return False
        time.sleep(0.05)
    return False


def _signal(case: Case) -> None:
    """Send the case's signal(s) once a save is in flight on every rank."""
    if not _wait_for(case, "READY", 90.0):
        polls = [p.poll() for p in case.ranks]
        raise AssertionError(
            f"the job never reached its loop (exit codes {polls}): {case.describe()}"
        )
    time.sleep(0.2)  # into the save in flight
    number = {
        "sigterm": signal.SIGTERM,
        "sigint": signal.SIGINT,
        "sigint2": signal.SIGINT,
        "sigkill": signal.SIGKILL,
    }[case.ending]
    # SIGTERM and SIGKILL hit one rank (a preempted or lost node), Ctrl-C the whole job.
    targets = case.ranks[-1:] if number != signal.SIGINT else case.ranks
    for proc in targets:
        proc.send_signal(number)
    if case.ending == "sigint2":
        # The second Ctrl-C arrives while exit waits for the save (a synchronous save has no
        # such wait: the first Ctrl-C already abandons it, and the second hits its cleanup).
        _wait_for(case, "waiting for", 10.0 + case.slow_s, stream="err")
        for proc in targets:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)


def _run(case: Case, s3_options: dict[str, Any] | None) -> Case:
    _start(case, s3_options)
    try:
        if case.ending.startswith("sig"):
            _signal(case)
        started = time.monotonic()
        bound = 4 * case.slow_s + GRACE_S + SLACK_S
        for proc in case.ranks:
            case.codes.append(proc.wait(timeout=max(1.0, bound - (time.monotonic() - started))))
        case.elapsed = time.monotonic() - started
    finally:
        for proc in case.ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return case


def _expected_codes(case: Case) -> list[int]:
    if case.ending == "normal":
        return [0] * len(case.ranks)
    if case.ending == "exception":
        return [1] * len(case.ranks)
    if case.ending == "exit":
        return [3] * len(case.ranks)
    if case.ending == "sigterm":
        # A manager turns SIGTERM into one last save and the job ends by itself.
        code = 0 if case.entry in MANAGERS else -signal.SIGTERM
        return [code] * len(case.ranks)
    if case.ending in ("sigint", "sigint2"):
        return [-signal.SIGINT] * len(case.ranks)
    # SIGKILL: the killed rank dies; a survivor learns it at its next collective and fails
    return [1, -signal.SIGKILL] if case.entry == "dist" else [-signal.SIGKILL]


def _steps(case: Case, word: str) -> list[int]:
    return [int(line.split()[1]) for line in case.out().splitlines() if line.startswith(word)]


def _committed(where: str, options: dict[str, Any] | None) -> list[int]:
    return [r.step for r in scan_run(resolve(where, options)).committed()]


def _problems(case: Case, s3_options: dict[str, Any] | None) -> list[str]:
    problems: list[str] = []
    expected = _expected_codes(case)
    if case.codes != expected:
        problems.append(f"exit codes {case.codes}, expected {expected}")
    for rank in range(len(case.ranks)):
        if "Exception ignored" in case.err(rank):
            problems.append(f"rank {rank}: 'Exception ignored' on stderr")
    if case.ending == "exception" and "RuntimeError: boom" not in case.err():
        problems.append("the exception is not on stderr")
    if case.store == "memory":
        problems += _memory_problems(case)
    elif case.entry == "save":
        problems += _save_problems(case, s3_options)
    elif case.entry == "load":
        if not sv.verify(f"{case.root}/ckpt", storage_options=s3_options).ok:
            problems.append("the loaded checkpoint no longer verifies")
    else:
        problems += _run_problems(case, s3_options)
    return problems


def _in_flight(case: Case) -> int | None:
    """The step whose save was in flight when the job ended, if exit is to finish it: the last
    one handed to an asynchronous save (a synchronous one is committed when it returns)."""
    saved = _steps(case, "SAVED")
    if not saved or case.ending not in ("normal", "exception", "exit", "sigterm", "sigint"):
        return None
    return saved[-1]


def _memory_problems(case: Case) -> list[str]:
    if case.entry not in MANAGERS or case.ending in ("sigkill", "sigint2"):
        return []  # nothing outlives the process (a killed one cannot report)
    lines = [line for line in case.out().splitlines() if line.startswith("VERIFIED")]
    if not lines:
        return ["no VERIFIED line: the exit hooks did not run to the end"]
    parts = lines[-1].split()
    good, total = parts[1].split("/")
    steps = parts[2] if len(parts) > 2 else ""
    problems = [] if good == total else [f"{lines[-1]}: a listed checkpoint does not verify"]
    step = _in_flight(case)
    if step is not None and str(step) not in steps.split(","):
        problems.append(f"the save in flight (step {step}) was not finished: {lines[-1]}")
    return problems


def _save_problems(case: Case, options: dict[str, Any] | None) -> list[str]:
    problems = []
    if not sv.verify(f"{case.root}/base", storage_options=options).ok:
        problems.append("the earlier checkpoint no longer verifies")
    ckpt = resolve(f"{case.root}/ckpt", options)
    committed = ckpt.storage.exists(ckpt.join("manifest.json").path)
    if committed and not sv.verify(ckpt.url, storage_options=options).ok:
        problems.append("the checkpoint at the target is torn")
    if case.store == "local" and case.ending in ("sigint", "sigint2"):
        leftovers = [n for n in os.listdir(case.root) if ".tmp-" in n]
        if leftovers:
            problems.append(f"an interrupted save left {leftovers}")
    return problems


def _run_problems(case: Case, options: dict[str, Any] | None) -> list[str]:
    problems = []
    fast = case.local_dir if case.entry == "tiers" else case.root
    fast_options = None if case.entry == "tiers" else options
    listed = _committed(fast, fast_options)
    for step in listed:
        path = f"{fast.rstrip('/')}/step_{step:09d}"
        if not sv.verify(path, storage_options=fast_options).ok:
            problems.append(f"listed step {step} does not verify")
    step = _in_flight(case)
    if step is not None and step not in listed:
        problems.append(f"the save in flight (step {step}) was not finished: {listed}")
    exits = case.ending in ("normal", "exception", "exit") and case.entry in ("async", "tiers")
    if exits and "waiting for the save" not in case.err():
        problems.append("exit waited for the save without saying so")
    saved = _steps(case, "SAVED")
    if case.ending == "sigint2" and case.entry != "sync":
        if "abandoning" not in case.err():
            problems.append("the second Ctrl-C did not abandon the save in flight")
        if saved and saved[-1] in listed:
            problems.append(f"the abandoned step {saved[-1]} is committed")
    if case.store == "local" and case.ending in ("sigint", "sigint2") and case.entry != "dist":
        leftovers = [n for n in os.listdir(fast) if ".tmp-" in n]
        if leftovers:
            problems.append(f"an interrupted save left {leftovers}")
    if case.entry == "tiers":
        for step in _committed(case.root, options):
            path = f"{case.root}/step_{step:09d}"
            if not sv.verify(path, storage_options=options).ok:
                problems.append(f"replica step {step} does not verify")
    problems += _reopen_problems(fast, fast_options)
    return problems


def _reopen_problems(run: str, options: dict[str, Any] | None) -> list[str]:
    """A new manager sweeps what the dead one left; afterwards nothing of statevault's is
    left over, and the newest checkpoint restores."""
    quick_sweep = sv.RunOptions(stale_after_seconds=0)
    with sv.CheckpointManager(run, storage_options=options, options=quick_sweep) as mgr:
        steps = mgr.all_steps()
        restored = mgr.restore()
    scan = scan_run(resolve(run, options))
    problems = []
    leftovers = scan.temporaries + [
        str(r.step) for r in scan.records.values() if r.status != "committed"
    ]
    if leftovers:
        problems.append(f"after a new manager opened the run: leftovers {leftovers}")
    if steps and (restored is None or restored.step != steps[-1]):
        problems.append(f"the newest checkpoint {steps[-1]} did not restore")
    return problems


PAIRS = [
    (e, s) for e in ("save", "load", "sync", "async", "tiers") for s in ("local", "s3", "memory")
]
PAIRS += [("dist", "local"), ("dist", "s3")]


@pytest.mark.parametrize(("entry", "store"), PAIRS, ids=[f"{e}-{s}" for e, s in PAIRS])
def test_every_way_a_process_ends(
    entry: str, store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s3_options = None
    base = ""
    if store == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        s3_options, base = bucket.storage_options, bucket.url
    elif store == "memory":
        base = f"memory://exit-{uuid.uuid4().hex[:8]}"
    cases = []
    for ending in ENDINGS:
        workdir = tmp_path / ending
        workdir.mkdir()
        root = str(workdir / "root") if store == "local" else f"{base}/{ending}"
        cases.append(Case(entry, store, ending, root, str(workdir / "fast"), workdir))
    parallel = 2 if entry == "dist" else 4
    with ThreadPoolExecutor(parallel) as pool:
        done = list(pool.map(lambda c: _run(c, s3_options), cases))
    failures = []
    for case in done:
        problems = _problems(case, s3_options)
        if problems:
            failures.append("; ".join(problems) + "\n" + case.describe())
    assert not failures, "\n\n".join(failures)
