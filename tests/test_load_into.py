"""load(into=...): in-place restore, strict checking before any change, non-strict reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import statevault as sv


def _net(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )


def _trained(tmp_path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
    path = tmp_path / "ck"
    sv.save({"model": model, "optimizer": optimizer, "epoch": 3, "w": torch.ones(2)}, path)
    return model, optimizer, path


def test_restores_module_optimizer_and_tensors_in_place(tmp_path: Path) -> None:
    model, optimizer, path = _trained(tmp_path)
    fresh = _net()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    weight_before = fresh[0].weight
    target = torch.zeros(2)
    state = sv.load(path, into={"model": fresh, "optimizer": fresh_opt, "w": target, "epoch": 0})
    assert fresh[0].weight is weight_before, "parameters are restored in place"
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(target, torch.ones(2)), "tensors in into are copied into"
    assert fresh_opt.param_groups[0]["lr"] == 0.01
    moments = fresh_opt.state[fresh[0].weight]["exp_avg"]
    assert torch.equal(moments, optimizer.state[model[0].weight]["exp_avg"])
    assert state["epoch"] == 3, "plain values come back in the returned tree"


def test_strict_mismatch_lists_everything_and_changes_nothing(tmp_path: Path) -> None:
    _, _, path = _trained(tmp_path)
    wide = _net(width=5)
    before = [p.detach().clone() for p in wide.parameters()]
    target = torch.zeros(3)
    with pytest.raises(sv.StateMismatchError) as info:
        sv.load(path, into={"model": wide, "w": target, "extra": torch.zeros(1)})
    error = info.value
    assert "extra" in error.missing
    assert "optimizer" in error.unexpected
    assert "epoch" not in error.unexpected, "plain values are returned, never unexpected"
    assert any(m.startswith("model/0.weight") for m in error.mismatched)
    assert any(m.startswith("w:") for m in error.mismatched)
    assert all(torch.equal(a, b) for a, b in zip(wide.parameters(), before, strict=True))
    assert torch.equal(target, torch.zeros(3))


def test_non_strict_restores_what_fits_and_reports_the_rest(tmp_path: Path) -> None:
    model, _, path = _trained(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 7))
    with pytest.warns(UserWarning, match="partial restore"):
        state = sv.load(path, into={"model": other}, strict=False)
    assert torch.equal(other[0].weight, model[0].weight), "matching layers are restored"
    assert not torch.equal(other[2].bias[:2], model[2].bias)
    assert any(m.startswith("model/2.weight") for m in state.mismatched)
    assert "optimizer" in state.unexpected


def test_missing_module_key_is_reported(tmp_path: Path) -> None:
    sv.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "ck")
    bigger = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(sv.StateMismatchError) as info:
        sv.load(tmp_path / "ck", into={"model": bigger})
    assert "model/0.weight" in info.value.missing
    assert "model/weight" in info.value.unexpected


def test_fresh_optimizer_accepts_saved_moments(tmp_path: Path) -> None:
    _, optimizer, path = _trained(tmp_path)
    fresh = _net()
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    assert fresh_opt.state_dict()["state"] == {}
    sv.load(path, into={"model": fresh, "optimizer": fresh_opt}, strict=False)
    assert len(fresh_opt.state) == len(optimizer.state)


def test_numpy_targets_are_copied_into(tmp_path: Path) -> None:
    sv.save({"a": np.arange(4.0)}, tmp_path / "ck")
    target = np.zeros(4)
    sv.load(tmp_path / "ck", into={"a": target})
    assert target.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(sv.StateMismatchError, match="float32"):
        sv.load(tmp_path / "ck", into={"a": np.zeros(4, dtype=np.float32)})


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def test_user_stateful_round_trips(tmp_path: Path) -> None:
    counter = Counter()
    counter.count = 41
    sv.save({"counter": counter, "nested": {"c": counter}}, tmp_path / "ck")
    fresh, nested = Counter(), Counter()
    state = sv.load(tmp_path / "ck", into={"counter": fresh, "nested": {"c": nested}})
    assert fresh.count == 41 and nested.count == 41
    assert state["counter"] == {"count": 41}, "Stateful entries come back as state dicts"


def test_scheduler_and_grad_scaler_round_trip(tmp_path: Path) -> None:
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    sv.save({"opt": optimizer, "sched": scheduler, "scaler": scaler}, tmp_path / "ck")
    optimizer2 = torch.optim.SGD(_net().parameters(), lr=1.0)
    scheduler2 = torch.optim.lr_scheduler.OneCycleLR(optimizer2, max_lr=1.0, total_steps=10)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    sv.load(tmp_path / "ck", into={"opt": optimizer2, "sched": scheduler2, "scaler": scaler2})
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert scaler2.get_scale() == 1024.0


def test_large_restore_copies_on_several_threads_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore of 96 MiB of host tensors and arrays runs its copies on several threads (the
    copies land from threads other than the caller's) and every byte arrives."""
    import threading

    from statevault.engine import parallel

    monkeypatch.setattr(parallel, "cpu_threads", lambda: 2)
    generator = torch.Generator().manual_seed(3)
    saved = {f"t{i}": torch.randn(1 << 20, generator=generator) for i in range(20)}
    saved["a"] = np.arange(4 << 20, dtype=np.float32)
    sv.save(saved, tmp_path / "ck")
    target = {k: torch.zeros(1 << 20) for k in saved if k != "a"}
    target["a"] = np.zeros(4 << 20, dtype=np.float32)
    threads: set[str] = set()
    from statevault.adapters.torch_adapter import TorchAdapter

    original = TorchAdapter.copy_into

    def recording(self: TorchAdapter, into: object, loaded: object) -> None:
        threads.add(threading.current_thread().name)
        original(self, into, loaded)

    monkeypatch.setattr(TorchAdapter, "copy_into", recording)
    sv.load(tmp_path / "ck", into=target)
    for key, value in saved.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(target[key], value)
        else:
            assert torch.equal(target[key], value), key
    assert threading.current_thread().name not in threads
    assert len(threads) == 2, threads


