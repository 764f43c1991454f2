"""Asynchronous saves: training may mutate state once save() returns; failures are never lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.checkpoint import save as saver_module
from statevault.engine import writer


def _state(seed: int = 0, mib: int = 8) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    count = mib * (1 << 20) // 4 // 4
    return {
        "model": {f"w{i}": torch.randn(count, generator=generator) for i in range(4)},
        "array": np.arange(1000, dtype=np.float64),
        "step": seed,
    }


def _snapshot(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state["model"].items()}


@pytest.mark.parametrize("budget", [None, 3 << 20])
def test_mutation_right_after_save_does_not_reach_the_checkpoint(
    tmp_path: Path, budget: int | None
) -> None:
    state = _state()
    before = _snapshot(state)
    array_before = state["array"].copy()
    saver = saver_module.Saver(asynchronous=True, staging_budget_bytes=budget)
    future = saver.save(state, str(tmp_path / "ck"))
    for tensor in state["model"].values():
        tensor.add_(1.0)  # training continues at once
    state["array"] *= -1
    future.result()
    saver.close()
    loaded = sv.load(tmp_path / "ck")
    assert all(torch.equal(loaded["model"][k], v) for k, v in before.items())
    assert np.array_equal(loaded["array"], array_before)


def test_manager_async_save_holds_values_of_save_time(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256)
    with sv.CheckpointManager(tmp_path / "run", async_save=True, max_to_keep=None) as mgr:
        mgr.restore(into={"model": model})
        snapshots = {}
        for step in range(3):
            snapshots[step] = model.weight.detach().clone()
            assert mgr.save(step, {"model": model})
            with torch.no_grad():
                model.weight.mul_(1.5)
        mgr.wait()
        assert mgr.all_steps() == [0, 1, 2]
    for step, weight in snapshots.items():
        loaded = sv.load(tmp_path / "run" / f"step_{step:09d}")
        assert torch.equal(loaded["model"]["weight"], weight)


def _failing_write_file(*args: Any, **kwargs: Any) -> Any:
    raise OSError(28, "No space left on device (injected)")


def test_background_failure_is_raised_on_next_save_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with sv.CheckpointManager(run, async_save=True, max_to_keep=None) as mgr:
        mgr.save(0, _state(0))
        mgr.wait()
        monkeypatch.setattr(writer, "write_file", _failing_write_file)
        assert mgr.save(1, _state(1))  # returns: the failure happens in the background
        with pytest.raises(OSError, match="injected"):
            mgr.save(2, _state(2))  # raised before this save starts: nothing of step 2 written
        monkeypatch.undo()
        assert mgr.all_steps() == [0]
        assert not any(p.name.startswith("step_000000001") for p in run.iterdir())
        assert mgr.save(2, _state(2))  # the error was reported once; saving works again
        mgr.wait()
        assert mgr.all_steps() == [0, 2]
    assert sv.verify(run / "step_000000000").ok


@pytest.mark.parametrize("where", ["wait", "close"])
def test_background_failure_is_raised_on_wait_and_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    mgr = sv.CheckpointManager(tmp_path / "run", async_save=True)
    monkeypatch.setattr(writer, "write_file", _failing_write_file)
    mgr.save(0, _state(0))
    with pytest.raises(OSError, match="injected"):
        getattr(mgr, where)()
    mgr.close()
    monkeypatch.undo()
    with sv.CheckpointManager(tmp_path / "run") as again:  # the lock was released
        assert again.all_steps() == []


def test_one_save_in_flight_next_waits_for_durability(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    original = writer.write_file

    def slow_write_file(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "write_file", slow_write_file)
    saver = saver_module.Saver(asynchronous=True)
    first = saver.save(_state(0, mib=1), str(tmp_path / "a"))
    assert not first.done()
    threading.Timer(0.3, release.set).start()
    second = saver.save(_state(1, mib=1), str(tmp_path / "b"))
    # The first save could only finish once released: returning means the second waited.
    assert release.is_set()
    assert first.done() and (tmp_path / "a" / "manifest.json").exists()
    second.result()
    saver.close()


def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch, statevault as sv
        mgr = sv.CheckpointManager({str(tmp_path / "run")!r}, async_save=True)
        state = {{"w": torch.arange(8 << 20, dtype=torch.float32)}}
        mgr.save(7, state)
        print("returned", flush=True)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "returned" in result.stdout
    loaded = sv.load(tmp_path / "run" / "step_000000007")
    assert torch.equal(loaded["w"], torch.arange(8 << 20, dtype=torch.float32))


def test_restore_prewarms_staging_memory_sized_for_the_first_save(tmp_path: Path) -> None:
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
    optimizer = torch.optim.AdamW(model.parameters())  # no moments before its first step
    weights = sum(p.numel() * 4 for p in model.parameters())
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        assert mgr.restore(into={"model": model, "optimizer": optimizer}) is None
        mgr._saver.arena.wait_warm()
        capacity = mgr._saver.arena.capacity
        assert 3 * weights <= capacity < 3 * weights + (64 << 20), "weights + two moments"
    with sv.CheckpointManager(tmp_path / "run2", async_save=True) as mgr:
        mgr.restore(into={"model": model})
        mgr._saver.arena.wait_warm()
        assert weights <= mgr._saver.arena.capacity < 2 * weights + (64 << 20)


def test_budget_smaller_than_state_stages_in_pieces(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((1 << 20,), float(i)) for i in range(12)}  # 12 x 4 MiB
    saver = saver_module.Saver(asynchronous=True, staging_budget_bytes=9 << 20)
    future = saver.save(state, str(tmp_path / "ck"))
    # Only the last piece is still being written: the arena never grew past the budget.
    assert saver.arena.capacity <= (9 << 20) + (1 << 20)
    future.result()
    saver.close()
    loaded = sv.load(tmp_path / "ck")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert len(list((tmp_path / "ck").glob("*.safetensors"))) >= 2
