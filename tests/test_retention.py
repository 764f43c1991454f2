"""Retention: the pure policies and decide(), then the manager applying them on a real disk.

What must hold (issue 3): a checkpoint is kept if any policy keeps it; deletion happens only after
the new checkpoint is committed; only this run's checkpoint directories are ever deleted (never
foreign files, never another run's checkpoints, never a corrupt one, never the newest, never the
one this process resumed from while it is the newest); a crash mid-deletion never leaves
something that looks committed.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import statevault as sv
from statevault.manager.index import CheckpointRecord
from statevault.manager.retention import (
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    RetentionPolicy,
    decide,
)
from tests.manager_helpers import (
    committed_on_disk,
    damage_manifest,
    dirs_on_disk,
    flip_payload_bit,
    save_steps,
    saved_step_of,
    snapshot,
    step_dir,
)

# ---- the pure policies ------------------------------------------------------------------------


def rec(step: int, status: str = "committed", **metrics: Any) -> CheckpointRecord:
    return CheckpointRecord(step, f"/run/step_{step:09d}", status, metrics=dict(metrics))


def test_keep_latest_keeps_the_newest_n_whatever_the_order() -> None:
    records = [rec(s) for s in (7, 1, 30, 4, 12)]
    assert set(KeepLatest(2).keep(records)) == {30, 12}
    assert set(KeepLatest(10).keep(records)) == {1, 4, 7, 12, 30}
    assert KeepLatest(1).keep(records) == {30: "latest 1"}


def test_keep_every_n_steps_keeps_exactly_the_multiples() -> None:
    records = [rec(s) for s in range(0, 23)]
    assert set(KeepEveryNSteps(5).keep(records)) == {0, 5, 10, 15, 20}
    assert KeepEveryNSteps(5).keep(records)[10] == "every 5 steps"
    assert set(KeepEveryNSteps(100).keep(records)) == {0}


def test_keep_best_min_and_max() -> None:
    records = [rec(1, loss=0.5), rec(2, loss=0.1), rec(3, loss=0.9), rec(4, loss=0.3)]
    assert set(KeepBest("loss", "min", 2).keep(records)) == {2, 4}
    assert set(KeepBest("loss", "max", 2).keep(records)) == {3, 1}
    assert KeepBest("loss", "min", 1).keep(records) == {2: "best loss (min)"}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_ranks_nan_last_in_both_modes(mode: Literal["min", "max"]) -> None:
    worst_finite = 1e30 if mode == "min" else -1e30
    records = [rec(1, m=math.nan), rec(2, m=worst_finite), rec(3, m=math.nan), rec(4, m=0.0)]
    assert set(KeepBest("m", mode, 2).keep(records)) == {2, 4}
    three = set(KeepBest("m", mode, 3).keep(records))
    assert {2, 4} < three and len(three) == 3, "a NaN only fills what numbers leave"


def test_keep_best_ignores_records_without_a_numeric_metric() -> None:
    records = [
        rec(1, loss=True),  # a bool is not a score
        rec(2, loss="low"),
        rec(3, acc=0.1),
        rec(4, loss=3),  # ints count
        rec(5, loss=2.5),
    ]
    assert set(KeepBest("loss", "min", 5).keep(records)) == {4, 5}


def test_decide_keeps_protected_and_policy_steps_and_deletes_the_rest() -> None:
    records = [rec(s, loss=float(10 - s)) for s in range(1, 11)]
    records.append(rec(11, status="corrupt"))
    records.append(rec(12, status="incomplete"))
    kept, deletable = decide(
        records, [KeepLatest(2), KeepEveryNSteps(4)], protected={3: "resumed from"}
    )
    assert set(kept) == {3, 4, 8, 9, 10}
    assert kept[3] == ["resumed from"]
    assert kept[8] == ["every 4 steps"]
    assert deletable == [1, 2, 5, 6, 7], "only committed checkpoints are ever deletable"


def test_decide_without_policies_keeps_everything() -> None:
    records = [rec(s) for s in (5, 1, 9)]
    kept, deletable = decide(records, [], protected={})
    assert deletable == []
    assert set(kept) == {1, 5, 9}


def test_decide_reasons_accumulate_over_policies() -> None:
    records = [rec(s, loss=1.0 / s) for s in (2, 4, 6)]
    kept, deletable = decide(
        records,
        [KeepLatest(1), KeepEveryNSteps(3), KeepBest("loss", "min", 1)],
        protected={6: "newest"},
    )
    assert kept[6] == ["newest", "latest 1", "every 3 steps", "best loss (min)"]
    assert deletable == [2, 4]


# ---- property: decide() is exactly the union of the policies plus protected -------------------

_metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=False, width=32),
    st.integers(-5, 5),
    st.booleans(),
    st.just("text"),
)


@st.composite
def _records(draw: st.DrawFn) -> list[CheckpointRecord]:
    steps = draw(st.lists(st.integers(0, 60), unique=True, max_size=14))
    records = []
    for step in steps:
        status = draw(st.sampled_from(["committed", "committed", "committed", "corrupt"]))
        metrics = draw(st.dictionaries(st.sampled_from(["loss", "acc"]), _metric_values))
        records.append(rec(step, status, **metrics))
    return records


_policies = st.lists(
    st.one_of(
        st.builds(KeepLatest, st.integers(1, 5)),
        st.builds(KeepEveryNSteps, st.integers(1, 12)),
        st.builds(
            KeepBest,
            st.sampled_from(["loss", "acc"]),
            st.sampled_from(["min", "max"]),
            st.integers(1, 4),
        ),
    ),
    max_size=4,
)


def _goodness(value: float, mode: str) -> tuple[int, float]:
    """Sort key, lower is better: NaN after every number."""
    if math.isnan(value):
        return (1, 0.0)
    return (0, value if mode == "min" else -value)


def _check_policy(policy: RetentionPolicy, committed: Sequence[CheckpointRecord]) -> None:
    """Each policy's keep set, characterised independently of its implementation."""
    kept = set(policy.keep(committed))
    steps = sorted(r.step for r in committed)
    if isinstance(policy, KeepLatest):
        assert kept == set(steps[max(0, len(steps) - policy.count) :])
    elif isinstance(policy, KeepEveryNSteps):
        assert kept == {s for s in steps if s % policy.interval == 0}
    elif isinstance(policy, KeepBest):
        scored = {
            r.step: _goodness(float(r.metrics[policy.metric]), policy.mode)
            for r in committed
            if type(r.metrics.get(policy.metric)) in (int, float)
        }
        assert kept <= set(scored)
        assert len(kept) == min(policy.count, len(scored))
        for k in kept:
            for other in set(scored) - kept:
                assert scored[k] <= scored[other], (policy, k, other, scored)


