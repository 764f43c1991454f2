"""Crash safety: a save killed at any instant never leaves a loadable partial checkpoint.

The SIGKILL loop forks savers from a warm server process (tests/workloads.py ``crash-server``)
and kills them at seeded random instants, most of them a few milliseconds after a save began.
After every kill it checks, from the outside, everything the commit protocol promises:

- every path that ``sv.load`` accepts holds exactly one complete state the saver meant to write
  there (each state is a function of a counter stored inside it, recomputed here and compared
  exactly), and ``sv.verify`` passes on it;
- the path saved over with ``overwrite=True`` holds the previous or the new state, never nothing
  and never a mixture, from the moment it was first committed;
- a save that returned is committed; temporaries (``*.tmp-*``) may remain but never load.

Faults injected in-process (a failing write or fsync at every possible call) must leave the
previous checkpoint intact, raise the OSError to the caller and leave no garbage behind.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
import statevault.storage.local
from statevault.checkpoint import commit as commit_module
from statevault.errors import CheckpointExistsError, CheckpointNotFoundError
from tests import workloads

WORKLOADS = Path(__file__).with_name("workloads.py")
KILLS = 80  # kill points tried (at least MIN_KILLS, within TIME_BUDGET_S)
MIN_KILLS = 30
TIME_BUDGET_S = 25.0
KEEP_NEW = 2  # verified single-save checkpoints kept on disk (older ones are removed)


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Exact equality of nested states: types, dtypes, shapes and every byte."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), where
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}/{i}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# ---------------------------------------------------------------------------------------------
# The SIGKILL loop
# ---------------------------------------------------------------------------------------------


class CrashServer:
    """The fork server of tests/workloads.py and a thread that timestamps its output lines."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKLOADS), "crash-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self.child: int | None = None  # the saver now running, if any
        self.lines: queue.Queue[tuple[float, list[str]]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.perf_counter(), line.split()))
        self.lines.put((time.perf_counter(), ["EOF"]))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 30.0) -> tuple[float, list[str]]:
        stamp, words = self.lines.get(timeout=timeout)
        if words[0] in ("EOF", "ERROR"):
            raise AssertionError(f"crash server: {' '.join(words)}")
        return stamp, words

    def close(self) -> None:
        if self.child is not None:  # a test failed before killing its saver
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SaveLog:
    """What the savers said they were doing, across every child."""

    def __init__(self) -> None:
        self.intended: dict[str, set[int]] = {}  # name -> counters ever started there
        self.done: dict[str, int] = {}  # name -> last counter whose save returned
        self.in_flight: tuple[int, str] | None = None  # started, not (known to be) returned
        self.next_counter = 0
        self.durations: list[float] = []
        self.ever_committed: set[str] = set()
        self.outcomes: collections.Counter[str] = collections.Counter()  # of killed saves

    def record(self, words: list[str]) -> None:
        kind, counter, name = words[0], int(words[1]), words[2]
        if kind == "START":
            self.intended.setdefault(name, set()).add(counter)
            self.in_flight = (counter, name)
            self.next_counter = counter + 1
        else:
            self.done[name] = counter
            self.in_flight = None
            self.durations.append(float(words[3]))


def run_one_child(server: CrashServer, run_dir: Path, log: SaveLog, rng: random.Random) -> bool:
    """Start a saver, kill it at a random instant, wait until it is dead.

    Returns whether the kill landed while a save was in flight (started, not returned).
    """
    server.send(f"run {run_dir} {log.next_counter}")
    _, words = server.next()
    assert words[0] == "PID", words
    pid = server.child = int(words[1])
    typical = statistics.median(log.durations) if log.durations else 0.02
    if rng.random() < 0.15:  # anywhere: while preparing a state, between saves, during startup
        deadline = time.perf_counter() + rng.uniform(0.0, 4 * typical)
        skip_starts = None
    else:  # a few milliseconds into the n-th save of this child
        deadline = None
        skip_starts = rng.randrange(3)
    delay = rng.uniform(0.0, 1.3 * typical)
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            stamp, words = server.next(timeout=30.0 if timeout is None else timeout)
        except queue.Empty:
            break  # the random deadline passed
        log.record(words)
        if words[0] == "START" and skip_starts is not None:
            if skip_starts == 0:
                deadline = stamp + delay
                skip_starts = None
            else:
                skip_starts -= 1
        if deadline is not None and time.perf_counter() >= deadline:
            break
    os.kill(pid, signal.SIGKILL)
    while True:  # everything the child said before it died, then its death
        _, words = server.next()
        if words[0] == "REAPED":
            assert int(words[1]) == pid
            server.child = None
            break
        log.record(words)
    return log.in_flight is not None


