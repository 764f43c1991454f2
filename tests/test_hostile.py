"""Hostile input: manifests and shards made to harm the reader.

Every manifest here carries a *valid* checksum (see hostile_helpers.write_body), so that it is
the validation behind the checksum that must catch the problem. Each case asserts the exact
statevault error type and what its message names, that ``sv.verify`` reports it too, and (via
``attempt``) that neither opened a path outside the checkpoint nor changed a file anywhere.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
from statevault.adapters.numpy_adapter import NumpyAdapter
from statevault.adapters.torch_adapter import TorchAdapter
from statevault.checkpoint import verify as checkpoint_module
from statevault.format import dtypes
from statevault.format.checksum import crc32c_of, format_checksum
from tests.hostile_helpers import (
    Attempt,
    attempt,
    manifest_path,
    read_body,
    rewrite_body,
    save_small,
    shard_names,
    wrap_body,
    write_body,
)

SENTINEL = b"outside the checkpoint: never read, never written"


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    """A sound checkpoint at tmp_path/ck, and a sentinel file beside it."""
    (tmp_path / "sentinel.txt").write_bytes(SENTINEL)
    return save_small(tmp_path / "ck")


def hostile(ck: Path, kind: type[sv.CheckpointError] = sv.CorruptCheckpointError) -> str:
    """Load and verify ``ck``: load must raise ``kind``, verify must report a problem, nothing
    outside may be touched. Returns the load error's message and problems."""
    result = attempt(ck, outside=ck.parent)
    text = result.raised(kind)
    result.verify_failed()
    assert (ck.parent / "sentinel.txt").read_bytes() == SENTINEL
    return text


def shard(ck: Path) -> str:
    return shard_names(ck)[0]


def rename_shard(body: dict[str, Any], name: str) -> None:
    old = body["files"][0]["name"]
    body["files"][0]["name"] = name
    for row in body["tensors"]:
        if row["file"] == old:
            row["file"] = name


