"""``statevault export`` and ``statevault.interop.export_*``: names, values, HF shards, dtype
conversion, atomic output, refusals, the CLI's JSON and exit codes, and bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.cli.main import main
from statevault.errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from statevault.interop import export_hf, export_safetensors
from statevault.interop.writer import slabs
from tests.progress_helpers import Recorder


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    state = {"model": model, "optimizer": opt, "epoch": 3, "name": "run", "rng": sv.RNGState()}
    sv.save(state, path)
    return path, model, opt


def test_subtree_names_are_key_paths_relative_to_only(ckpt, tmp_path: Path) -> None:
    path, model, _ = ckpt
    out = tmp_path / "model.safetensors"
    report = export_safetensors(path, out, only="model")
    loaded = load_file(out)
    assert list(loaded) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert report.tensors == 4 and report.bytes == sum(v.nbytes for v in loaded.values())
    assert report.skipped == {} and report.files == [str(out)]
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fresh.load_state_dict(loaded)  # loads into the framework as saved
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True)
    )


def test_whole_tree_skips_and_counts_plain_values(ckpt, tmp_path: Path) -> None:
    path, _, opt = ckpt
    out = tmp_path / "all.safetensors"
    report = export_safetensors(path, out)
    with safe_open(out, framework="pt") as handle:
        names = list(handle.keys())
        assert handle.metadata()["format"] == "pt"
        exp_avg = handle.get_tensor("optimizer/state/0/exp_avg")
    assert "model/0.weight" in names and "epoch" not in names and "name" not in names
    assert torch.equal(exp_avg, opt.state[opt.param_groups[0]["params"][0]]["exp_avg"])
    assert report.skipped.get("value", 0) >= 2  # epoch, name, hyperparameters, rng lists...
    assert report.tensors == len(names)


def test_hf_shards_and_index(ckpt, tmp_path: Path) -> None:
    path, model, _ = ckpt
    out = tmp_path / "hf"
    report = export_hf(path, out, only="model", max_shard_bytes=600)  # 0.weight is 512 B
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(files)
    assert (
        index["metadata"]["total_size"]
        == report.bytes
        == sum(v.nbytes for v in model.state_dict().values())
    )
    merged: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(out / name)
        assert sum(t.nbytes for t in part.values()) <= 600 or len(part) == 1
        assert all(index["weight_map"][k] == name for k in part)
        merged |= part
    assert merged.keys() == model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_dtype_conversion_matches_torch(tmp_path: Path) -> None:
    values = torch.randn(64, 33, dtype=torch.float64) * 1e3
    values[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=torch.float64)
    sv.save({"w": values.float(), "h": values.bfloat16(), "i": torch.arange(5)}, tmp_path / "c")
    for target, torch_dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        out = tmp_path / f"{target}.safetensors"
        export_safetensors(tmp_path / "c", out, dtype=target)
        loaded = load_file(out)
        expected_w = values.float().to(torch_dtype)
        assert loaded["w"].dtype == torch_dtype
        exact = {"rtol": 0, "atol": 0, "equal_nan": True}  # bit for bit but NaN payloads
        torch.testing.assert_close(loaded["w"], expected_w, **exact)
        torch.testing.assert_close(loaded["h"], values.bfloat16().to(torch_dtype), **exact)
        assert loaded["i"].dtype == torch.int64  # integers are kept
    export_safetensors(tmp_path / "c", tmp_path / "f32.safetensors", dtype="float32")
    widened = load_file(tmp_path / "f32.safetensors")["h"]
    torch.testing.assert_close(widened, values.bfloat16().float(), rtol=0, atol=0, equal_nan=True)


def test_slabs_tile_in_c_order_within_the_limit() -> None:
    for shape, itemsize, limit in [
        ((7, 5, 3), 4, 40),
        ((4, 1000), 8, 100),
        ((9,), 2, 4),
        ((), 4, 1),
    ]:
        cursor = 0
        for box in slabs(shape, itemsize, limit):
            start = int(np.ravel_multi_index(box.offsets, shape)) if shape else 0
            assert start == cursor  # contiguous, in order
            assert box.numel * itemsize <= max(limit, itemsize)
            cursor += box.numel
        assert cursor == math.prod(shape)
    assert list(slabs((3, 0, 2), 4, 8)) == []


def test_small_buffers_give_the_same_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = {"a": torch.randn(5, 7, 3), "b": torch.randn(40), "s": torch.tensor(2.5)}
    sv.save(state, tmp_path / "c")
    export_safetensors(tmp_path / "c", tmp_path / "big.safetensors")
    export_safetensors(tmp_path / "c", tmp_path / "small.safetensors", buffer_bytes=12)
    assert (tmp_path / "big.safetensors").read_bytes() == (
        tmp_path / "small.safetensors"
    ).read_bytes()
    loaded = load_file(tmp_path / "small.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_numpy_checkpoint_exports_np_format(tmp_path: Path) -> None:
    arrays = {"x": np.arange(12, dtype=np.int32).reshape(3, 4), "y": np.array([True, False])}
    sv.save({"arrays": arrays}, tmp_path / "c")
    export_safetensors(tmp_path / "c", tmp_path / "o.safetensors", only="arrays")
    with safe_open(tmp_path / "o.safetensors", framework="np") as handle:
        assert handle.metadata()["format"] == "np"
        assert all(np.array_equal(handle.get_tensor(k), v) for k, v in arrays.items())


def test_refusals(ckpt, tmp_path: Path) -> None:
    path, _, _ = ckpt
    out = tmp_path / "o.safetensors"
    export_safetensors(path, out, only="model")
    before = out.read_bytes()
    with pytest.raises(sv.CheckpointExistsError):
        export_safetensors(path, out, only="model")
    export_safetensors(path, out, only="optimizer", overwrite=True)
    assert out.read_bytes() != before
    with pytest.raises(CheckpointError, match="nothing at 'nope'"):
        export_safetensors(path, tmp_path / "x.safetensors", only="nope")
    with pytest.raises(CheckpointError, match="local path"):
        export_safetensors(path, "memory://bucket/x.safetensors")
    with pytest.raises(CheckpointError, match="dtype"):
        export_safetensors(path, tmp_path / "x.safetensors", dtype="int8")
    sv.save({"z": np.ones(3, dtype=np.complex128)}, tmp_path / "cplx")
    with pytest.raises(UnsupportedValueError, match="complex128"):
        export_safetensors(tmp_path / "cplx", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_damaged_checkpoint_leaves_no_output(ckpt, tmp_path: Path) -> None:
    path, _, _ = ckpt
    entry = open_checkpoint(path).manifest.tensors[0]
    with open(path / entry.file, "r+b") as f:
        f.seek(entry.offset)
        byte = f.read(1)
        f.seek(entry.offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        export_safetensors(path, tmp_path / "o.safetensors", only="model")
    with pytest.raises(CorruptCheckpointError):
        export_hf(path, tmp_path / "hf", only="model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert main(["export", str(path), "--to", str(tmp_path / "o.safetensors")]) == 1


def test_cli_json_and_exit_codes(ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = ckpt
    out = tmp_path / "m.safetensors"
    assert main(["export", str(path), "--to", str(out), "--only", "model", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["tensors"] == 4 and document["files"] == [str(out)]
    assert document["skipped_total"] == 0 and document["format"] == "safetensors"
    assert main(["export", str(path), "--to", str(tmp_path / "all.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "non-array values not exported" in text
    hf = tmp_path / "hf"
    args = ["export", str(path), "--to", str(hf), "--format", "hf", "--max-shard-size", "1KB"]
    assert main([*args, "--only", "model", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"][-1].endswith("index.json")
    assert main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--max-shard-size", "lots"]) == 2
    assert main(["export", str(tmp_path / "missing"), "--to", str(tmp_path / "x")]) == 2
    assert main(["export", str(path)]) == 2  # --to is required


BIG_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from statevault.interop import export_safetensors
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    export_safetensors(sys.argv[1], sys.argv[2])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """16 x 16 MiB tensors (256 MiB) exported by a fresh process whose peak RSS grows by far
    less than that: the export streams one slab at a time."""
    count, size = 16, 16 << 20
    sv.save(
        {f"t{i}": np.full(size // 4, i, dtype=np.float32) for i in range(count)}, tmp_path / "c"
    )
    out = tmp_path / "big.safetensors"
    script = "import statevault.interop, numpy, safetensors\n" + BIG_SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c"), str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    growth = int(result.stdout.strip())
    assert growth < 64 << 20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert out.stat().st_size > count * size
    with safe_open(out, framework="np") as handle:
        for i in (0, 7, 15):
            piece = handle.get_slice(f"t{i}")[size // 4 - 3 :]
            assert (piece == i).all()


def test_interop_and_cli_import_no_framework() -> None:
    code = (
        "import sys, statevault.interop, statevault.cli.main\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_url_source_tied_weights_and_empty_exports(tmp_path: Path) -> None:
    shared = torch.randn(3, 2)
    url = "memory://statevault-export-test/ckpt"
    sv.save({"enc": shared, "dec": shared, "zero": torch.empty(0, 4), "n": 1}, url)
    report = export_safetensors(url, tmp_path / "o.safetensors")
    loaded = load_file(tmp_path / "o.safetensors")
    assert torch.equal(loaded["enc"], shared) and torch.equal(loaded["dec"], shared)
    assert loaded["zero"].shape == (0, 4) and report.skipped == {"value": 1}
    sv.save({"epoch": 1}, tmp_path / "plain")
    report = export_safetensors(tmp_path / "plain", tmp_path / "empty.safetensors")
    assert report.tensors == 0 and load_file(tmp_path / "empty.safetensors") == {}
    export_hf(tmp_path / "plain", tmp_path / "hf")
    assert (tmp_path / "hf" / "model-00001-of-00001.safetensors").exists()


def test_export_onto_a_directory_is_refused_and_leaves_it(ckpt, tmp_path: Path) -> None:
    path, _, _ = ckpt
    target = tmp_path / "dir"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(sv.CheckpointExistsError, match="is a directory") as caught:
            export_safetensors(path, target, only="model", overwrite=overwrite)
        assert str(target) in str(caught.value)
        assert [p.name for p in target.iterdir()] == ["keep.txt"]
    # --format hf replaces an earlier HF export, never a directory it did not write
    with pytest.raises(CheckpointError, match=r"keep\.txt"):
        export_hf(path, target, only="model", overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    export_hf(path, tmp_path / "hf", only="model")
    export_hf(path, tmp_path / "hf", only="optimizer", overwrite=True)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "state.0.exp_avg" in index["weight_map"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dir", "hf"]


def test_hf_names_join_key_path_parts_with_dots(tmp_path: Path) -> None:
    layers = {"layers": [{"weight": torch.ones(2, 2)}, {"weight": torch.zeros(2, 2)}]}
    sv.save({"model": {**layers, "lm_head.weight": torch.ones(3)}, "step": 7}, tmp_path / "c")
    report = export_hf(tmp_path / "c", tmp_path / "hf")  # one subtree holds every array
    names = list(load_file(tmp_path / "hf" / "model-00001-of-00001.safetensors"))
    assert names == ["layers.0.weight", "layers.1.weight", "lm_head.weight"]
    assert report.only == "model"
    export_hf(tmp_path / "c", tmp_path / "hf2", only="model/layers")
    assert list(load_file(tmp_path / "hf2" / "model-00001-of-00001.safetensors")) == [
        "0.weight",
        "1.weight",
    ]
    # the plain safetensors export keeps statevault's key paths
    export_safetensors(tmp_path / "c", tmp_path / "all.safetensors")
    assert "model/layers/0/weight" in load_file(tmp_path / "all.safetensors")


def test_hf_export_of_several_subtrees_is_refused(ckpt, tmp_path: Path) -> None:
    path, _, _ = ckpt
    with pytest.raises(CheckpointError, match="only='model'") as caught:
        export_hf(path, tmp_path / "hf")
    assert "model, optimizer, rng" in str(caught.value)
    assert not (tmp_path / "hf").exists()
    # arrays at the root beside a subtree: also more than one model
    sv.save({"model": {"w": torch.ones(2)}, "scale": torch.ones(1)}, tmp_path / "mixed")
    with pytest.raises(CheckpointError, match="model, scale"):
        export_hf(tmp_path / "mixed", tmp_path / "hf")
    # a flat state dict at the root is one model: exported as it is
    sv.save(_model().state_dict(), tmp_path / "flat")
    export_hf(tmp_path / "flat", tmp_path / "hf")
    assert list(load_file(tmp_path / "hf" / "model-00001-of-00001.safetensors")) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]


def test_export_reports_progress_in_bytes(ckpt, tmp_path: Path) -> None:
    path, _, _ = ckpt
    recorder = Recorder()
    report = export_safetensors(
        path, tmp_path / "o.safetensors", progress=recorder, buffer_bytes=64
    )
    assert recorder.totals == [report.bytes] and report.bytes > 64
    assert sum(recorder.advances) == report.bytes and max(recorder.advances) <= 64
    recorder = Recorder()
    report = export_hf(path, tmp_path / "hf", only="model", max_shard_bytes=600, progress=recorder)
    assert len(report.files) > 2  # several shards, one bar
    assert recorder.totals == [report.bytes] and sum(recorder.advances) == report.bytes
