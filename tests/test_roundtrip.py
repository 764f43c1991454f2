"""Exact round trips: every dtype, odd tensor geometries, ties, numpy, python types."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.format import dtypes


def _roundtrip(state: Any, tmp_path: Path, **load_args: Any) -> Any:
    sv.save(state, tmp_path / "ck")
    return sv.load(tmp_path / "ck", **load_args)


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bits reinterpreted as ``dtype``: exercises every bit pattern, NaNs included."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape) * itemsize
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


TORCH_DTYPES = [getattr(torch, name) for name in dtypes.DTYPES]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype_roundtrips_bit_exactly(dtype: torch.dtype, tmp_path: Path) -> None:
    tensors = {
        "matrix": _random_tensor(dtype, (5, 7)),
        "scalar": _random_tensor(dtype, ()),
        "empty": _random_tensor(dtype, (0, 3)),
    }
    loaded = _roundtrip(tensors, tmp_path)
    for key, original in tensors.items():
        got = loaded[key]
        assert got.dtype == original.dtype and got.shape == original.shape
        assert torch.equal(_bits(got), _bits(original)), key


def test_non_contiguous_views_and_conjugates(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    complex_base = torch.randn(4, 3, dtype=torch.complex64)
    state = {
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::2, 1::2],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "conj": complex_base.conj(),
        "neg_view": torch._neg_view(torch.randn(3)),
    }
    loaded = _roundtrip(state, tmp_path)
    for key, original in state.items():
        assert torch.equal(loaded[key], original.resolve_conj().resolve_neg()), key
        assert loaded[key].is_contiguous()


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    embedding = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = embedding.weight  # weight tying as in language models
    model = torch.nn.ModuleDict({"emb": embedding, "head": head})
    sv.save({"model": model}, tmp_path / "ck")
    manifest = sv.checkpoint.open_checkpoint(tmp_path / "ck").manifest
    assert len(manifest.tensors) == 1, "tied weights must be stored once"
    loaded = sv.load(tmp_path / "ck")
    assert loaded["model"]["emb.weight"] is loaded["model"]["head.weight"]
    fresh = torch.nn.ModuleDict(
        {"emb": torch.nn.Embedding(50, 16), "head": torch.nn.Linear(16, 50, bias=False)}
    )
    fresh["head"].weight = fresh["emb"].weight
    sv.load(tmp_path / "ck", into={"model": fresh})
    assert fresh["head"].weight is fresh["emb"].weight
    assert torch.equal(fresh["emb"].weight, embedding.weight)


def test_distinct_views_of_one_storage_are_not_tied(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    loaded = _roundtrip({"a": base[:5], "b": base[5:], "c": base[:5].clone()}, tmp_path)
    assert torch.equal(loaded["a"], torch.arange(5.0))
    assert torch.equal(loaded["b"], torch.arange(5.0, 10.0))
    assert loaded["a"] is not loaded["c"]


def test_parameters_and_requires_grad_are_kept(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    leaf = torch.randn(2, requires_grad=True)
    loaded = _roundtrip({"p": param, "frozen": frozen, "leaf": leaf}, tmp_path)
    assert type(loaded["p"]) is torch.nn.Parameter and loaded["p"].requires_grad
    assert type(loaded["frozen"]) is torch.nn.Parameter and not loaded["frozen"].requires_grad
    assert type(loaded["leaf"]) is torch.Tensor and loaded["leaf"].requires_grad
    assert torch.equal(loaded["p"].detach(), param.detach())


NUMPY_DTYPES = [row.numpy for row in dtypes.DTYPES.values() if row.numpy is not None]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_arrays_come_back_as_numpy(dtype: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=6 * 4 * np.dtype(dtype).itemsize, dtype=np.uint8)
    array = raw.view(dtype).reshape(6, 4) if dtype != "bool" else raw.reshape(-1, 4)[:6] % 2 == 1
    state = {"a": array, "fortran": np.asfortranarray(array), "scalar0d": array[:1, :1].reshape(())}
    loaded = _roundtrip(state, tmp_path)
    for key, original in state.items():
        got = loaded[key]
        assert type(got) is np.ndarray and got.dtype == original.dtype, key
        assert got.shape == original.shape and got.tobytes() == original.tobytes(), key


def test_big_endian_numpy_keeps_values(tmp_path: Path) -> None:
    array = np.arange(6, dtype=">i4")
    loaded = _roundtrip({"a": array}, tmp_path)
    assert loaded["a"].tolist() == array.tolist()


def test_numpy_scalars_keep_type_and_value(tmp_path: Path) -> None:
    state = {
        "f32": np.float32(1 / 3),
        "f16": np.float16(0.1),
        "i64": np.int64(-(2**62)),
        "u8": np.uint8(255),
        "b": np.bool_(True),
        "c": np.complex64(1 + 2j),
        "nan": np.float64("nan"),
    }
    loaded = _roundtrip(state, tmp_path)
    for key, original in state.items():
        assert type(loaded[key]) is type(original), key
        if key != "nan":
            assert loaded[key] == original, key
    assert np.isnan(loaded["nan"])


def test_python_types_are_exact(tmp_path: Path) -> None:
    state: dict[Any, Any] = {
        "int": 2**70,
        "neg": -3,
        "float": 0.1,
        "negzero": -0.0,
        "inf": math.inf,
        "ninf": -math.inf,
        "nan": math.nan,
        "true": True,
        "none": None,
        "str": "ünïcode \x00 \n",
        "bytes": bytes(range(256)),
        "complex": 1.5 - 2j,
        "tuple": (1, (2, 3), [4]),
        "list": [1, "a", None],
        "empty": ({}, [], ()),
        7: "int key",
        (1, "a"): "tuple key",
        None: "none key",
        2.5: "float key",
        b"k": "bytes key",
        "odict": OrderedDict([("b", 1), ("a", 2)]),
        "order": {"z": 1, "a": 2, "m": 3},
    }
    loaded = _roundtrip(state, tmp_path)
    assert set(loaded) == set(state)
    for key, original in state.items():
        got = loaded[key]
        if key == "nan":
            assert math.isnan(got)
            continue
        assert got == original and type(got) is type(original), key
    assert math.copysign(1.0, loaded["negzero"]) == -1.0
    assert list(loaded["order"]) == ["z", "a", "m"]
    assert type(loaded["tuple"][1]) is tuple and type(loaded["tuple"][2]) is list


def test_optimizer_state_keeps_int_keys(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    loaded = _roundtrip({"opt": optimizer.state_dict()}, tmp_path)
    assert list(loaded["opt"]["state"]) == [0, 1]
    assert loaded["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(
        loaded["opt"]["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"]
    )


def test_module_metadata_is_kept(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    loaded = _roundtrip({"model": model}, tmp_path)
    assert type(loaded["model"]) is OrderedDict
    assert loaded["model"]._metadata == model.state_dict()._metadata


def test_metadata_is_stored_and_must_be_plain(tmp_path: Path) -> None:
    sv.save({"x": 1}, tmp_path / "ck", metadata={"run": "a", "lr": 0.1, "tags": ("x", 1)})
    manifest = sv.checkpoint.open_checkpoint(tmp_path / "ck").manifest
    from statevault.format.tree import decode

    assert decode(manifest.metadata, lambda i: None) == {"run": "a", "lr": 0.1, "tags": ("x", 1)}
    with pytest.raises(sv.UnsupportedValueError, match="metadata/t"):
        sv.save({"x": 1}, tmp_path / "ck2", metadata={"t": torch.zeros(1)})


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"a": {"b": [1, _Opaque()]}}, "a/b/1"),
        ({"s": {1, 2}}, "s"),
        ({"d": __import__("collections").defaultdict(int)}, "dict subclass"),
        ({"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}, "q"),
        ({"sp": torch.eye(2).to_sparse()}, "to_dense"),
        ({"o": np.array([object()], dtype=object)}, "pickle"),
        ({"k": {_Opaque(): 1}}, "dict key"),
        ({"m": torch.empty(2, device="meta")}, "meta"),
    ],
)
def test_unsupported_values_name_their_key_path(value: Any, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(sv.UnsupportedValueError) as info:
        sv.save(value, tmp_path / "ck")
    assert fragment in str(info.value)
    assert not (tmp_path / "ck").exists()
    assert list(tmp_path.iterdir()) == [], "a refused save must leave nothing behind"


def test_device_argument_places_tensors(tmp_path: Path) -> None:
    loaded = _roundtrip({"t": torch.ones(2)}, tmp_path, device="cpu")
    assert loaded["t"].device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_save_and_load_to_cuda(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64, device="cuda"), "b": torch.randn(3, dtype=torch.bfloat16)}
    loaded = _roundtrip(state, tmp_path, device="cuda")
    assert loaded["w"].is_cuda and torch.equal(loaded["w"], state["w"])
    assert loaded["b"].is_cuda and torch.equal(loaded["b"].cpu(), state["b"])


def test_many_tiny_tensors_are_packed_into_one_file(tmp_path: Path) -> None:
    sv.save({f"t{i}": torch.full((3,), float(i)) for i in range(500)}, tmp_path / "ck")
    shards = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(shards) == 1
    loaded = sv.load(tmp_path / "ck")
    assert all(torch.equal(loaded[f"t{i}"], torch.full((3,), float(i))) for i in range(500))


def test_large_state_spreads_over_files_and_shards_open_with_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = {f"layer{i}": torch.randn(8 << 20 >> 2) for i in range(20)}  # 20 x 8 MiB
    sv.save(state, tmp_path / "ck")
    shards = sorted((tmp_path / "ck").glob("*.safetensors"))
    assert 2 <= len(shards) <= 8
    seen: dict[str, torch.Tensor] = {}
    for shard in shards:
        seen.update(load_file(shard))
    assert set(seen) == set(state)
    assert all(torch.equal(seen[k], v) for k, v in state.items())


def test_a_key_named_like_safetensors_metadata_keeps_shards_valid(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sv.save({"__metadata__": torch.ones(2)}, tmp_path / "ck")
    (shard,) = (tmp_path / "ck").glob("*.safetensors")
    assert torch.equal(next(iter(load_file(shard).values())), torch.ones(2))
    assert torch.equal(sv.load(tmp_path / "ck")["__metadata__"], torch.ones(2))


def test_a_parameter_and_its_plain_alias_keep_their_types(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    loaded = _roundtrip({"sd": model.state_dict(), "w": model.weight}, tmp_path)
    assert type(loaded["w"]) is torch.nn.Parameter
    assert type(loaded["sd"]["weight"]) is torch.Tensor
    assert torch.equal(loaded["w"].detach(), loaded["sd"]["weight"])


def test_array_subclasses_and_huge_ints_are_refused_before_writing(tmp_path: Path) -> None:
    for value in ({"m": np.matrix([[1.0]])}, {"i": 10**5000}):
        with pytest.raises(sv.UnsupportedValueError):
            sv.save(value, tmp_path / "ck")
        assert list(tmp_path.iterdir()) == []


def test_tensors_in_a_shard_are_aligned_to_their_item_size(tmp_path: Path) -> None:
    state = {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(3, dtype=torch.int64)}
    state |= {"c": torch.ones(1, dtype=torch.float16), "d": torch.ones(2, dtype=torch.complex128)}
    sv.save(state, tmp_path / "ck")
    manifest = sv.checkpoint.open_checkpoint(tmp_path / "ck").manifest
    for row in manifest.tensors:
        itemsize = dtypes.lookup(row.dtype).itemsize
        assert row.offset % itemsize == 0, row.path