def check_run_dir(run_dir: Path, log: SaveLog) -> list[str]:
    """Every invariant of the commit protocol, as seen after a kill; returns violations."""
    problems: list[str] = []
    for entry in sorted(os.listdir(run_dir)):
        path = run_dir / entry
        if commit_module.is_temporary(entry):
            try:
                sv.load(path)
            except CheckpointNotFoundError:
                pass
            except Exception as exc:  # must be *not found*, not merely unreadable
                problems.append(f"temporary {entry}: load raised {type(exc).__name__}: {exc}")
            else:
                problems.append(f"temporary {entry} loads as a checkpoint")
            shutil.rmtree(path)  # what the manager's sweep does
            continue
        if entry not in log.intended:
            problems.append(f"{entry}: a directory nobody meant to write")
            continue
        problems += check_path(path, entry, log)
    if log.in_flight is not None and not (run_dir / log.in_flight[1]).exists():
        log.outcomes["killed before commit (new path)"] += 1
    for name in set(log.done) | log.ever_committed:
        if not (run_dir / name).exists():
            problems.append(f"{name}: committed once, now missing")
    return problems


@functools.lru_cache(maxsize=8)
def expected_crash_state(counter: int) -> dict[str, Any]:
    return workloads.crash_state(counter)


def check_path(path: Path, name: str, log: SaveLog) -> list[str]:
    allowed = set()
    if name in log.done:
        allowed.add(log.done[name])
    in_flight = log.in_flight is not None and log.in_flight[1] == name
    if log.in_flight is not None and in_flight:
        allowed.add(log.in_flight[0])
    try:
        loaded = sv.load(path)
    except CheckpointNotFoundError:
        if name in log.done or name in log.ever_committed:
            return [f"{name}: committed before, not loadable now"]
        return []  # a save to a new path killed before its commit: nothing there yet
    except Exception as exc:
        return [f"{name}: load raised {type(exc).__name__}: {exc}"]
    counter = loaded.get("counter")
    if counter not in allowed:
        return [f"{name}: holds counter {counter}, expected one of {sorted(allowed)}"]
    try:
        assert_same(dict(loaded), expected_crash_state(counter), name)
    except AssertionError as exc:
        return [f"{name}: holds a damaged state of counter {counter}: {exc}"]
    report = sv.verify(path)
    if not report.ok:
        return [f"{name}: verify failed: {report.problems}"]
    if log.in_flight is not None and in_flight:
        kind = "overwrite" if name == workloads.OVERWRITTEN else "new path"
        committed = counter == log.in_flight[0]
        log.outcomes[f"killed {'after' if committed else 'before'} commit ({kind})"] += 1
    log.ever_committed.add(name)
    log.done[name] = counter  # what the next save over this path replaces
    return []


def prune_new_checkpoints(run_dir: Path, log: SaveLog) -> None:
    """Remove old verified single-save checkpoints so the disk use stays bounded."""
    names = sorted(n for n in log.ever_committed if n != workloads.OVERWRITTEN)
    for name in names[:-KEEP_NEW]:
        shutil.rmtree(run_dir / name)
        log.ever_committed.discard(name)
        log.done.pop(name, None)
        log.intended.pop(name, None)


@pytest.fixture
def crash_server(tmp_path: Path) -> Iterator[CrashServer]:
    server = CrashServer(tmp_path)
    try:
        yield server
    finally:
        server.close()


