"""CheckpointManager: save/restore, queries, cadence, fallback past damaged checkpoints, sweeping
of dead saves, run metadata and lineage, lifecycle (issue 3)."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.checkpoint.commit import marker_bytes
from statevault.manager.naming import LOCK_FILE, RUN_FILE
from tests.manager_helpers import (
    DAMAGE,
    committed_on_disk,
    dirs_on_disk,
    save_steps,
    saved_step_of,
    small_state,
    snapshot,
    step_dir,
)


def read_run(run: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((run / RUN_FILE).read_text())
    return record


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr("statevault.manager.manager.time.monotonic", fake)
    yield fake


# ---- save / restore ---------------------------------------------------------------------------


def test_restore_on_an_empty_directory_returns_none(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "fresh") as mgr:
        assert mgr.restore() is None
        assert mgr.all_steps() == []
        assert mgr.latest_step() is None
        assert mgr.best_step() is None
    with sv.CheckpointManager(tmp_path / "fresh") as mgr:
        assert mgr.restore(into={"w": torch.zeros(3)}) is None


def _training_objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), float(np.random.rand()), random.random()


def test_save_restore_round_trip_of_the_whole_training_state(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, optimizer, scheduler = _training_objects(0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    plain = {"epoch": 3, "name": "exp-\u03b1", "history": [0.5, 0.25], "ids": {1: "a"}, "t": (1, 2)}
    with sv.CheckpointManager(run) as mgr:
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        assert mgr.save(5, {**state, "rng": sv.RNGState(), **plain}, metrics={"loss": 0.25})
    expected_draws = _draws()

    fresh_model, fresh_opt, fresh_sched = _training_objects(99)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    with sv.CheckpointManager(run) as mgr:
        into = {
            "model": fresh_model,
            "optimizer": fresh_opt,
            "scheduler": fresh_sched,
            "rng": sv.RNGState(),
        }
        r = mgr.restore(into=into)
    assert r is not None
    assert r.step == 5
    assert r.path == str(step_dir(run, 5))
    assert _draws() == expected_draws, "RNG streams continue as if never stopped"
    for a, b in zip(fresh_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for p_fresh, p_old in zip(fresh_model.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[p_fresh][key], optimizer.state[p_old][key])
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_sched.state_dict() == scheduler.state_dict()
    for key, value in plain.items():
        assert r.state[key] == value and type(r.state[key]) is type(value)


def test_queries_latest_all_best_path_and_metadata(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=5, best_metric="loss") as mgr:
        for step, loss in ((10, 0.9), (20, 0.2), (30, 0.4)):
            assert mgr.save(
                step, small_state(step), metrics={"loss": loss}, metadata={"note": f"s{step}"}
            )
        assert mgr.all_steps() == [10, 20, 30]
        assert mgr.latest_step() == 30
        assert mgr.best_step() == 20
        assert mgr.path(20) == str(run / "step_000000020")
        meta = mgr.metadata(20)
    assert meta["step"] == 20
    assert meta["metadata"] == {"note": "s20"}
    assert meta["metrics"] == {"loss": 0.2}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["created"])
    for key in ("prepare_s", "stage_s", "write_s", "total_s", "bytes"):
        assert key in meta["save"], key
    assert meta["save"]["bytes"] == small_state(20)["w"].nbytes
    assert meta["run_id"] == read_run(run)["run_id"]
    with sv.CheckpointManager(run, max_to_keep=5, best_metric="loss") as mgr:
        assert mgr.metadata(20) == meta, "a new manager reads the same from disk"
        with pytest.raises(sv.CheckpointError, match="step 15"):
            mgr.metadata(15)


# ---- cadence ----------------------------------------------------------------------------------


def test_should_save_by_steps(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "run", save_interval_steps=10) as mgr:
        assert [s for s in range(0, 35) if mgr.should_save(s)] == [0, 10, 20, 30]


def test_should_save_by_seconds(tmp_path: Path, clock: FakeClock) -> None:
    with sv.CheckpointManager(tmp_path / "run", save_interval_seconds=30) as mgr:
        assert not mgr.should_save(1)
        clock.now += 29.9
        assert not mgr.should_save(2)
        clock.now += 0.1
        assert mgr.should_save(3)
        assert mgr.save(3, small_state(3))
        assert not mgr.should_save(4), "the interval restarts at each save"
        clock.now += 30
        assert mgr.should_save(5)


def test_should_save_by_steps_or_seconds(tmp_path: Path, clock: FakeClock) -> None:
    with sv.CheckpointManager(
        tmp_path / "run", save_interval_steps=10, save_interval_seconds=60
    ) as mgr:
        assert mgr.should_save(10)
        assert not mgr.should_save(11)
        clock.now += 60
        assert mgr.should_save(13), "time alone is enough"
        assert mgr.save(13, small_state(13))
        assert not mgr.should_save(14)
        assert mgr.should_save(20), "steps alone are enough"


def test_should_save_without_interval_is_always_true(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "run") as mgr:
        assert all(mgr.should_save(s) for s in (0, 1, 7, 12345))


def test_should_save_is_false_for_a_step_already_saved(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, save_interval_steps=5) as mgr:
        assert mgr.save(5, small_state(5))
        assert not mgr.should_save(5)
        assert not mgr.save(5, small_state(5)), "not due again"
    with sv.CheckpointManager(run, save_interval_steps=5) as mgr:
        assert not mgr.should_save(5)
        assert mgr.should_save(10)


def test_save_when_not_due_returns_false_and_force_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, save_interval_steps=100) as mgr:
        assert mgr.save(7, small_state(7)) is False
        assert dirs_on_disk(run) == []
        assert mgr.all_steps() == []
        assert mgr.save(7, small_state(7), force=True) is True
        assert mgr.all_steps() == [7]
    assert saved_step_of(step_dir(run, 7)) == 7


# ---- fallback past damaged checkpoints -------------------------------------------------------


def _three_steps(run: Path) -> None:
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2, 3])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_skips_a_damaged_newest_checkpoint_with_a_warning(
    tmp_path: Path, damage: str
) -> None:
    run = tmp_path / "run"
    _three_steps(run)
    newest = step_dir(run, 3)
    DAMAGE[damage](newest)
    assert not sv.verify(newest).ok
    damaged = snapshot(newest)

    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        with pytest.warns(UserWarning, match=re.escape(str(newest))):
            r = mgr.restore()
        assert r is not None and r.step == 2
        assert r.state["step"] == 2
        assert np.array_equal(r.state["w"], small_state(2)["w"])
        assert mgr.latest_step() == 2
        assert {c.step: c.status for c in mgr.checkpoints()}[3] == "corrupt"
        with pytest.raises(sv.CorruptCheckpointError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr.restore(step=3)
    assert snapshot(newest) == damaged, "a damaged checkpoint is kept for inspection"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_saving_at_a_damaged_step_moves_it_aside(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    _three_steps(run)
    DAMAGE[damage](step_dir(run, 3))
    damaged = snapshot(step_dir(run, 3))

    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = mgr.restore()
        assert r is not None and r.step == 2
        assert mgr.should_save(3)
        with pytest.warns(UserWarning, match="aside"):
            assert mgr.save(3, small_state(3))
        assert mgr.all_steps() == [1, 2, 3]
    assert sv.verify(step_dir(run, 3)).ok
    assert saved_step_of(step_dir(run, 3)) == 3
    aside = [p for p in run.iterdir() if p.name.startswith("step_000000003.corrupt-")]
    assert len(aside) == 1
    assert snapshot(aside[0]) == damaged, "moved, not deleted or rewritten"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [1, 2, 3]


def test_stale_temporaries_are_swept_when_a_manager_opens(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _three_steps(run)
    for name in ("step_000000004.tmp-abc123", "step_000000002.tmp-0123456789ab"):
        (run / name).mkdir()
        (run / name / ".statevault-save").write_bytes(marker_bytes())  # a dead save's: ours
        (run / name / "data-r00000-00000.safetensors").write_bytes(b"\0" * 100)
    (run / "step_000000006.tmp-0123456789ab").mkdir()  # killed between mkdir and marker
    (run / "step_000000007.tmp-0123456789ab").mkdir()  # killed between the marker's creation
    (run / "step_000000007.tmp-0123456789ab" / ".statevault-save").touch()  # and its write
    (run / "notes.tmp-abc123").write_text("not a temporary of ours")
    (run / "step_000000005.tmp-zzz").mkdir()  # not a name statevault writes

    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [1, 2, 3]
    assert not (run / "step_000000004.tmp-abc123").exists()
    assert not (run / "step_000000002.tmp-0123456789ab").exists()
    assert not (run / "step_000000006.tmp-0123456789ab").exists()
    assert not (run / "step_000000007.tmp-0123456789ab").exists()
    assert (run / "notes.tmp-abc123").read_text() == "not a temporary of ours"
    assert (run / "step_000000005.tmp-zzz").is_dir()
    assert committed_on_disk(run) == [1, 2, 3]


def test_a_temporary_named_like_ours_without_a_marker_is_left_alone_with_a_warning(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    _three_steps(run)
    foreign = run / "step_000000004.tmp-abc123"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"another tool's bytes")
    with (
        pytest.warns(UserWarning, match="step_000000004.tmp-abc123: not written by statevault"),
        sv.CheckpointManager(run, max_to_keep=None) as mgr,
    ):
        assert mgr.all_steps() == [1, 2, 3]
    assert (foreign / "weights.bin").read_bytes() == b"another tool's bytes"


def test_an_empty_marker_proves_nothing_beside_other_files(tmp_path: Path) -> None:
    """Only a directory holding nothing but an empty marker is a save killed mid-marker; an
    empty marker beside anything else is not proof enough to delete it."""
    run = tmp_path / "run"
    _three_steps(run)
    foreign = run / "step_000000004.tmp-abc123"
    foreign.mkdir()
    (foreign / ".statevault-save").touch()
    (foreign / "weights.bin").write_bytes(b"another tool's bytes")
    with (
        pytest.warns(UserWarning, match="step_000000004.tmp-abc123: not written by statevault"),
        sv.CheckpointManager(run, max_to_keep=None) as mgr,
    ):
        assert mgr.all_steps() == [1, 2, 3]
    assert (foreign / "weights.bin").read_bytes() == b"another tool's bytes"


def test_sweep_never_deletes_the_only_copy_of_a_committed_checkpoint(tmp_path: Path) -> None:
    """commit._replace without renameat2 renames the old checkpoint to <name>.tmp-<id>-old and
    then the new one from <name>.tmp-<id> to <name>; a crash between the two renames leaves both
    complete copies under temporary names and nothing at <name> (commit.py documents that the
    old one is left there). The sweep must not destroy the step."""
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2])
        assert mgr.save(3, small_state(3))
    shutil.copytree(step_dir(run, 3), run / "step_000000003.tmp-0123456789ab")
    step_dir(run, 3).rename(run / "step_000000003.tmp-0123456789ab-old")

    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [1, 2, 3], "the set-aside checkpoint is put back"
        restored = mgr.restore()
        assert restored is not None and restored.step == 3
    assert saved_step_of(step_dir(run, 3)) == 3
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]


def test_a_set_aside_copy_is_swept_once_its_step_is_committed_again(tmp_path: Path) -> None:
    """The same overwrite dying after its second rename: <name> holds the new checkpoint and the
    old one lingers as <name>.tmp-<id>-old. It is a leftover like any other temporary."""
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2, 3])
    shutil.copytree(step_dir(run, 3), run / "step_000000003.tmp-0123456789ab-old")

    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [1, 2, 3]
    assert saved_step_of(step_dir(run, 3)) == 3
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name], "leftover kept forever"


# ---- run metadata and lineage ----------------------------------------------------------------


def _git_repo(path: Path) -> str:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    path.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True
    )
    return head.stdout.strip()


def test_run_json_records_config_sessions_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = _git_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    run = tmp_path / "run"
    config = {"lr": 0.001, "layers": [4, 8], "name": "baseline"}
    with sv.CheckpointManager(run, options=sv.RunOptions(name="exp1", metadata=config)) as mgr:
        run_id = mgr.run_id
        save_steps(mgr, [1, 2])
    first = read_run(run)
    assert first["run_id"] == run_id
    assert first["name"] == "exp1"
    assert len(first["sessions"]) == 1
    session = first["sessions"][0]
    assert session["pid"] == os.getpid()
    assert session["host"] == socket.gethostname()
    assert session["git"] == {"commit": head, "dirty": False}
    assert session["versions"]["statevault"] == sv.__version__
    assert session["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert session["versions"]["torch"] == torch.__version__
    assert session["resumed_from"] is None
    assert session["forked_from"] is None

    with sv.CheckpointManager(run) as mgr:
        assert mgr.run_id == run_id, "the run keeps its identity across sessions"
        r = mgr.restore()
        assert r is not None and r.step == 2
    second = read_run(run)
    assert second["run_id"] == run_id
    assert len(second["sessions"]) == 2
    assert second["sessions"][1]["resumed_from"] == {"run_id": run_id, "step": 2}
    assert second["sessions"][0] == session

    from statevault.manager.run import decoded_config

    assert decoded_config(second) == config


def test_restore_from_another_run_forks_and_records_it(tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    with sv.CheckpointManager(other, max_to_keep=None) as mgr:
        other_id = mgr.run_id
        save_steps(mgr, [4, 8])
    before = snapshot(other)

    with sv.CheckpointManager(run) as mgr:
        r = mgr.restore(source=other)
        assert r is not None and r.step == 8
        assert r.path == str(step_dir(other, 8))
        assert r.state["step"] == 8
        assert mgr.all_steps() == [], "forking copies nothing into this run"
        r4 = mgr.restore(source=other, step=4)
        assert r4 is not None and r4.state["step"] == 4
        save_steps(mgr, [9])
        run_id = mgr.run_id
    record = read_run(run)
    assert record["run_id"] == run_id != other_id
    forked = record["sessions"][-1]["forked_from"]
    assert forked == {"path": str(other), "run_id": other_id, "step": 4}
    assert snapshot(other) == before, "the source run is not touched"


# ---- lifecycle --------------------------------------------------------------------------------


def test_a_closed_manager_refuses_to_save(tmp_path: Path) -> None:
    mgr = sv.CheckpointManager(tmp_path / "run")
    save_steps(mgr, [1])
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(sv.CheckpointError, match="closed"):
        mgr.save(2, small_state(2), force=True)
    with pytest.raises(sv.CheckpointError, match="closed"):
        mgr.annotate(1, metrics={"x": 1.0})
    assert dirs_on_disk(tmp_path / "run") == [1]


def test_context_manager_closes_and_releases_the_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    term_before = signal.getsignal(signal.SIGTERM)
    with sv.CheckpointManager(run) as mgr:
        save_steps(mgr, [1])
        with pytest.raises(sv.RunLockedError):
            sv.CheckpointManager(run)
    assert signal.getsignal(signal.SIGTERM) == term_before
    assert (run / LOCK_FILE).read_bytes() == b"", "the holder record is cleared"
    with pytest.raises(sv.CheckpointError, match="closed"):
        mgr.save(2, small_state(2))
    with sv.CheckpointManager(run) as again:
        assert again.all_steps() == [1]


def test_context_manager_releases_the_lock_when_the_body_raises(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ZeroDivisionError), sv.CheckpointManager(run):
        _ = 1 / 0
    with sv.CheckpointManager(run) as again:
        assert again.all_steps() == []


def test_a_manager_that_fails_to_open_releases_the_lock_cleanly(tmp_path: Path) -> None:
    """run_metadata that cannot be recorded fails __init__ after the lock is taken: the lock
    must be released, and the half-built object must not raise later in __del__."""
    run = tmp_path / "run"
    unraisable: list[BaseException | None] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(u.exc_value)
    try:
        with pytest.raises(sv.UnsupportedValueError, match="run_metadata"):
            sv.CheckpointManager(run, options=sv.RunOptions(metadata={"bad": object()}))
        gc.collect()
    finally:
        sys.unraisablehook = previous_hook
    with sv.CheckpointManager(run) as mgr:
        assert mgr.all_steps() == []
    assert unraisable == [], f"__del__ of the half-built manager raised: {unraisable}"


def test_leftovers_of_killed_deletions_and_run_file_writes_are_swept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2])
    (step_dir(run, 1) / "manifest.json").unlink()  # a deletion killed after its first step
    (run / "run.json.tmp-deadbeef").write_text("{")  # a run.json write killed midway
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [2]
    assert not step_dir(run, 1).exists(), "the manifest-less step directory is swept"
    assert not (run / "run.json.tmp-deadbeef").exists()
