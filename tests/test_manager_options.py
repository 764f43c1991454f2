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
        ({"keep_best": 0, "best_metric": "loss"}, ValueError, "keep_best must be >= 1"),
        ({"best_mode": "lowest", "best_metric": "loss"}, ValueError, "best_mode must be"),
        ({"save_interval_steps": 0}, ValueError, "save_interval_steps must be None"),
        ({"save_interval_seconds": -5}, ValueError, "save_interval_seconds must be > 0"),
        ({"lease_seconds": 0}, ValueError, "lease_seconds must be > 0"),
        ({"replicate_to": "memory://x/run", "replicate_every": 0}, ValueError, "replicate_every"),
        ({"replicate_to": "memory://x/run", "replica_max_to_keep": 0}, ValueError, "max_to_keep"),
        ({"staging_budget_bytes": 0}, ValueError, "staging_budget_bytes must be >= 1"),
        ({"name": 7}, TypeError, "name must be a string"),
    ],
)
def test_options_are_checked_in_the_constructor(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        sv.CheckpointManager(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists(), "a refused manager creates nothing"


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
