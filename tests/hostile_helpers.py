"""Helpers for the integrity, hostile-input and fuzz tests: a small checkpoint, byte surgery on
its files, a manifest rewritten *with a valid checksum* (so that the validation behind the
checksum is what must catch a problem), exact comparison of loaded state, and a guard that
proves a load touched nothing outside the checkpoint and wrote nothing inside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import statevault as sv
import statevault.adapters.numpy_adapter  # loaded here, so a guarded load imports nothing
import statevault.adapters.torch_adapter
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.format.manifest import TensorEntry, parse_manifest
from statevault.format.names import MANIFEST_NAME


def make_state() -> dict[str, Any]:
    """Several torch tensors, numpy arrays and plain values of every kind the format keeps."""
    gen = torch.Generator().manual_seed(1234)
    return {
        "model": {
            "weight": torch.randn(4, 3, generator=gen),
            "bias": torch.arange(4, dtype=torch.float64),
            "steps": torch.tensor([1, 2, 3], dtype=torch.int64),
        },
        "half": torch.randn(5, generator=gen).to(torch.bfloat16),
        "arrays": [
            np.arange(6, dtype=np.int32).reshape(2, 3),
            np.linspace(0.0, 1.0, 7),
            np.array([True, False]),
        ],
        "epoch": 7,
        "lr": 0.125,
        "name": "run-\u03b1",
        "blob": b"\x00\xffbytes",
        "pair": (1, "two", 3.0),
        "by_id": {1: "one", 2: [2, 2]},
        "none": None,
    }


def save_small(directory: Path, state: Any = None) -> Path:
    """Save ``state`` (default: :func:`make_state`) at ``directory``; returns the directory."""
    sv.save(make_state() if state is None else state, directory)
    return directory


# --- looking at a checkpoint -------------------------------------------------------------------


def manifest_path(ck: Path) -> Path:
    return ck / MANIFEST_NAME


def tensor_rows(ck: Path) -> list[TensorEntry]:
    return parse_manifest(manifest_path(ck).read_bytes(), str(ck)).tensors


def shard_names(ck: Path) -> list[str]:
    return [f.name for f in parse_manifest(manifest_path(ck).read_bytes(), str(ck)).files]


def header_size(ck: Path, name: str) -> int:
    files = parse_manifest(manifest_path(ck).read_bytes(), str(ck)).files
    return next(f.header_size for f in files if f.name == name)


# --- byte surgery ------------------------------------------------------------------------------


def flip_bit(path: Path, offset: int, bit: int) -> None:
    """Flip one bit of the file in place (flipping it again restores the file)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


@contextlib.contextmanager
def bit_flipped(path: Path, offset: int, bit: int) -> Iterator[None]:
    flip_bit(path, offset, bit)
    try:
        yield
    finally:
        flip_bit(path, offset, bit)


def wrap_body(body: bytes, version: int | str = 1) -> bytes:
    """A manifest.json envelope around ``body`` with a *valid* checksum of exactly those bytes."""
    head = (
        f'{{"format":"statevault","format_version":{version},'
        f'"checksum":"{format_checksum(crc32c_of(body))}","body":'
    ).encode("ascii")
    return head + body + b"}\n"


def read_body(ck: Path) -> dict[str, Any]:
    """The parsed body of the checkpoint's manifest."""
    body: dict[str, Any] = json.loads(manifest_path(ck).read_bytes())["body"]
    return body


def write_body(ck: Path, body: Any, version: int | str | None = None) -> None:
    """Replace the manifest body, re-checksummed so that only validation can object. The
    version defaults to the one the body needs (3 with ``indexes``, 2 with ``ranks``, else 1)."""
    if version is None:
        version = 1
        if isinstance(body, dict):
            version = 3 if "indexes" in body else 2 if "ranks" in body else 1
    data = json.dumps(body, ensure_ascii=True, indent=1).encode("ascii")
    manifest_path(ck).write_bytes(wrap_body(data, version))