def test_held_back_copies_land_before_a_stateful_restore_reads_them(tmp_path: Path) -> None:
    """Host copies are held back to run in parallel, but a Stateful restored after a tensor
    (in the tree's order) sees that tensor's restored value, as without the hold-back."""
    shared = torch.zeros(4)

    class ReadsShared:
        def __init__(self) -> None:
            self.seen: torch.Tensor | None = None

        def state_dict(self) -> dict[str, int]:
            return {"n": 0}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.seen = shared.clone()

    sv.save({"shared": torch.arange(4.0), "reader": {"n": 1}}, tmp_path / "ck")
    reader = ReadsShared()
    sv.load(tmp_path / "ck", into={"shared": shared, "reader": reader})
    assert reader.seen is not None
    assert torch.equal(reader.seen, torch.arange(4.0))


def test_restoring_imports_no_framework_the_program_did_not(tmp_path: Path) -> None:
    """A numpy program (or a Keras one) that saves and restores its state, random streams
    included, never gets torch or TensorFlow imported behind its back."""
    import subprocess
    import sys

    program = (
        "import sys\n"
        "import numpy as np\n"
        "import statevault as sv\n"
        "class Loop:\n"
        "    def __init__(self): self.epoch = 0\n"
        "    def state_dict(self): return {'epoch': self.epoch}\n"
        "    def load_state_dict(self, s): self.epoch = s['epoch']\n"
        "loop = Loop(); loop.epoch = 3\n"
        f"path = {str(tmp_path / 'ck')!r}\n"
        "sv.save({'w': np.arange(4.0), 'loop': loop, 'rng': sv.RNGState()}, path)\n"
        "w, fresh = np.zeros(4), Loop()\n"
        "sv.load(path, into={'w': w, 'loop': fresh, 'rng': sv.RNGState()})\n"
        "assert w.tolist() == [0.0, 1.0, 2.0, 3.0] and fresh.epoch == 3\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported by the restore: {done.stdout.strip()}"