@given(
    records=_records(),
    policies=_policies,
    protected_steps=st.lists(st.integers(0, 60), max_size=4, unique=True),
)
def test_decide_is_the_union_of_the_policies_plus_protected(
    records: list[CheckpointRecord], policies: list[RetentionPolicy], protected_steps: list[int]
) -> None:
    protected = {s: "protected" for s in protected_steps}
    committed = sorted((r for r in records if r.status == "committed"), key=lambda r: r.step)
    kept, deletable = decide(records, policies, protected)

    for policy in policies:
        _check_policy(policy, committed)
    union: set[int] = set(protected)
    for policy in policies:
        union |= set(policy.keep(committed))
    if not policies:
        union |= {r.step for r in committed}
    committed_steps = {r.step for r in committed}

    assert set(kept) == union
    assert deletable == sorted(committed_steps - union)
    assert not set(deletable) & set(protected), "a protected step is never deleted"
    assert set(deletable) <= committed_steps, "only committed checkpoints are deletable"
    for step in protected:
        assert "protected" in kept[step]
    for policy in policies:
        for step, why in policy.keep(committed).items():
            assert why in kept[step]


# ---- through the manager, on disk -------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_max_to_keep_keeps_the_newest_n(tmp_path: Path, async_save: bool) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=2, async_save=async_save) as mgr:
        for step in range(1, 7):
            save_steps(mgr, [step])
            mgr.wait()
            assert committed_on_disk(run) == list(range(max(1, step - 1), step + 1))
        assert mgr.all_steps() == [5, 6]
    assert dirs_on_disk(run) == [5, 6]
    assert [saved_step_of(step_dir(run, s)) for s in (5, 6)] == [5, 6]


