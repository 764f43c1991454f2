"""Export of a format-2 checkpoint: DTensors saved in chunks by 2 gloo ranks come out of
``statevault export`` as the full tensors, whatever slab size the export reads them in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.cli.main import main
from statevault.interop import export_hf, export_safetensors
from tests.dist_helpers import run_ranks


def _full_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return {
        "rows": torch.randn(7, 5, generator=generator),  # uneven: 4 + 3 rows
        "cols": torch.randn(3, 6, generator=generator).to(torch.bfloat16),  # sharded on dim 1
        "cube": torch.randn(4, 3, 2, dtype=torch.float64, generator=generator),
    }


def save_sharded(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full_tensors()
    state: dict[str, Any] = {
        "model": {
            "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
            "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
            "cube": distribute_tensor(full["cube"], mesh, [Shard(0)]),
            "bias": distribute_tensor(torch.arange(4.0), mesh, [Replicate()]),
        },
        "pos": sv.PerRank({"i": rank}),
        "step": 9,
    }
    sv.save(state, path)


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    run_ranks(save_sharded, 2, str(path))
    manifest = open_checkpoint(path).manifest
    chunks = {row.path: len(row.chunks) for row in manifest.sharded}
    assert manifest.format_version == 3 and manifest.indexes is not None
    assert chunks["model/rows"] == chunks["model/cols"] == chunks["model/cube"] == 2
    return path


def _expected() -> dict[str, torch.Tensor]:
    return {**_full_tensors(), "bias": torch.arange(4.0)}


@pytest.mark.parametrize("buffer_bytes", [16 << 20, 24, 1])
def test_sharded_tensors_are_consolidated(
    sharded_ckpt: Path, tmp_path: Path, buffer_bytes: int
) -> None:
    out = tmp_path / "model.safetensors"
    report = export_safetensors(sharded_ckpt, out, only="model", buffer_bytes=buffer_bytes)
    loaded = load_file(out)
    expected = _expected()
    assert loaded.keys() == expected.keys() and report.tensors == 4
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name


def test_whole_sharded_checkpoint_skips_per_rank_state(
    sharded_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    args = [str(sharded_ckpt), "--to", str(out), "--format", "hf", "--max-shard-size", "100B"]
    assert main(["export", *args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["tensors"] == 4
    assert document["skipped"] == {"per_rank": 1, "value": 1}  # pos, step
    assert document["only"] == "model"  # the one top-level key holding arrays: the model
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        merged |= load_file(out / name)
    expected = _expected()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    report = export_hf(sharded_ckpt, tmp_path / "hf2", only="model/cols")
    assert report.tensors == 1  # a single array exported by its own name
    assert list(load_file(tmp_path / "hf2" / "model-00001-of-00001.safetensors")) == ["cols"]
