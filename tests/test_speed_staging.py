"""Parallel host staging (engine/staging): every leaf staged exactly once, bytes exact, and an
async save still holds the values of the moment save() returned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.engine import staging
from statevault.engine.arena import StagingArena
from statevault.engine.plan import plan_save


@pytest.fixture
def parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel staging for small states too, with two threads whatever the machine."""
    monkeypatch.setattr(staging, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(staging, "cpu_threads", lambda: 2)


def _state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": [torch.randn(n, generator=generator) for n in (1, 7, 1000, 30_000, 5, 123_457)],
        "half": torch.randn(999, generator=generator).to(torch.bfloat16),
        "np": np.arange(10_000, dtype=np.int64),
        "step": 3,
    }


@pytest.mark.usefixtures("parallel")
def test_batches_cover_every_leaf_once() -> None:
    plan = plan_save(_state())
    indices = list(range(len(plan.leaves)))
    torch_leaves = [i for i in indices if plan.leaves[i].adapter.framework == "torch"]
    batches = staging._host_batches(plan, torch_leaves, "torch")
    assert len(batches) > 1
    assert [i for batch in batches for i in batch] == torch_leaves
    assert staging._host_batches(plan, torch_leaves, "tensorflow") == [torch_leaves]


@pytest.mark.usefixtures("parallel")
def test_staged_bytes_are_exact() -> None:
    plan = plan_save(_state())
    leaves = list(range(len(plan.leaves)))
    arena = StagingArena(64 << 20)
    views = staging.stage_into(plan, leaves, arena)
    for leaf, view in zip(plan.leaves, views, strict=True):
        value = leaf.value
        array = value.view(torch.uint8).numpy() if isinstance(value, torch.Tensor) else value
        assert bytes(view) == np.ascontiguousarray(array).tobytes(), leaf.path
    arena.release()


@pytest.mark.usefixtures("parallel")
def test_async_save_holds_the_values_of_save_time(tmp_path: Path) -> None:
    state = _state()
    expected = {
        i: t.clone()
        for i, t in enumerate(state["w"])  # type: ignore[attr-defined]
    }
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as manager:
        manager.save(1, state)
        with torch.no_grad():
            for tensor in state["w"]:
                tensor.add_(1)
        manager.wait()
    loaded = sv.load(tmp_path / "run" / "step_000000001")
    for i, tensor in expected.items():
        assert torch.equal(loaded["w"][i], tensor)
    assert np.array_equal(loaded["np"], np.arange(10_000, dtype=np.int64))