def test_keep_every_n_steps_keeps_multiples_forever(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=1, keep_every_n_steps=4) as mgr:
        save_steps(mgr, range(1, 13))
        save_steps(mgr, [13, 14])
        assert mgr.all_steps() == [4, 8, 12, 14]
    assert dirs_on_disk(run) == [4, 8, 12, 14]
    with sv.CheckpointManager(run, max_to_keep=1, keep_every_n_steps=4) as mgr:
        save_steps(mgr, [15, 16, 17])
        assert mgr.all_steps() == [4, 8, 12, 16, 17]


@pytest.mark.parametrize(
    ("mode", "values", "expected_best"),
    [
        ("min", [0.5, 0.1, 0.9, 0.3, math.nan, 0.7], [2, 4]),
        ("max", [0.1, 0.9, 0.5, 0.8, math.nan, 0.2], [2, 4]),
    ],
)
def test_best_metric_keeps_the_best_k(
    tmp_path: Path, mode: Literal["min", "max"], values: list[float], expected_best: list[int]
) -> None:
    run = tmp_path / "run"
    metrics = {step: {"score": v} for step, v in enumerate(values, start=1)}
    with sv.CheckpointManager(
        run, retention=[sv.KeepLatest(1), sv.KeepBest("score", mode, 2)]
    ) as mgr:
        save_steps(mgr, metrics, metrics)
        assert mgr.all_steps() == [*expected_best, 6]
        assert mgr.best_step() == 2
        reasons = {r.step: r.kept_because for r in mgr.checkpoints()}
        assert reasons[4] == [f"best score ({mode})"]
    assert dirs_on_disk(run) == [*expected_best, 6]
    with sv.CheckpointManager(run, max_to_keep=1, best_metric="score", best_mode=mode) as mgr:
        assert mgr.best_step() == 2, "best is read back from the manifests, not remembered"


def test_all_three_policies_combined(tmp_path: Path) -> None:
    run = tmp_path / "run"
    losses = [0.9, 0.8, 0.3, 0.7, 0.6, 0.5, 0.4, 0.35, 0.45, 0.55, 0.65, 0.75]
    metrics = {step: {"loss": v} for step, v in enumerate(losses, start=1)}
    with sv.CheckpointManager(run, max_to_keep=2, keep_every_n_steps=5, best_metric="loss") as mgr:
        save_steps(mgr, metrics, metrics)
        assert mgr.all_steps() == [3, 5, 10, 11, 12]
        reasons = {r.step: r.kept_because for r in mgr.checkpoints()}
    assert reasons[3] == ["best loss (min)"]
    assert reasons[5] == ["every 5 steps"]
    assert reasons[10] == ["every 5 steps"]
    assert reasons[11] == ["latest 2"]
    assert "latest 2" in reasons[12] and "newest" in reasons[12]
    assert dirs_on_disk(run) == [3, 5, 10, 11, 12]


def test_max_to_keep_none_keeps_everything(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, range(1, 9))
        assert mgr.all_steps() == list(range(1, 9))
    assert dirs_on_disk(run) == list(range(1, 9))


def test_annotated_metrics_count_for_best_k_and_survive_a_new_manager(tmp_path: Path) -> None:
    run = tmp_path / "run"
    options: dict[str, Any] = {"max_to_keep": 1, "best_metric": "val_acc", "best_mode": "max"}
    with sv.CheckpointManager(run, **options) as mgr:
        save_steps(mgr, [1], {1: {"val_acc": 0.6}})
        save_steps(mgr, [2])  # evaluated later
        assert mgr.all_steps() == [1, 2]
        assert mgr.best_step() == 1
        manifest_before = (step_dir(run, 2) / "manifest.json").read_bytes()

        mgr.annotate(2, metrics={"val_acc": 0.9})
        assert mgr.best_step() == 2
        assert mgr.all_steps() == [2], "step 1 is no longer best nor latest"
        save_steps(mgr, [3, 4])
        assert mgr.all_steps() == [2, 4], "the annotated best survives later saves"
        assert mgr.metadata(2)["metrics"]["val_acc"] == 0.9

    assert (step_dir(run, 2) / "manifest.json").read_bytes() == manifest_before
    assert sv.verify(step_dir(run, 2)).ok
    assert saved_step_of(step_dir(run, 2)) == 2
    with sv.CheckpointManager(run, **options) as mgr:
        assert mgr.best_step() == 2, "annotations are read back by a new manager"
        assert mgr.metadata(2)["metrics"] == {"val_acc": 0.9}
        save_steps(mgr, [5, 6])
        assert mgr.all_steps() == [2, 6]
        restored = mgr.restore(step=2)
        assert restored is not None and restored.state["step"] == 2