def tensor_row(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The manifest row of the leaf ``path``; ``LAST`` is the one that ends its file."""
    rows = body["tensors"]
    if path == "LAST":
        path = max(rows, key=lambda r: r["offset"] + r["nbytes"])["path"]
    row: dict[str, Any] = next(r for r in rows if r["path"] == path)
    return row


# --- paths: nothing outside the directory --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "../../outside.safetensors",
        "ABSOLUTE",  # replaced by the absolute path of a valid shard outside the checkpoint
        "/etc/passwd",
        "sub/../../outside.safetensors",
        "./data.safetensors",
        "..",
        ".",
        "",
        "a/b",
        "..\\outside.safetensors",
        "data\x00.safetensors",
        "data.safetensors\n",
        "manifest.json",
        "x" * 300,
    ],
)
def test_file_name_cannot_leave_the_directory(ck: Path, tmp_path: Path, name: str) -> None:
    # A valid copy of the shard waits outside: following any of these names would "work".
    shutil.copy(ck / shard(ck), tmp_path / "outside.safetensors")
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside.safetensors")
    rewrite_body(ck, lambda body: rename_shard(body, name))
    text = hostile(ck)
    if name != "data.safetensors\n":  # refused as a name, or else as a file that is not there
        assert "is not a plain file name inside the checkpoint" in text


def test_tensor_in_a_file_not_listed(ck: Path, tmp_path: Path) -> None:
    shutil.copy(ck / shard(ck), tmp_path / "outside.safetensors")
    rewrite_body(ck, lambda body: body["tensors"][0].update(file="../outside.safetensors"))
    assert "is not listed in files" in hostile(ck)


def test_file_listed_twice(ck: Path) -> None:
    rewrite_body(ck, lambda body: body["files"].append(dict(body["files"][0])))
    assert "listed twice" in hostile(ck)


def test_symlinked_shard_is_not_followed(ck: Path, tmp_path: Path) -> None:
    """A shard that is a symlink to a (valid, identical) file outside is refused."""
    name = shard(ck)
    (ck / name).rename(tmp_path / "outside.safetensors")
    (ck / name).symlink_to(tmp_path / "outside.safetensors")
    text = hostile(ck)
    assert f"file {name}: is a symlink, not a regular file" in text
    assert hostile(ck) == text
    result = attempt(ck, outside=tmp_path, verify=False)
    assert f"file {name}: is a symlink, not a regular file" in result.raised()


def test_symlinked_shard_inside_the_directory_is_refused_too(ck: Path) -> None:
    name = shard(ck)
    (ck / name).rename(ck / "real.safetensors")
    (ck / name).symlink_to("real.safetensors")
    assert f"file {name}: is a symlink, not a regular file" in hostile(ck)


@pytest.mark.parametrize("target", ["valid copy", "dangling", "directory", "checkpoint dir"])
def test_symlinked_manifest_is_refused(ck: Path, tmp_path: Path, target: str) -> None:
    manifest = manifest_path(ck)
    outside = tmp_path / "outside.json"
    if target == "valid copy":
        manifest.rename(outside)
    elif target == "dangling":
        manifest.unlink()
    elif target == "directory":
        outside.mkdir()
    manifest.unlink(missing_ok=True)
    manifest.symlink_to(ck if target == "checkpoint dir" else outside)
    text = hostile(ck)
    assert "manifest.json is not a regular file" in text


def test_manifest_that_is_a_directory(ck: Path) -> None:
    manifest = manifest_path(ck)
    manifest.unlink()
    manifest.mkdir()
    (manifest / "manifest.json").write_bytes(b"{}")
    text = hostile(ck)
    assert "manifest.json is not a regular file" in text


@pytest.mark.timeout(30)
def test_manifest_that_is_a_fifo_does_not_hang(ck: Path) -> None:
    manifest = manifest_path(ck)
    manifest.unlink()
    os.mkfifo(manifest)
    assert "manifest.json is not a regular file" in hostile(ck)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("verify", [True, False])
def test_shard_that_is_a_fifo_does_not_hang(ck: Path, verify: bool) -> None:
    name = shard(ck)
    (ck / name).unlink()
    os.mkfifo(ck / name)
    result = attempt(ck, outside=ck.parent, verify=verify)
    assert f"file {name}: is a special file, not a regular file" in result.raised()
    assert f"file {name}: is a special file, not a regular file" in result.verify_failed()


@pytest.mark.parametrize("verify", [True, False])
def test_shard_that_is_a_directory_of_the_listed_size(ck: Path, verify: bool) -> None:
    name = shard(ck)
    (ck / name).unlink()
    (ck / name).mkdir()
    size = (ck / name).stat().st_size  # the manifest agrees with the directory's size
    rewrite_body(ck, lambda body: body["files"][0].update(size=size, header_size=8))

    def fit_rows(body: dict[str, Any]) -> None:
        for row in body["tensors"]:
            row["offset"] = 8
        body["tensors"] = body["tensors"][:1]
        body["tree"] = {"$": "tensor", "id": 0}

    rewrite_body(ck, fit_rows)
    result = attempt(ck, outside=ck.parent, verify=verify)
    assert f"file {name}: is a directory, not a regular file" in result.raised()
    assert f"file {name}: is a directory, not a regular file" in result.verify_failed()


# --- safetensors headers, offsets, sizes ---------------------------------------------------------


def _set_header_length(ck: Path, length: int, fix_checksum: bool) -> None:
    name = shard(ck)
    data = bytearray((ck / name).read_bytes())
    data[:8] = length.to_bytes(8, "little")
    (ck / name).write_bytes(data)
    if fix_checksum:
        header_size = read_body(ck)["files"][0]["header_size"]
        checksum = format_checksum(crc32c_of(bytes(data[:header_size])))
        rewrite_body(ck, lambda body: body["files"][0].update(header_checksum=checksum))


@pytest.mark.parametrize("length", [2**64 - 1, 2**60, 10**6, 0])
@pytest.mark.parametrize("fix_checksum", [False, True])
def test_safetensors_header_length_beyond_the_file(
    ck: Path, length: int, fix_checksum: bool
) -> None:
    """The 8-byte length prefix of a shard claims more than the file (or nothing). Caught by
    the header checksum, and where that was forged too, by the prefix/manifest cross-check."""
    _set_header_length(ck, length, fix_checksum)
    text = hostile(ck)
    assert f"file {shard(ck)}:" in text
    if fix_checksum:
        assert "header length" in text
    else:
        assert "safetensors header checksum mismatch" in text


@pytest.mark.parametrize("header_size", [10**9, 2**64, 7, 0])
def test_manifest_header_size_outside_the_file(ck: Path, header_size: int) -> None:
    rewrite_body(ck, lambda body: body["files"][0].update(header_size=header_size))
    assert "outside the file" in hostile(ck)


@pytest.mark.parametrize("where", ["at end", "past end", "in header", "zero", "2**63", "2**64"])
def test_tensor_offset_out_of_range(ck: Path, where: str) -> None:
    body = read_body(ck)
    file_size, header = body["files"][0]["size"], body["files"][0]["header_size"]
    row = tensor_row(body, "LAST")  # so that only the offset can be wrong
    index = body["tensors"].index(row)
    row["offset"] = {
        "at end": file_size,
        "past end": file_size - row["nbytes"] + 1,
        "in header": header - 1,
        "zero": 0,
        "2**63": 2**63,
        "2**64": 2**64 + row["offset"],
    }[where]
    write_body(ck, body)
    assert f"tensors[{index}] ({row['path']}): byte range lies outside" in hostile(ck)


@pytest.mark.parametrize("shift", [0, 4, 47])
def test_overlapping_tensors(ck: Path, shift: int) -> None:
    def overlap(body: dict[str, Any]) -> None:
        weight = tensor_row(body, "model/weight")
        tensor_row(body, "arrays/0")["offset"] = weight["offset"] + shift

    rewrite_body(ck, overlap)
    text = hostile(ck)
    assert "overlap" in text and "model/weight" in text and "arrays/0" in text


@pytest.mark.parametrize(
    "change",
    [
        {"shape": [4, 4]},
        {"shape": [4]},
        {"shape": []},
        {"dtype": "float64"},
        {"dtype": "float16"},
        {"nbytes": 47},
        {"nbytes": 0},
        {"shape": [12], "dtype": "uint8"},
    ],
)
def test_dtype_and_shape_must_match_the_byte_count(ck: Path, change: dict[str, Any]) -> None:
    body = read_body(ck)
    row = tensor_row(body, "model/weight")
    row.update(change)
    write_body(ck, body)
    text = hostile(ck)
    assert f"tensors[{body['tensors'].index(row)}] (model/weight): " in text
    assert "bytes do not match dtype" in text


@pytest.fixture
def no_big_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a load or verify allocates a buffer for more than 1 MiB."""

    def guard(real: Any) -> Any:
        def allocate(*args: Any) -> Any:
            entry = args[-1]
            assert entry.nbytes < 1 << 20, f"allocated {entry.nbytes} bytes for {entry.path}"
            return real(*args)

        return allocate

    monkeypatch.setattr(TorchAdapter, "allocate", guard(TorchAdapter.allocate))
    monkeypatch.setattr(NumpyAdapter, "allocate", guard(NumpyAdapter.allocate))
    monkeypatch.setattr(checkpoint_module, "_scratch", guard(checkpoint_module._scratch))


@pytest.mark.usefixtures("no_big_allocation")
@pytest.mark.parametrize(
    ("leaf", "shape", "file_size"),
    [
        ("LAST", [2**31, 2**31], None),  # the manifest's file size is honest
        ("LAST", [2**62, 2**62, 2**62], None),
        ("LAST", [2**44], "lie"),  # the manifest claims a file of 16 TiB+; the disk disagrees
        ("LAST", [1] * 65, None),  # more dims than any framework supports
        # zero bytes, but no framework can make such an array
        ("arrays/2", [0, 2**70], None),
        ("model/steps", [0, 2**70], None),
        ("model/steps", [0, 2**40, 2**40], None),
        ("model/steps", [2**63, 0], None),
    ],
)
def test_huge_shape_fails_before_allocating(
    ck: Path, leaf: str, shape: list[int], file_size: str | None
) -> None:
    body = read_body(ck)
    row = tensor_row(body, leaf)
    row["shape"] = shape
    row["nbytes"] = math.prod(shape) * dtypes.lookup(row["dtype"]).itemsize
    if file_size == "lie":
        body["files"][0]["size"] = row["offset"] + row["nbytes"]
    write_body(ck, body)
    started = time.perf_counter()
    text = hostile(ck)
    assert time.perf_counter() - started < 5
    if file_size == "lie":
        assert f"bytes on disk, {body['files'][0]['size']} in the manifest" in text
    else:
        assert f"({row['path']}): shape" in text or f"({row['path']}): byte range" in text
    assert len(str(attempt(ck).error)) < 300  # a clear message, not a framework's stack trace


def test_huge_manifest_is_not_read_into_memory(ck: Path) -> None:
    """A (sparse) 1 TiB manifest.json is refused by its size, in a process that cannot
    allocate more than 1 GiB: it must fail with CorruptCheckpointError, not MemoryError."""
    os.truncate(manifest_path(ck), 1 << 40)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))\n"
        "import statevault as sv\n"
        "try:\n"
        "    sv.load(sys.argv[1])\n"
        "except sv.CorruptCheckpointError as exc:\n"
        "    print('CORRUPT', exc)\n"
    )
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", code, str(ck)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("CORRUPT") and "large" in run.stdout, run.stdout
    assert time.perf_counter() - started < 30


