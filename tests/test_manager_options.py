"""A mistake in the manager's arguments is refused at the call, with a message that says what to
pass instead (manager/options.py): never accepted and failed later in the background, never
silently read as something else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import statevault as sv
from statevault.manager.naming import parse_step, step_dir_name
from tests.manager_helpers import saved_step_of, small_state


def test_a_numpy_integer_step_is_a_step_for_an_async_manager(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        assert mgr.save(np.int64(2), small_state(2))
        assert mgr.save(np.int32(3), small_state(3))  # the save of 2 was collected: no error
        mgr.wait()
        assert mgr.all_steps() == [2, 3]
        assert all(type(step) is int for step in mgr.all_steps())
    assert saved_step_of(tmp_path / "run" / step_dir_name(2)) == 2


@pytest.mark.parametrize("step", [40.0, "40", True, None, 2.5])
def test_a_step_that_is_not_an_integer_is_refused_at_the_call(tmp_path: Path, step: Any) -> None:
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        with pytest.raises(TypeError, match="a step is a whole number"):
            mgr.save(step, small_state(1))
        with pytest.raises(TypeError, match="a step is a whole number"):
            mgr.should_save(step)
        assert mgr.save(1, small_state(1))  # nothing was left in flight by the refusal
    assert sv.CheckpointManager(tmp_path / "run").all_steps() == [1]


def test_steps_beyond_nineteen_digits_are_refused_and_the_largest_is_found_again(
    tmp_path: Path,
) -> None:
    largest = 10**19 - 1
    with sv.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(ValueError, match="between 0 and"):
            mgr.save(10**19, small_state(1))
        with pytest.raises(ValueError, match="between 0 and"):
            mgr.save(-1, small_state(1))
        assert mgr.save(largest, {"w": np.zeros(4)})
    assert parse_step(step_dir_name(largest)) == largest
    with sv.CheckpointManager(tmp_path / "run") as again:
        assert again.all_steps() == [largest]


@pytest.mark.parametrize("value", [0, -1])
def test_max_to_keep_zero_or_negative_is_refused_naming_none(tmp_path: Path, value: int) -> None:
    with pytest.raises(ValueError, match=r"max_to_keep must be None \(keep all\) or >= 1"):
        sv.CheckpointManager(tmp_path / "run", max_to_keep=value)
    assert not (tmp_path / "run").exists(), "a refused manager creates nothing"


def test_max_to_keep_none_keeps_every_checkpoint(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "run", max_to_keep=None) as mgr:
        for step in range(5):
            mgr.save(step, small_state(step))
        assert mgr.all_steps() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"max_to_keep": "3"}, TypeError, "max_to_keep must be an int"),
        ({"keep_every_n_steps": 0}, ValueError, "keep_every_n_steps must be None"),
        ({"incremental": "yes"}, TypeError, "incremental must be True or False"),
        ({"best_mode": "lowest", "best_metric": "loss"}, ValueError, "best_mode must be"),
        ({"save_interval_steps": 0}, ValueError, "save_interval_steps must be None"),
        ({"save_interval_seconds": -5}, ValueError, "save_interval_seconds must be > 0"),
        ({"options": {"lease_seconds": 5}}, TypeError, "options takes an sv.RunOptions"),
        ({"replicate_to": 7}, TypeError, "replicate_to takes a URL, a path or an sv.Replica"),
        ({"retention": [sv.KeepLatest(2)], "max_to_keep": 2}, ValueError, "not both"),
        ({"retention": [sv.KeepLatest(2)], "max_to_keep": 3}, ValueError, "max_to_keep"),
        ({"retention": [sv.KeepLatest(2)], "best_metric": "loss"}, ValueError, "best_metric"),
        ({"retention": ["latest"]}, TypeError, "retention= takes policies"),
    ],
)
def test_options_are_checked_in_the_constructor(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        sv.CheckpointManager(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists(), "a refused manager creates nothing"


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: sv.RunOptions(lease_seconds=0), ValueError, r"lease_seconds\) must be > 0"),
        (lambda: sv.RunOptions(stale_after_seconds=-1), ValueError, "stale_after_seconds"),
        (lambda: sv.RunOptions(staging_budget_bytes=0), ValueError, "staging_budget_bytes"),
        (lambda: sv.RunOptions(name=7), TypeError, r"name\) must be a string"),
        (lambda: sv.Replica("memory://x/run", every=0), ValueError, "every"),
        (lambda: sv.Replica("memory://x/run", max_to_keep=0), ValueError, "max_to_keep"),
        (
            lambda: sv.Replica("memory://x/run", max_to_keep=2, retention=[sv.KeepLatest(1)]),
            ValueError,
            "Replica: pass either retention",
        ),
    ],
)
def test_replica_and_run_options_are_checked_where_they_are_made(
    make: Any, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        make()


def test_the_constructor_takes_at_most_fourteen_parameters() -> None:
    import inspect

    parameters = list(inspect.signature(sv.CheckpointManager.__init__).parameters)[1:]
    assert len(parameters) <= 14, parameters


def test_a_plain_url_is_shorthand_for_a_replica(tmp_path: Path, memory_root: str) -> None:
    with sv.CheckpointManager(tmp_path / "fast", replicate_to=f"{memory_root}/run") as mgr:
        mgr.save(1, small_state(1))
        mgr.wait()
        assert mgr.replica_steps() == [1]
    with sv.CheckpointManager(
        tmp_path / "other",
        replicate_to=sv.Replica(f"{memory_root}/run2", retention=[sv.KeepLatest(1)]),
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, small_state(step))
        mgr.wait()
        assert mgr.replica_steps() == [3]


def test_retention_list_alone_is_used(tmp_path: Path) -> None:
    with sv.CheckpointManager(tmp_path / "run", retention=[sv.KeepEveryNSteps(2)]) as mgr:
        for step in range(5):
            mgr.save(step, small_state(step))
        assert mgr.all_steps() == [0, 2, 4]


@pytest.mark.parametrize(
    "make",
    [
        lambda: sv.KeepLatest(0),
        lambda: sv.KeepLatest(-1),
        lambda: sv.KeepEveryNSteps(0),
        lambda: sv.KeepBest("loss", "min", 0),
        lambda: sv.KeepBest("loss", "best"),  # type: ignore[arg-type]
    ],
)
def test_retention_policies_refuse_counts_that_mean_nothing(make: Any) -> None:
    with pytest.raises(ValueError):
        make()
