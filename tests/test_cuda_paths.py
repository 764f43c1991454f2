"""CUDA paths. Their logic is tested here on CPU with a recording stand-in for the CUDA runtime;
the tests marked ``cuda`` run the real thing on a GPU machine (benchmarks/gpu_check.py too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import statevault as sv
from statevault.adapters import torch_adapter
from statevault.engine.arena import StagingArena


class _FakeRuntime:
    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.registered.append((pointer, size))
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:
        self.unregistered.append(pointer)
        return 0


def test_arena_chunks_are_page_locked_once_each_including_later_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = _FakeRuntime()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: runtime)
    arena = StagingArena()
    arena.prewarm(1 << 20, background=False)
    torch_adapter._pin_arena(arena)
    torch_adapter._pin_arena(arena)  # idempotent: a second save does not register again
    assert [size for _, size in runtime.registered] == [arena.capacity]
    arena.take(arena.capacity)
    arena.take(70 << 20)  # the arena grows: the new chunk is registered as it is made
    assert len(runtime.registered) == 2
    assert runtime.registered[1][1] >= 70 << 20
    assert len({pointer for pointer, _ in runtime.registered}) == 2
    arena.release()  # unpinned before unmapped: the addresses may be reused
    assert sorted(runtime.unregistered) == sorted(p for p, _ in runtime.registered)


def test_a_failed_registration_is_an_error_not_a_silent_slow_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Refusing(_FakeRuntime):
        def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", Refusing)
    arena = StagingArena()
    arena.prewarm(1 << 20, background=False)
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        torch_adapter._pin_arena(arena)


def test_prepare_pins_only_for_device_state() -> None:
    arena = StagingArena()
    torch_adapter.TorchAdapter().prepare_staging([torch.ones(2)], arena)
    assert arena.on_new_chunk == [], "host-only state needs no page-locked staging"


def _cuda() -> Any:
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@_cuda()
def test_async_save_from_gpu_then_mutate_then_load_to_gpu(tmp_path: Path) -> None:
    weights = torch.randn(1 << 20, device="cuda")
    snapshot = weights.clone()
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.restore(into={"w": weights})
        mgr.save(1, {"w": weights})
        weights.add_(1.0)  # training continues on the device at once
        mgr.wait()
    loaded = sv.load(tmp_path / "run" / "step_000000001", device="cuda")
    assert loaded["w"].is_cuda and torch.equal(loaded["w"], snapshot)
    target = torch.zeros_like(weights)
    sv.load(tmp_path / "run" / "step_000000001", into={"w": target})
    assert torch.equal(target, snapshot)