def test_annotate_refuses_a_step_that_is_not_committed(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "run") as mgr:
        save_steps(mgr, [1])
        with pytest.raises(sv.CheckpointError, match="step 7"):
            mgr.annotate(7, metrics={"val": 1.0})


def test_retention_never_touches_foreign_files_or_directories(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    (run / "step_000000001.bak").mkdir()
    (run / "step_000000001.bak" / "weights.bin").write_bytes(b"\x01" * 64)
    (run / "another_dir").mkdir()
    (run / "another_dir" / "f").write_text("x")
    (run / "step_000000002").write_text("a file named like a checkpoint")
    (run / "step_3").mkdir()  # not the canonical name
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [4])  # then kept elsewhere, and linked back under its name
    outside = tmp_path / "outside"
    step_dir(run, 4).rename(outside)
    (outside / "precious").write_text("do not delete")
    (run / "step_000000004").symlink_to(outside, target_is_directory=True)
    linked = snapshot(outside)
    foreign = {name: snapshot(run / name) for name in ("step_000000001.bak", "another_dir")}

    with sv.CheckpointManager(run, max_to_keep=1) as mgr:
        save_steps(mgr, range(5, 10))
        assert mgr.all_steps() == [9], "a symlink is never taken for a checkpoint of the run"

    assert (run / "notes.txt").read_text() == "my notes"
    assert {name: snapshot(run / name) for name in foreign} == foreign
    assert (run / "step_000000002").read_text() == "a file named like a checkpoint"
    assert (run / "step_3").is_dir()
    assert (run / "step_000000004").is_symlink()
    assert snapshot(outside) == linked


def test_checkpoints_of_another_run_are_listed_and_never_deleted(tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    with sv.CheckpointManager(other) as mgr:
        save_steps(mgr, [2])
    with sv.CheckpointManager(run) as mgr:
        save_steps(mgr, [1])
    shutil.copytree(step_dir(other, 2), step_dir(run, 2))
    copied = snapshot(step_dir(run, 2))

    with sv.CheckpointManager(run, max_to_keep=1) as mgr:
        assert mgr.all_steps() == [1, 2]
        save_steps(mgr, [3, 4, 5])
        listed = {r.step: r for r in mgr.checkpoints()}
        assert mgr.all_steps() == [2, 5]
        assert listed[2].kept_because == ["written by another run"]
        assert listed[2].status == "committed"
        assert listed[2].run_id != mgr.run_id
    assert snapshot(step_dir(run, 2)) == copied
    assert dirs_on_disk(run) == [2, 5]


def test_the_newest_checkpoint_is_never_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None, best_metric="loss") as mgr:
        save_steps(mgr, [1, 2, 3], {1: {"loss": 1.0}, 2: {"loss": 0.5}, 3: {"loss": 0.9}})
        assert mgr.all_steps() == [2, 3], "best and newest"
        assert "newest" in {r.step: r for r in mgr.checkpoints()}[3].kept_because
        save_steps(mgr, [4], {4: {"loss": 0.8}})
        assert mgr.all_steps() == [2, 4]
        save_steps(mgr, [5])  # no metric at all: kept only because it is the newest
        assert mgr.all_steps() == [2, 5]
    assert dirs_on_disk(run) == [2, 5]


def test_a_corrupt_checkpoint_is_never_deleted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2, 3])
    damage_manifest(step_dir(run, 1))
    flip_payload_bit(step_dir(run, 3))
    damaged = {s: snapshot(step_dir(run, s)) for s in (1, 3)}

    with sv.CheckpointManager(run, max_to_keep=1) as mgr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            restored = mgr.restore()  # finds step 3 damaged, falls back to 2
        assert restored is not None and restored.step == 2
        save_steps(mgr, [4, 5, 6])  # skips step 3: nothing moves it aside
        assert mgr.all_steps() == [6]
        status = {r.step: r.status for r in mgr.checkpoints()}
    assert status[1] == "corrupt" and status[3] == "corrupt"
    assert {s: snapshot(step_dir(run, s)) for s in (1, 3)} == damaged
    assert dirs_on_disk(run) == [1, 3, 6]


