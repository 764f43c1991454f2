"""Property: any nested tree of supported values survives a save/load round trip unchanged."""

from __future__ import annotations

import math
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import statevault as sv
from statevault.format import tree, tree_paths

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.complex_numbers(allow_nan=False),
)
hashable_keys = st.one_of(
    st.text(max_size=8),
    st.integers(-5, 5),
    st.booleans(),
    st.none(),
    st.tuples(st.integers(0, 3), st.text(max_size=3)),
)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int8, np.uint16, np.int64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
torch_tensors = st.builds(
    lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(dtype),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.complex64]),
)
leaves = st.one_of(scalars, arrays, torch_tensors)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(hashable_keys, children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=4).map(OrderedDict),
    ),
    max_leaves=25,
)


def assert_identical(got: Any, want: Any, path: str = "") -> None:
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    elif isinstance(want, float):
        assert got == want and math.copysign(1, got) == math.copysign(1, want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for (gk, gv), (wk, wv) in zip(got.items(), want.items(), strict=True):
            assert type(gk) is type(wk), path
            assert_identical(gv, wv, tree.join_path(path, wk))
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_identical(g, w, tree.join_path(path, i))
    else:
        assert got == want, path


@settings(max_examples=120)
@given(state=st.dictionaries(st.text(min_size=1, max_size=8), trees, max_size=5))
def test_any_tree_roundtrips_exactly(state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        sv.save(state, Path(directory) / "ck")
        loaded = sv.load(Path(directory) / "ck")
        assert_identical(dict(loaded), state)
        assert sv.verify(Path(directory) / "ck").ok


@settings(max_examples=300)
@given(value=trees.filter(lambda v: not _has_arrays(v)))
def test_tree_codec_alone_is_lossless(value: Any) -> None:
    node = tree.encode(value, lambda v, p: None)
    assert_identical(tree.decode(node, lambda i: None), value)


def _has_arrays(value: Any) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return True
    if isinstance(value, dict):
        return any(_has_arrays(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_arrays(v) for v in value)
    return False


@given(value=trees)
def test_tensor_ids_are_exactly_the_tensors_the_decoder_resolves(value: Any) -> None:
    """``tree.tensor_ids`` (what a load reads and verifies) names every tensor node the
    decoder asks for, and nothing else."""
    ids = iter(range(1 << 30))

    def leaf(obj: Any, path: str) -> Any:
        if isinstance(obj, (np.ndarray, torch.Tensor)):
            return {"$": "tensor", "id": next(ids)}
        return None

    encoded = tree.encode({"root": value}, leaf)
    resolved: set[int] = set()

    def resolve(index: int) -> int:
        resolved.add(index)
        return index

    tree.decode(encoded, resolve)
    assert tree_paths.tensor_ids(encoded) == resolved
    assert tree_paths.tensor_ids(encoded, tag="sharded") == set()