def rewrite_body(ck: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``change`` to the parsed body (in place, or return a replacement) and write it."""
    body = read_body(ck)
    replaced = change(body)
    write_body(ck, body if replaced is None else replaced)


# --- comparing loaded state --------------------------------------------------------------------


def assert_same(loaded: Any, expected: Any, path: str = "") -> None:
    """Exact equality: same types (dict subclasses aside at the root), dtypes, shapes, bits."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), where
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape, where
        assert torch.equal(loaded.view(torch.uint8), expected.contiguous().view(torch.uint8)), where
    elif isinstance(expected, np.ndarray):
        assert type(loaded) is np.ndarray, where
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape, where
        assert loaded.tobytes() == expected.tobytes(), where
    elif isinstance(expected, dict):
        assert isinstance(loaded, dict), where
        assert list(loaded) == list(expected), where
        for key in expected:
            assert_same(loaded[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected), where
        for i, (a, b) in enumerate(zip(loaded, expected, strict=True)):
            assert_same(a, b, f"{path}/{i}")
    else:
        assert type(loaded) is type(expected) and loaded == expected, where


# --- proving that nothing outside was touched --------------------------------------------------


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (not following links) with its kind, mtime and content hash."""
    result: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st = full.lstat()
            if full.is_symlink():
                result[str(full)] = ("link", st.st_mtime_ns, os.readlink(full))
            elif full.is_file():
                digest = hashlib.sha256(full.read_bytes()).hexdigest()
                result[str(full)] = ("file", st.st_mtime_ns, digest)
            else:
                result[str(full)] = ("other", st.st_mtime_ns, "")
    return result


@dataclass
class Attempt:
    """What a guarded ``sv.load`` and ``sv.verify`` did with a (possibly hostile) checkpoint."""

    error: sv.CheckpointError | None
    loaded: Any
    report: sv.VerifyReport | None
    verify_error: sv.CheckpointError | None = None
    opened: list[str] = field(default_factory=list)

    def raised(self, kind: type[sv.CheckpointError] = sv.CorruptCheckpointError) -> str:
        """Assert that load raised ``kind`` (exactly) and return its message and problems."""
        assert self.error is not None, f"the load succeeded: {self.loaded!r}"
        assert type(self.error) is kind, f"{type(self.error).__name__}: {self.error}"
        problems = getattr(self.error, "problems", [])
        return "\n".join([str(self.error), *problems])

    def verify_failed(self) -> str:
        """Assert that verify reported (or raised) a problem; return its text."""
        if self.verify_error is not None:
            return str(self.verify_error)
        assert self.report is not None
        assert not self.report.ok, "verify found nothing wrong"
        return "\n".join(self.report.problems)


def attempt(ck: Path, outside: Path | None = None, **load_kwargs: Any) -> Attempt:
    """Load and verify ``ck`` and return what happened; fail on any non-statevault exception.

    While they run every ``os.open`` is recorded and must name a path inside ``ck``; afterwards
    the files of ``ck`` and (if given) every file under ``outside`` other than ``ck`` must be
    exactly as they were: a load or verify reads nothing outside and writes nothing anywhere.
    """
    ck = Path(os.path.abspath(ck))
    before_ck = _snapshot(ck) if ck.is_dir() else {}
    before_out = _snapshot(outside, skip=ck) if outside is not None else {}
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # A name opened through a directory descriptor (openat) is relative to that directory.
        dir_fd = kwargs.get("dir_fd")
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        opened.append(os.path.abspath(os.path.join(base, os.fsdecode(path))))
        return real_open(path, flags, *args, **kwargs)

    error = verify_error = None
    loaded = report = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", recording_open)
        try:
            loaded = sv.load(ck, **load_kwargs)
        except sv.CheckpointError as exc:
            error = exc
        try:
            report = sv.verify(ck)
        except sv.CheckpointError as exc:
            verify_error = exc
    for path in opened:
        inside = path == str(ck) or os.path.dirname(path) == str(ck)  # the directory, or in it
        assert inside, f"opened {path} outside the checkpoint"
    assert (_snapshot(ck) if ck.is_dir() else {}) == before_ck, "the checkpoint was modified"
    if outside is not None:
        assert _snapshot(outside, skip=ck) == before_out, "something outside was touched"
    return Attempt(error, loaded, report, verify_error, opened)


def refused(ck: Path) -> str:
    """Assert that load raises a corruption error and verify fails on ``ck``; return the text."""
    result = attempt(ck, outside=ck.parent)
    text = result.raised(sv.CorruptCheckpointError)
    result.verify_failed()
    return text