def test_the_checkpoint_resumed_from_is_kept_while_it_is_the_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    options: dict[str, Any] = {"max_to_keep": None, "best_metric": "loss"}
    with sv.CheckpointManager(run, **options) as mgr:
        save_steps(mgr, [1, 2], {1: {"loss": 0.1}, 2: {"loss": 0.5}})
    with sv.CheckpointManager(run, **options) as mgr:
        restored = mgr.restore()
        assert restored is not None and restored.step == 2
        mgr.annotate(1, metrics={"loss": 0.05})  # runs retention: 2 is not the best
        assert mgr.all_steps() == [1, 2]
        reasons = {r.step: r.kept_because for r in mgr.checkpoints()}
        assert any("resumed from" in why for why in reasons[2])
        assert saved_step_of(step_dir(run, 2)) == 2
        save_steps(mgr, [3], {3: {"loss": 0.9}})
        assert mgr.all_steps() == [1, 3], "a newer commit ends the protection"
    assert dirs_on_disk(run) == [1, 3]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_nothing_is_deleted_when_the_new_save_fails_to_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    import statevault.checkpoint.commit

    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=2, async_save=async_save) as mgr:
        save_steps(mgr, [1, 2])
        mgr.wait()
        before = snapshot(run)

        def fail_publish(tmp: str, path: str, overwrite: bool) -> None:
            raise OSError(28, "No space left on device (injected)")

        monkeypatch.setattr(statevault.checkpoint.commit, "publish", fail_publish)
        with pytest.raises(OSError, match="injected"):
            mgr.save(3, {"w": np.zeros(4)})
            mgr.wait()  # an async save reports its failure here
        assert mgr.all_steps() == [1, 2]
        assert committed_on_disk(run) == [1, 2]
        after = snapshot(run)
        assert {k: v for k, v in after.items() if k.startswith("step_")} == {
            k: v for k, v in before.items() if k.startswith("step_")
        }
        assert not [p for p in run.iterdir() if ".tmp-" in p.name], "the failed save cleaned up"

        monkeypatch.undo()
        save_steps(mgr, [3])
        mgr.wait()
        assert mgr.all_steps() == [2, 3]


def test_crash_mid_deletion_never_leaves_something_that_looks_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=2) as mgr:
        save_steps(mgr, [1, 2])

        def crash(path: str, ignore_errors: bool = False) -> None:
            raise OSError(5, "I/O error (injected crash mid-deletion)")

        monkeypatch.setattr("statevault.storage.local.shutil.rmtree", crash)
        with contextlib.suppress(OSError):  # whether save reports it or not, 3 is committed
            mgr.save(3, {"w": np.zeros(4), "step": 3})
        monkeypatch.undo()

    # Deletion uncommits with one rename first: the half-deleted rest is a temporary.
    assert not step_dir(run, 1).exists()
    (leftover,) = [p for p in run.iterdir() if p.name.startswith("step_000000001.tmp-")]
    assert not (leftover / "manifest.json").exists(), "the commit record went first"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [2, 3]
        assert 1 not in {r.step for r in mgr.checkpoints()}
        with pytest.raises(sv.CheckpointError):
            mgr.restore(step=1)
        restored = mgr.restore()
        assert restored is not None and restored.step == 3
    assert not leftover.exists(), "the next manager sweeps the leftover"


def test_a_newest_checkpoint_without_manifest_is_not_restored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        save_steps(mgr, [1, 2, 3])
    (step_dir(run, 3) / "manifest.json").unlink()  # deletion of 3 crashed after step one
    with sv.CheckpointManager(run, max_to_keep=None) as mgr:
        assert mgr.all_steps() == [1, 2]
        assert mgr.latest_step() == 2
        restored = mgr.restore()
        assert restored is not None and restored.step == 2
        assert restored.state["step"] == 2
        assert restored.path == str(step_dir(run, 2))