def test_sigkill_at_random_instants_never_leaves_a_partial_checkpoint(
    tmp_path: Path, crash_server: CrashServer
) -> None:
    rng = random.Random(20240611)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = SaveLog()
    problems: list[str] = []
    kills = mid_save = 0
    started = time.perf_counter()
    while kills < KILLS:
        elapsed = time.perf_counter() - started
        if (elapsed > TIME_BUDGET_S and kills >= MIN_KILLS) or elapsed > 3 * TIME_BUDGET_S:
            break
        try:
            during_save = run_one_child(crash_server, run_dir, log, rng)
        except AssertionError as exc:  # the saver failed: report it with what came before
            problems.append(f"kill {kills + 1}: {exc}")
            break
        kills += 1
        mid_save += during_save
        found = check_run_dir(run_dir, log)
        problems += [f"kill {kills}: {p}" for p in found]
        log.in_flight = None  # the killed save is over; its result (if any) was checked
        if not found:
            prune_new_checkpoints(run_dir, log)
    elapsed = time.perf_counter() - started
    print(
        f"\ncrash loop: {kills} kills in {elapsed:.1f} s, {mid_save} during a save, "
        f"{log.next_counter} saves started, median save {statistics.median(log.durations):.4f} s; "
        f"{dict(sorted(log.outcomes.items()))}"
    )
    assert not problems, "\n".join(problems)
    assert kills >= MIN_KILLS
    assert mid_save >= kills // 2, f"only {mid_save} of {kills} kills landed during a save"
    assert workloads.OVERWRITTEN in log.ever_committed


def test_killed_between_exchange_and_cleanup_leaves_no_loadable_temporary(
    tmp_path: Path,
) -> None:
    """Die right after renameat2(RENAME_EXCHANGE) swapped the old checkpoint to the tmp name.

    At that instant ``<name>.tmp-<id>`` holds the *old* checkpoint, manifest included, until
    remove_tree unlinks it. A crash there must not leave a temporary that ``sv.load`` accepts.
    """
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(WORKLOADS.parent)!r})
import statevault as sv, statevault.checkpoint.commit as commit
import workloads
sv.save(workloads.crash_state(0), "ckpt")
def die(path):
    os.kill(os.getpid(), signal.SIGKILL)