# --- numbers and types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "value", "expect"),
    [
        ("size", -1, "negative"),
        ("header_size", -1, "negative"),
        ("offset", -1, "negative"),
        ("nbytes", -48, "negative"),
        ("shape", [-4, -3], "non-negative"),  # the product, 12, matches the byte count
        ("shape", [-1, 0], "non-negative"),
        ("id", -1, "tree refers to tensor -1"),
    ],
)
def test_negative_numbers(ck: Path, where: str, value: Any, expect: str) -> None:
    def change(body: dict[str, Any]) -> None:
        if where in ("size", "header_size"):
            body["files"][0][where] = value
        elif where == "id":
            body["tree"]["v"]["model"]["v"]["weight"]["id"] = value
        else:
            tensor_row(body, "model/weight")[where] = value

    rewrite_body(ck, change)
    assert expect in hostile(ck)


_WRONG = {
    "null": None,
    "bool": True,
    "int": 7,
    "float": 1.5,
    "str": "x",
    "list": [],
    "dict": {},
}
_FIELDS: list[tuple[tuple[Any, ...], type]] = [
    ((), dict),
    (("files",), list),
    (("files", 0), dict),
    (("files", 0, "name"), str),
    (("files", 0, "size"), int),
    (("files", 0, "header_size"), int),
    (("files", 0, "header_checksum"), str),
    (("tensors",), list),
    (("tensors", 0), dict),
    (("tensors", 0, "path"), str),
    (("tensors", 0, "framework"), str),
    (("tensors", 0, "dtype"), str),
    (("tensors", 0, "shape"), list),
    (("tensors", 0, "shape", 0), int),
    (("tensors", 0, "file"), str),
    (("tensors", 0, "offset"), int),
    (("tensors", 0, "nbytes"), int),
    (("tensors", 0, "checksum"), str),
    (("tensors", 0, "attrs"), dict),
    (("info",), dict),
    (("tree", "$"), str),
    (("tree", "v"), dict),
    (("tree", "v", "model", "v", "weight", "id"), int),
    (("tree", "v", "blob", "b64"), str),
    (("tree", "v", "pair", "items"), list),
    (("tree", "v", "by_id", "items"), list),
    (("tree", "v", "by_id", "items", 0), list),
]


