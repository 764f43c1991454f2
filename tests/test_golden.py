"""Golden files: freeze format version 1.

tests/golden/v1/ckpt/ is a checkpoint written by tests/golden/make_golden.py from a deterministic
state (several dtypes including bfloat16, float8 and complex, numpy arrays and scalars, a 0-d and
an empty tensor, tied tensors, Parameters, a Stateful module, torch's ``_metadata``, and plain
values of every kind). These tests check that

(a) today's statevault loads the committed checkpoint as exactly that state (old files stay
    readable);
(b) saving the same state today writes byte-identical shards and the same manifest body, apart
    from the volatile ``info`` fields: ``created``, ``created_unix``, ``versions`` and the
    timings and rates in ``info.save`` (keys ending in ``_s``); the writer has not drifted;
(c) the shards open with the stock ``safetensors`` library with the right tensors.

If (b) fails after a *deliberate* format change, regenerate with
``python tests/golden/make_golden.py`` (and bump ``format_version`` if old readers cannot read
the new files; a released version keeps its golden directory, see make_golden.py). If (a) fails,
files users already have on disk no longer load: that is a compatibility break, not a test bug.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.format import dtypes
from statevault.format import tree as tree_codec
from tests import dist_workloads as work
from tests.golden.make_golden import GOLDEN_DIR, golden_metadata, golden_state

VOLATILE_INFO = ("created", "created_unix", "versions")  # plus every timing in info.save


def is_timing(key: str) -> bool:
    """info.save figures that differ on every save: seconds (``*_s``) and rates (``*_gib_s``)."""
    return key.endswith("_s")


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A private copy of the committed golden checkpoint."""
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN_DIR, copy)
    return copy