commit.LocalStorage.remove_tree = lambda self, path: die(path)
sv.save(workloads.crash_state(2), "ckpt", overwrite=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_same(dict(sv.load(tmp_path / "ckpt")), workloads.crash_state(2))
    temporaries = [p for p in tmp_path.iterdir() if commit_module.is_temporary(p.name)]
    assert temporaries, "expected the swapped-out old checkpoint under the temporary name"
    for path in temporaries:
        with pytest.raises(CheckpointNotFoundError):
            sv.load(path)


def test_temporary_with_complete_manifest_is_not_loadable(tmp_path: Path) -> None:
    """A save killed after its manifest was written but before the rename (during fsync)."""
    sv.save({"x": torch.arange(4)}, tmp_path / "ckpt")
    tmp = tmp_path / "ckpt.tmp-0123456789ab"
    shutil.copytree(tmp_path / "ckpt", tmp)
    shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(CheckpointNotFoundError):
        sv.load(tmp)
    with pytest.raises(CheckpointNotFoundError):
        sv.verify(tmp)


def test_saving_under_a_temporary_name_is_refused(tmp_path: Path) -> None:
    """A name containing ``.tmp-`` is reserved for temporaries (FORMAT.md section 1): a checkpoint
    saved there could never be loaded (and a sweep would delete it), so save must refuse it."""
    target = tmp_path / "ckpt.tmp-0123456789ab"
    with pytest.raises(sv.CheckpointError, match=r"\.tmp-"):
        sv.save({"x": torch.arange(4)}, target)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def small_state(counter: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(counter)
    return {
        "counter": counter,
        "a": torch.randn(64, 64, generator=generator),
        "b": torch.randn(1000, generator=generator).half(),
        "c": np.arange(counter, counter + 300, dtype=np.float64),
    }


def test_overwrite_false_onto_existing_checkpoint_raises_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    sv.save(small_state(1), path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        sv.save(small_state(2), path)
    with pytest.raises(CheckpointExistsError):
        sv.save(small_state(2), str(path), overwrite=False)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert_same(dict(sv.load(path)), small_state(1))
    assert sv.verify(path).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_empty_foreign_directory_is_never_written_over(tmp_path: Path, overwrite: bool) -> None:
    foreign = tmp_path / "results"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("precious")
    (foreign / "sub" / "model.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointExistsError, match="not a statevault checkpoint"):
        sv.save(small_state(1), foreign, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "precious"
    assert (foreign / "sub" / "model.bin").read_bytes() == b"\x00" * 100
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointExistsError):
        sv.save(small_state(1), a_file, overwrite=overwrite)
    assert a_file.read_text() == "x"


def test_empty_directory_is_a_valid_target(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    sv.save(small_state(3), tmp_path / "ckpt")
    assert_same(dict(sv.load(tmp_path / "ckpt")), small_state(3))


# ---------------------------------------------------------------------------------------------
# Fault injection: a failing write or fsync at every call of a save
# ---------------------------------------------------------------------------------------------


class Faults:
    """Counts calls of a patched function and raises OSError on the ``fail_at``-th one.

    Also records whether the failure came after the commit point (the rename or exchange that
    makes the new checkpoint visible), where the new checkpoint may legitimately be in place.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls = 0
        self.fail_at = 0
        self.committed = False
        self.failed_after_commit: bool | None = None
        real_rename, real_exchange = os.rename, commit_module._exchange

        def rename(src: Any, dst: Any) -> None:
            real_rename(src, dst)
            names = os.path.basename(os.fspath(src)), os.path.basename(os.fspath(dst))
            if commit_module.is_temporary(names[0]) and not commit_module.is_temporary(names[1]):
                self.committed = True

        def exchange(a: str, b: str) -> bool:
            done = real_exchange(a, b)
            self.committed = self.committed or done
            return done

        monkeypatch.setattr(os, "rename", rename)  # as commit.py calls it
        monkeypatch.setattr(commit_module, "_exchange", exchange)

    def wrap(self, owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def faulty(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.fail_at:
                self.failed_after_commit = self.committed
                raise OSError(28, "injected fault: No space left on device")
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, faulty)

    def arm(self, fail_at: int) -> None:
        self.calls, self.fail_at, self.committed = 0, fail_at, False
        self.failed_after_commit = None


def count_calls(faults: Faults, action: Any) -> int:
    faults.arm(0)
    action()
    return faults.calls


@pytest.mark.parametrize(
    "target",
    [
        pytest.param((statevault.storage.local.LocalWriteHandle, "write"), id="write"),
        pytest.param((os, "fsync"), id="fsync"),
    ],
)
def test_failed_save_keeps_previous_checkpoint_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: tuple[Any, str]
) -> None:
    path = tmp_path / "ckpt"
    sv.save(small_state(0), path)
    faults = Faults(monkeypatch)
    faults.wrap(*target)
    total = count_calls(faults, lambda: sv.save(small_state(1), path, overwrite=True))
    assert total >= 2, f"a save made only {total} {target[1]} calls: the patch missed"
    current = 1
    for fail_at in range(1, total + 1):
        new = current + 1
        faults.arm(fail_at)
        with pytest.raises(OSError, match="injected fault"):
            sv.save(small_state(new), path, overwrite=True)
        assert faults.failed_after_commit is not None
        # Before the commit point the old checkpoint must be untouched; after it (only an fsync
        # of the parent directory or the cleanup of the old one can fail there) the new one is in
        # place. Either way: complete, loadable, verified; no temporaries, nothing else.
        if faults.failed_after_commit:
            assert target[1] == "fsync"
            current = new
        faults.arm(0)
        assert_same(dict(sv.load(path)), small_state(current), f"fault at call {fail_at}")
        assert sv.verify(path).ok
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], f"call {fail_at}"
    # And a fault in a save to a *new* path commits nothing (or, after the commit point, all).
    total = count_calls(faults, lambda: sv.save(small_state(100), tmp_path / "probe"))
    shutil.rmtree(tmp_path / "probe")
    for fail_at in range(1, total + 1):
        faults.arm(fail_at)
        fresh = tmp_path / f"fresh{fail_at}"
        with pytest.raises(OSError, match="injected fault"):
            sv.save(small_state(100), fresh)
        after_commit = faults.failed_after_commit
        faults.arm(0)
        if after_commit:
            assert target[1] == "fsync"
            assert_same(dict(sv.load(fresh)), small_state(100))
            shutil.rmtree(fresh)
        else:
            assert not fresh.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], f"call {fail_at}"
