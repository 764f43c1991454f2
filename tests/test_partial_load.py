"""load(only=...): one subtree, reading and verifying only its tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import statevault as sv
from statevault.checkpoint import open_checkpoint


def _save(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model, "optimizer": optimizer, "step": 7, "pair": (torch.ones(2), {1: "a"})}
    sv.save(state, tmp_path / "ck")
    return tmp_path / "ck", state


def test_subtrees_by_key_path(tmp_path: Path) -> None:
    path, state = _save(tmp_path)
    model = state["model"]
    assert isinstance(model, torch.nn.Linear)
    loaded = sv.load(path, only="model")
    assert list(loaded) == ["weight", "bias"] and torch.equal(loaded["weight"], model.weight)
    moments = sv.load(path, only="optimizer/state/0")
    assert set(moments) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(sv.load(path, only="pair/0"), torch.ones(2))
    assert sv.load(path, only="pair/1/1") == "a" and sv.load(path, only="step") == 7
    with pytest.raises(sv.CheckpointError, match="nothing at 'model/nope'"):
        sv.load(path, only="model/nope")


def test_a_partial_load_reads_only_its_tensors(tmp_path: Path) -> None:
    """Damage outside the subtree is not read, so it does not stop the subtree's load; the
    whole load (and verify) still refuses the checkpoint."""
    path, _ = _save(tmp_path)
    manifest = open_checkpoint(path).manifest
    row = next(r for r in manifest.tensors if r.path.startswith("optimizer/"))
    shard = path / row.file
    data = bytearray(shard.read_bytes())
    data[row.offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert torch.is_tensor(sv.load(path, only="model")["weight"])
    with pytest.raises(sv.CorruptCheckpointError, match=row.path):
        sv.load(path, only="optimizer")
    with pytest.raises(sv.CorruptCheckpointError):
        sv.load(path)


def test_a_partial_load_restores_into_the_subtrees_objects(tmp_path: Path) -> None:
    path, state = _save(tmp_path)
    fresh = torch.nn.Linear(4, 3)
    sv.load(path, only="model", into={"weight": fresh.weight, "bias": fresh.bias})
    model = state["model"]
    assert isinstance(model, torch.nn.Linear)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