def expected_loaded(value: Any) -> Any:
    """What a load gives back for a saved value: Stateful objects come back as their state."""
    if isinstance(value, torch.nn.Module):
        return expected_loaded(value.state_dict())
    if isinstance(value, dict):
        result = type(value)((k, expected_loaded(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            result._metadata = value._metadata  # type: ignore[attr-defined]
        return result
    if isinstance(value, list):
        return [expected_loaded(v) for v in value]
    if isinstance(value, tuple):
        return tuple(expected_loaded(v) for v in value)
    return value


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def assert_identical(actual: Any, expected: Any, where: str = "<root>") -> None:
    """Exact equality: same types (Parameter vs Tensor, tuple vs list, OrderedDict vs dict,
    numpy scalar types), dtypes, shapes and bytes; nan equals nan; -0.0 differs from 0.0."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert actual.requires_grad == expected.requires_grad, f"{where}: requires_grad"
        assert actual.device.type == "cpu", where
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{where}: values differ"
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), f"{where}: values differ"
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert type(next(k for k in actual if k == key)) is type(key), f"{where}: key {key!r}"
            assert_identical(actual[key], expected[key], f"{where}/{key!r}")
        meta = getattr(expected, "_metadata", None)
        assert getattr(actual, "_metadata", None) == meta, f"{where}: _metadata"
        if meta is not None:
            assert type(actual._metadata) is type(meta), f"{where}: _metadata type"
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}/{i}")
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected) or (
            math.isnan(actual) and math.isnan(expected)
        ), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, complex):
        assert_identical(actual.real, expected.real, f"{where}.real")
        assert_identical(actual.imag, expected.imag, f"{where}.imag")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def array_leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every tensor / array of a state by its key path, spelled as in the manifest."""
    found: dict[str, Any] = {}
    if isinstance(value, torch.nn.Module):
        return array_leaves(value.state_dict(), path)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        found.setdefault(path, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            for sub, leaf in array_leaves(item, tree_codec.join_path(path, key)).items():
                found.setdefault(sub, leaf)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found.update(array_leaves(item, tree_codec.join_path(path, i)))
    return found


def stable_body(manifest_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(envelope without body and checksum, body without the volatile info fields)."""
    document = json.loads(manifest_path.read_text())
    body = document.pop("body")
    document.pop("checksum")
    for key in VOLATILE_INFO:
        body["info"].pop(key)
    save = body["info"]["save"]
    body["info"]["save"] = {k: v for k, v in save.items() if not is_timing(k)}
    return document, body


# (a) -----------------------------------------------------------------------------------------


def test_golden_checkpoint_loads_as_the_recipe(golden: Path) -> None:
    loaded = sv.load(golden)
    assert isinstance(loaded, sv.LoadedState)
    assert_identical(dict(loaded), expected_loaded(golden_state()))
    # Tied tensors are stored once and come back as one tensor.
    assert loaded["tied_a"] is loaded["nested"]["tied_b"]
    assert loaded["tensors"]["param"].requires_grad
    assert not loaded["tensors"]["frozen"].requires_grad


def test_golden_checkpoint_metadata_and_verify(golden: Path) -> None:
    report = sv.verify(golden)
    assert report.ok, report.problems
    manifest = open_checkpoint(golden).manifest
    assert report.tensors == len(manifest.tensors) == len(array_leaves(golden_state())) - 1
    assert_identical(tree_codec.decode(manifest.metadata, lambda i: i), golden_metadata())
    document = json.loads((golden / "manifest.json").read_text())
    assert (document["format"], document["format_version"]) == ("statevault", 1)


def test_golden_checkpoint_restores_into_live_objects(golden: Path) -> None:
    state = golden_state()
    target = golden_state()["model"]
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.zero_()
    with pytest.warns(UserWarning, match="partial restore"):
        result = sv.load(golden, into={"model": target}, strict=False)
    assert result.unexpected and not result.missing and not result.mismatched
    assert_identical(target.state_dict(), state["model"].state_dict())


# (b) -----------------------------------------------------------------------------------------


def test_saving_the_recipe_today_reproduces_the_golden_bytes(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    sv.save(golden_state(), fresh, metadata=golden_metadata())
    golden_files = sorted(p.name for p in GOLDEN_DIR.iterdir())
    # A save also leaves its marker (FORMAT.md 1.2: who wrote it, when; not golden bytes). The
    # golden checkpoint predates markers and still loads: readers never need one.
    assert sorted(p.name for p in fresh.iterdir()) == sorted([*golden_files, ".statevault-save"])
    assert "manifest.json" in golden_files and len(golden_files) >= 2
    for name in golden_files:
        if name != "manifest.json":
            assert (fresh / name).read_bytes() == (GOLDEN_DIR / name).read_bytes(), (
                f"{name} is not byte-identical to the golden shard; if the format changed on "
                "purpose, regenerate with python tests/golden/make_golden.py"
            )
    golden_envelope, golden_body = stable_body(GOLDEN_DIR / "manifest.json")
    fresh_envelope, fresh_body = stable_body(fresh / "manifest.json")
    assert fresh_envelope == golden_envelope
    for key in golden_body:
        assert fresh_body[key] == golden_body[key], f"manifest body field {key!r} changed"
    assert fresh_body == golden_body


@pytest.mark.parametrize("which", ["golden", "fresh"])
def test_manifest_bytes_follow_the_envelope_exactly(tmp_path: Path, which: str) -> None:
    """FORMAT.md section 3: the exact envelope, a CRC32C of the exact body bytes, and the body
    as json.dumps(body, ensure_ascii=True, allow_nan=False, indent=1) writes it."""
    directory = GOLDEN_DIR
    if which == "fresh":
        directory = tmp_path / "fresh"
        sv.save(golden_state(), directory, metadata=golden_metadata())
    data = (directory / "manifest.json").read_bytes()
    match = re.fullmatch(
        rb'\{"format":"statevault","format_version":1,"checksum":"crc32c:([0-9a-f]{8})",'
        rb'"body":(.*)\}\n',
        data,
        flags=re.DOTALL,
    )
    assert match is not None, data[:120]
    body_bytes = match.group(2)
    assert int(match.group(1), 16) == crc32c.crc32c(body_bytes)
    body = json.loads(body_bytes)
    assert list(body) == ["info", "metadata", "files", "tensors", "tree"]
    rewritten = json.dumps(body, ensure_ascii=True, allow_nan=False, indent=1).encode("ascii")
    assert rewritten == body_bytes


# (c) -----------------------------------------------------------------------------------------


def test_shards_open_with_stock_safetensors(golden: Path) -> None:
    manifest = open_checkpoint(golden).manifest
    leaves = array_leaves(golden_state())
    checked_native = checked_raw = 0
    for file in manifest.files:
        shard = golden / file.name
        rows = [t for t in manifest.tensors if t.file == file.name]
        with safetensors.safe_open(str(shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "writer": "statevault"}
            assert sorted(handle.keys()) == sorted(t.path for t in rows)
            for row in rows:
                stored = handle.get_tensor(row.path)
                expected = leaves[row.path]
                if isinstance(expected, np.ndarray):
                    expected_bytes = np.ascontiguousarray(expected).tobytes()
                else:
                    expected_bytes = tensor_bytes(expected)
                if dtypes.lookup(row.dtype).safetensors is None:  # kept as raw bytes
                    assert stored.dtype == torch.uint8 and stored.shape == (row.nbytes,)
                    checked_raw += 1
                else:
                    want = (
                        torch.from_numpy(expected) if isinstance(expected, np.ndarray) else expected
                    )
                    assert stored.dtype == want.dtype, row.path
                    assert tuple(stored.shape) == tuple(want.shape), row.path
                    checked_native += 1
                assert tensor_bytes(stored) == expected_bytes, row.path
        whole = safetensors.torch.load_file(str(shard))
        assert set(whole) == {t.path for t in rows}
        assert torch.equal(whole["tensors/bf16"], golden_state()["tensors"]["bf16"])
    assert checked_native >= 20 and checked_raw == 2  # float8_e8m0fnu, complex128


def test_golden_checkpoint_is_small_and_self_contained() -> None:
    names = sorted(p.name for p in GOLDEN_DIR.iterdir())
    assert names == ["data-r00000-00000.safetensors", "manifest.json"]
    assert sum((GOLDEN_DIR / n).stat().st_size for n in names) < 64 * 1024
    assert not any(p.is_symlink() for p in GOLDEN_DIR.iterdir())


def test_golden_state_covers_the_format() -> None:
    """The recipe keeps covering what it is meant to freeze."""
    leaves = array_leaves(golden_state())
    torch_dtypes = {v.dtype for v in leaves.values() if isinstance(v, torch.Tensor)}
    assert {torch.bfloat16, torch.float8_e4m3fn, torch.complex64, torch.bool} <= torch_dtypes
    assert any(isinstance(v, np.ndarray) for v in leaves.values())
    assert any(isinstance(v, torch.Tensor) and v.dim() == 0 for v in leaves.values())
    assert any(v.numel() == 0 for v in leaves.values() if isinstance(v, torch.Tensor))
    plain = golden_state()["plain"]
    assert isinstance(plain["odict"], OrderedDict)
    assert hasattr(golden_state()["linear_sd"], "_metadata")


# --- format 2: a distributed checkpoint written before format 3 ---------------------------------

GOLDEN_V2 = Path(__file__).resolve().parent / "golden" / "v2"


def test_a_format_2_checkpoint_of_a_job_still_loads_and_verifies(tmp_path: Path) -> None:
    """tests/golden/v2/ was written by the last format-2 writer (git 0f76707): two gloo ranks
    saving tests/dist_workloads.small_sharded_fixture (a DTensor of two chunks, per-rank state, a
    replicated tensor). Readers of format 3 read it as they always did."""
    copy = tmp_path / "v2"
    shutil.copytree(GOLDEN_V2, copy)
    assert json.loads((copy / "manifest.json").read_bytes())["format_version"] == 2
    manifest = open_checkpoint(copy).manifest
    assert manifest.format_version == 2 and manifest.indexes is None and manifest.complete
    assert [len(s.chunks) for s in manifest.sharded] == [2]
    work.check_small_sharded(copy)