def _replace(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (path, name)
        for path, right in _FIELDS
        for name, value in _WRONG.items()
        if type(value) is not right
    ],
    ids=lambda v: "/".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_wrong_json_types_everywhere(ck: Path, path: tuple[Any, ...], wrong: str) -> None:
    body = _replace(read_body(ck), path, _WRONG[wrong])
    write_body(ck, body)
    hostile(ck)


@pytest.mark.parametrize(
    "key", ["files", "tensors", "info", "tree", "metadata", "files/name", "tensors/checksum"]
)
def test_missing_keys(ck: Path, key: str) -> None:
    def drop(body: dict[str, Any]) -> None:
        if "/" in key:
            section, field = key.split("/")
            del body[section][0][field]
        else:
            del body[key]

    rewrite_body(ck, drop)
    text = hostile(ck)
    assert key.split("/")[-1] in text


# --- JSON ----------------------------------------------------------------------------------------


def _body_text(ck: Path) -> str:
    return json.dumps(read_body(ck), ensure_ascii=True, indent=1)


INVALID_JSON: dict[str, Any] = {
    "empty": lambda ck: b"",
    "one brace": lambda ck: b"{",
    "half": lambda ck: manifest_path(ck).read_bytes()[: manifest_path(ck).stat().st_size // 2],
    "utf-8 bom": lambda ck: b"\xef\xbb\xbf" + manifest_path(ck).read_bytes(),
    "utf-16": lambda ck: manifest_path(ck).read_text("ascii").encode("utf-16"),
    "null": lambda ck: b"null",
    "array": lambda ck: b"[1, 2, 3]",
    "number": lambda ck: b"42",
    "string": lambda ck: b'"statevault"',
    "trailing garbage": lambda ck: manifest_path(ck).read_bytes() + b"garbage",
    "nul byte": lambda ck: manifest_path(ck).read_bytes().replace(b'"info"', b'"in\x00fo"'),
    "spaced envelope": lambda ck: manifest_path(ck).read_bytes().replace(b'":', b'": ', 2),
    "other format": lambda ck: manifest_path(ck).read_bytes().replace(b"statevault", b"statevaulx"),
    # Bodies below carry a valid checksum of their exact (broken) bytes.
    "body invalid utf-8": lambda ck: wrap_body(b'{"info": "\xff\xfe"}'),
    "body trailing comma": lambda ck: wrap_body(_body_text(ck)[:-2].encode() + b",}"),
    "body single quotes": lambda ck: wrap_body(b"{'files': []}"),
    "body NaN": lambda ck: wrap_body(_body_text(ck).replace("0.125", "NaN").encode()),
    "body Infinity": lambda ck: wrap_body(_body_text(ck).replace("0.125", "-Infinity").encode()),
    "body duplicate key": lambda ck: wrap_body(
        _body_text(ck).replace('"offset": ', '"offset": 0, "offset": ', 1).encode()
    ),
    "body duplicate body": lambda ck: wrap_body(
        _body_text(ck).encode() + b',"body":{"files":[],"tensors":[],"info":{},"tree":1}'
    ),
    "body huge int": lambda ck: wrap_body(
        re.sub(r'"offset": \d+', '"offset": ' + "9" * 5000, _body_text(ck), count=1).encode()
    ),
    "body empty": lambda ck: wrap_body(b""),
}


@pytest.mark.parametrize("case", list(INVALID_JSON))
def test_invalid_json(ck: Path, case: str) -> None:
    manifest_path(ck).write_bytes(INVALID_JSON[case](ck))
    hostile(ck)


DEEP = 100_000


def _with_raw(ck: Path, field: str, raw: bytes) -> None:
    """Replace one top-level body field by raw JSON bytes (valid checksum)."""
    body = read_body(ck)
    body[field] = "@@RAW@@"
    text = json.dumps(body, ensure_ascii=True, indent=1).encode()
    manifest_path(ck).write_bytes(wrap_body(text.replace(b'"@@RAW@@"', raw)))


@pytest.mark.parametrize("field", ["tree", "metadata", "info", "files", "tensors"])
@pytest.mark.parametrize("kind", ["lists", "objects"])
def test_deeply_nested_json(ck: Path, field: str, kind: str) -> None:
    raw = b"[" * DEEP + b"]" * DEEP if kind == "lists" else b'{"a":' * DEEP + b"1" + b"}" * DEEP
    _with_raw(ck, field, raw)
    assert "nested too deeply" in hostile(ck)


def test_deeply_nested_manifest(ck: Path) -> None:
    manifest_path(ck).write_bytes(b"[" * DEEP + b"]" * DEEP)
    assert "nested too deeply" in hostile(ck)


@pytest.mark.parametrize("kind", ["list", "tuple", "dict", "items", "key", "stateful"])
def test_tree_nested_beyond_the_limit(ck: Path, kind: str) -> None:
    """Valid JSON, nested less than the JSON parser's limit but more than the tree's."""
    node: Any = 1
    for _ in range(300):
        node = {
            "list": [node],
            "tuple": {"$": "tuple", "items": [node]},
            "dict": {"$": "dict", "v": {"k": node}},
            "items": {"$": "dict", "items": [[1, node]]},
            "key": {"$": "tuple", "items": [node]},
            "stateful": {"$": "stateful", "type": "x.Y", "state": node},
        }[kind]
    if kind == "key":
        node = {"$": "dict", "items": [[node, 1]]}
    rewrite_body(ck, lambda body: body.update(tree=node))
    assert "nesting deeper than" in hostile(ck)


# --- versions, tags, ids, dtypes, frameworks -----------------------------------------------------


@pytest.mark.parametrize("version", [4, 10, 999_999_999, 10**12])
def test_newer_format_version(ck: Path, version: int) -> None:
    manifest_path(ck).write_bytes(wrap_body(_body_text(ck).encode(), version))
    text = hostile(ck, sv.UnsupportedFormatError)
    assert "newer statevault" in text and f"format version {version}" in text
    assert "upgrade statevault" in text


@pytest.mark.parametrize("version", ["0", "-1", '"1"', "1.0", "true", "null", "[1]"])
def test_invalid_format_version(ck: Path, version: str) -> None:
    manifest_path(ck).write_bytes(wrap_body(_body_text(ck).encode(), version))
    hostile(ck)


@pytest.mark.parametrize(
    "node",
    [
        {"$": "pickle", "data": "gASVAAAAAAAAAAAu"},
        {"$": "__reduce__", "args": []},
        {"$": "Tensor"},
        {"$": None},
        {"$": 1},
        {"$": ["tensor"]},
        {"v": {}},
        {},
    ],
    ids=lambda v: str(v)[:60],
)
def test_unknown_node_tags(ck: Path, node: Any) -> None:
    rewrite_body(ck, lambda body: body["tree"]["v"].update(epoch=node))
    text = hostile(ck)
    assert "malformed tree at epoch: unknown node type" in text


@pytest.mark.parametrize(
    "node",
    [
        {"$": "float", "v": "1.5"},
        {"$": "float", "v": []},
        {"$": "complex", "re": "x", "im": 0},
        {"$": "complex", "re": 10**400, "im": 0},
        {"$": "complex", "re": [[1]], "im": 0},
        {"$": "bytes", "b64": "!!not base64!!"},
        {"$": "bytes", "b64": "\u00e9"},
        {"$": "dict", "items": [[[1], 2]]},
        {"$": "dict", "items": [[{"$": "tuple", "items": [[1]]}, 2]]},
        {"$": "dict", "items": [[1, 2, 3]]},
        {"$": "dict", "v": {}, "meta": 1},
        {"$": "dict", "v": {}, "meta": {"$": "dict", "v": {}}},
        {"$": "npscalar", "dtype": "object", "v": 1},
        {"$": "npscalar", "dtype": "O", "v": 1},
        {"$": "npscalar", "dtype": "(2,)f4", "v": 1},
        {"$": "npscalar", "dtype": "M8", "v": 1},
        {"$": "npscalar", "dtype": "float32", "v": "abc"},
        {"$": "npscalar", "dtype": "float32", "v": [1, 2]},
        {"$": "npscalar", "dtype": "float32", "v": {"$": "tensor", "id": 0}},
        {"$": "npscalar", "dtype": "int8", "v": 300},
        {"$": "npscalar", "dtype": "x" * 10_000, "v": 1},
        {"$": "stateful", "type": 5, "state": {}},
        {"$": "tensor", "id": "0"},
        {"$": "tensor", "id": 0.0},
        {"$": "tensor", "id": True},
    ],
    ids=lambda v: str(v)[:60],
)
def test_malformed_tagged_nodes(ck: Path, node: Any) -> None:
    rewrite_body(ck, lambda body: body["tree"]["v"].update(epoch=node))
    assert "malformed tree at epoch" in hostile(ck)


@pytest.mark.parametrize("index", [7, 8, 10**30])
def test_tree_refers_to_a_tensor_out_of_range(ck: Path, index: int) -> None:
    rewrite_body(ck, lambda body: body["tree"]["v"].update(epoch={"$": "tensor", "id": index}))
    assert f"tree refers to tensor {index}" in hostile(ck)


@pytest.mark.parametrize("dtype", ["float128", "", "torch.float32", "F32", "object", "<f4"])
def test_unknown_dtype(ck: Path, dtype: str) -> None:
    rewrite_body(ck, lambda body: tensor_row(body, "model/weight").update(dtype=dtype))
    assert "unknown dtype" in hostile(ck)


def test_dtype_the_framework_cannot_hold(ck: Path) -> None:
    """bfloat16 is a format dtype, but numpy has no such dtype: refused, naming the leaf."""
    rewrite_body(ck, lambda body: tensor_row(body, "arrays/0").update(dtype="bfloat16", shape=[12]))
    result = attempt(ck, outside=ck.parent)
    text = result.raised()
    assert "arrays/0" in text and "bfloat16" in text
    # verify agrees with load: the bytes are intact, but this checkpoint cannot be loaded.
    assert result.report is not None and not result.report.ok
    assert any("arrays/0" in p and "bfloat16" in p for p in result.report.problems)


@pytest.mark.parametrize("framework", ["jax", "", "__builtins__", "os", "torch "])
def test_unknown_framework(ck: Path, framework: str) -> None:
    rewrite_body(ck, lambda body: tensor_row(body, "arrays/1").update(framework=framework))
    result = attempt(ck, outside=ck.parent)
    text = result.raised(sv.CheckpointError)
    assert f"framework {framework!r}" in text and "arrays/1" in text
    assert result.report is not None and not result.report.ok
    assert any("arrays/1" in p for p in result.report.problems)


@pytest.mark.parametrize(
    "attrs",
    [
        [],
        "cuda",
        {"parameter": True, "requires_grad": True},
        {"requires_grad": True},
        {"device": 5},
    ],
    ids=lambda v: str(v)[:60],
)
def test_bad_tensor_attrs(ck: Path, attrs: Any) -> None:
    """attrs that are not an object, or ask an int64 tensor to require gradients."""
    rewrite_body(ck, lambda body: tensor_row(body, "model/steps").update(attrs=attrs))
    result = attempt(ck, outside=ck.parent)
    if isinstance(attrs, dict) and "device" in attrs:
        assert result.error is None  # the saved device is informational
        return
    assert "model/steps" in result.raised()


# --- pickle never runs ---------------------------------------------------------------------------


class _Trap:
    """Unpickling this calls open(marker, "w"): the marker file appears if pickle ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.fixture
def trap(tmp_path: Path) -> tuple[bytes, Path]:
    armed = tmp_path / "proof" / "armed"
    armed.parent.mkdir()
    pickle.loads(pickle.dumps(_Trap(armed))).close()  # the payload really does run code...
    assert armed.exists()
    shutil.rmtree(armed.parent)
    marker = tmp_path / "marker"
    return pickle.dumps(_Trap(marker)), marker


@pytest.mark.parametrize("same_size", [False, True])
def test_pickle_in_place_of_a_shard(ck: Path, trap: tuple[bytes, Path], same_size: bool) -> None:
    payload, marker = trap
    name = shard(ck)
    size = (ck / name).stat().st_size
    (ck / name).write_bytes(payload.ljust(size, b".") if same_size else payload)
    text = hostile(ck)
    assert f"file {name}:" in text
    assert not marker.exists()
    if same_size:  # verify=False trusts bytes of the right size: they load as numbers, no more
        sv.load(ck, verify=False)
    else:
        with pytest.raises(sv.CorruptCheckpointError):
            sv.load(ck, verify=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_pickle_in_place_of_the_manifest(ck: Path, trap: tuple[bytes, Path], protocol: int) -> None:
    _, marker = trap
    manifest_path(ck).write_bytes(pickle.dumps(_Trap(marker), protocol=protocol))
    assert "manifest.json is not valid JSON" in hostile(ck)
    assert not marker.exists()


def test_torch_save_file_in_place_of_the_manifest(ck: Path, trap: tuple[bytes, Path]) -> None:
    _, marker = trap
    torch.save({"x": _Trap(marker)}, manifest_path(ck))
    assert "manifest.json is not valid JSON" in hostile(ck)
    assert not marker.exists()


# --- a failed load changes nothing ---------------------------------------------------------------


def _damage(ck: Path, how: str) -> None:
    if how == "payload bit":
        body = read_body(ck)
        row = body["tensors"][-1]
        with open(ck / row["file"], "r+b") as handle:
            handle.seek(row["offset"] + row["nbytes"] - 1)
            last = handle.read(1)[0]
            handle.seek(row["offset"] + row["nbytes"] - 1)
            handle.write(bytes([last ^ 0x10]))
    elif how == "truncated":
        name = shard(ck)
        os.truncate(ck / name, (ck / name).stat().st_size - 1)
    elif how == "bad tree":  # found only after every tensor was read
        rewrite_body(ck, lambda body: body["tree"]["v"].update(step={"$": "evil"}))
    elif how == "bad manifest":
        rewrite_body(ck, lambda body: body["tensors"][0].update(offset=-1))


@pytest.mark.parametrize("how", ["payload bit", "truncated", "bad tree", "bad manifest"])
def test_failed_load_leaves_into_untouched(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sv.save({"model": saved, "step": 5, "extra": np.arange(3.0)}, tmp_path / "ck")
    _damage(tmp_path / "ck", how)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    extra = np.full(3, 7.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(sv.CorruptCheckpointError):
        sv.load(tmp_path / "ck", into={"model": target, "extra": extra})
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(torch.equal(before[k], v) for k, v in saved.state_dict().items())
    assert (extra == 7.0).all()


def test_sound_load_into_still_works(tmp_path: Path) -> None:
    """The control for the test above: the same load, undamaged, does change the target."""
    torch.manual_seed(0)
    saved = torch.nn.Linear(3, 4)
    sv.save({"model": saved}, tmp_path / "ck")
    target = torch.nn.Linear(3, 4)
    sv.load(tmp_path / "ck", into={"model": target})
    assert torch.equal(target.weight, saved.weight)


def test_nothing_outside_is_touched(ck: Path, tmp_path: Path) -> None:
    """Every hostile case above runs through ``attempt``; this pins the guard itself down."""
    (tmp_path / "outside.safetensors").write_bytes((ck / shard(ck)).read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    rewrite_body(ck, lambda body: rename_shard(body, "../outside.safetensors"))
    result: Attempt = attempt(ck, outside=tmp_path)
    result.raised()
    assert all(p == str(ck) or os.path.dirname(p) == str(ck) for p in result.opened)
    assert os.path.join(str(ck), "manifest.json") in result.opened
    assert not any(
        p.endswith("outside.safetensors") and os.path.dirname(p) != str(ck) for p in result.opened
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "sentinel.txt").read_bytes() == SENTINEL


@pytest.mark.parametrize(
    "checksum", ["crc32c:0000_001", "crc32c:+0000001", "crc32c:ABCDEF01", "crc32c: 1234567"]
)
def test_checksums_must_be_eight_lowercase_hex_digits(ck: Path, checksum: str) -> None:
    rewrite_body(ck, lambda body: body["tensors"][0].update(checksum=checksum))
    result = attempt(ck, outside=ck.parent)
    assert "checksum" in result.raised(sv.CorruptCheckpointError)


@pytest.mark.parametrize(
    "key",
    [
        {"$": "tensor", "id": 0},
        {"$": "tuple", "items": [1, {"$": "tensor", "id": 0}]},
        {"$": "stateful", "type": "x", "state": 1},
        [1, 2],
    ],
    ids=["tensor", "tensor-in-tuple", "stateful", "list"],
)
def test_dict_keys_are_plain_values_only(ck: Path, key: Any) -> None:
    rewrite_body(ck, lambda body: body.update(tree={"$": "dict", "items": [[key, 1]]}))
    result = attempt(ck, outside=ck.parent)
    assert "key" in result.raised(sv.CorruptCheckpointError)


@pytest.mark.parametrize("dtype", ["float128", "longlong", "object", "datetime64"])
def test_numpy_scalars_only_of_the_written_dtypes(ck: Path, dtype: str) -> None:
    node = {"$": "npscalar", "dtype": dtype, "v": 1}
    rewrite_body(ck, lambda body: body.update(tree={"$": "dict", "v": {"x": node}}))
    result = attempt(ck, outside=ck.parent)
    assert dtype in result.raised(sv.CorruptCheckpointError)
