"""O_DIRECT shard writes (engine/direct_io): same bytes as the buffered path, clean fallbacks.

The direct path only runs where the test's temporary directory accepts O_DIRECT; tests that
need it skip otherwise, and the fallback tests force a refusal by patching, so they run anywhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import statevault as sv
import statevault.storage.local
from statevault.checkpoint import open_checkpoint
from statevault.engine import direct_io
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.format.manifest import BLOCK_BYTES
from statevault.storage.local import LocalWriteHandle


@pytest.fixture(autouse=True)
def _fresh_refusals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("STATEVAULT_DIRECT_IO", raising=False)
    direct_io.forget_refusals()
    yield
    direct_io.forget_refusals()


def _accepts_direct(directory: Path) -> bool:
    path = directory / "probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    try:
        buffer = direct_io._POOL.take()
        try:
            os.write(fd, memoryview(buffer)[: direct_io.ALIGN])
        finally:
            direct_io._POOL.give(buffer)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink()


def _state(seed: int = 0) -> dict[str, Any]:
    """Sizes chosen to cross bounce buffers, blocks and pages at odd offsets."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(BLOCK_BYTES // 4 * 2 + 1234, generator=generator),  # 3 blocks
        "mid": torch.randn(direct_io.BUFFER_BYTES // 4 + 17, generator=generator),
        "small": [torch.randn(n, generator=generator) for n in (1, 3, 1000, 4097)],
        "half": torch.randn(333, generator=generator).to(torch.bfloat16),
        "n": 7,
    }


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _save_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    state = _state()
    direct, buffered = tmp_path / "direct", tmp_path / "buffered"
    sv.save(state, direct)
    monkeypatch.setenv("STATEVAULT_DIRECT_IO", "0")
    sv.save(state, buffered)
    monkeypatch.delenv("STATEVAULT_DIRECT_IO")
    return direct, buffered


def _same_payload(a: Path, b: Path) -> None:
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    for name, data in files_a.items():
        if name.endswith(".safetensors"):
            assert data == files_b[name], name


def _assert_exact(loaded: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(loaded.view(torch.uint8), expected.view(torch.uint8))
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys()
        for key in expected:
            _assert_exact(loaded[key], expected[key])
    elif isinstance(expected, list):
        assert len(loaded) == len(expected)
        for got, want in zip(loaded, expected, strict=True):
            _assert_exact(got, want)
    else:
        assert loaded == expected


def test_direct_and_buffered_shards_are_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _accepts_direct(tmp_path):
        pytest.skip("the temporary directory's filesystem refuses O_DIRECT")
    opened: list[bool] = []
    real = direct_io.open_sink

    def spy(handle: object, size: int | None = None) -> direct_io.DirectSink | None:
        sink = real(handle, size)
        opened.append(sink is not None)
        return sink

    monkeypatch.setattr(direct_io, "open_sink", spy)
    direct, buffered = _save_both(tmp_path, monkeypatch)
    assert True in opened, "the direct path was not taken"
    _same_payload(direct, buffered)
    _assert_exact(dict(sv.load(direct)), _state())
    assert sv.verify(direct).ok


def test_shards_are_valid_safetensors_with_block_checksums(tmp_path: Path) -> None:
    state = {"big": torch.arange(BLOCK_BYTES // 4 * 2 + 99, dtype=torch.float32)}
    sv.save(state, tmp_path / "ck")
    manifest = open_checkpoint(tmp_path / "ck").manifest
    (entry,) = manifest.tensors
    data = state["big"].numpy().view(np.uint8)
    expected = [crc32c_of(data[: (k + 1) * BLOCK_BYTES]) for k in range(2)]
    assert entry.blocks == tuple(format_checksum(c) for c in expected)
    assert entry.checksum == format_checksum(crc32c_of(data))
    (shard,) = [p for p in (tmp_path / "ck").iterdir() if p.suffix == ".safetensors"]
    (loaded,) = load_file(shard).values()
    assert np.array_equal(loaded, state["big"].numpy())


def test_fcntl_refusal_falls_back_and_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fcntl = fcntl.fcntl
    attempts: list[int] = []

    def refusing(fd: int, command: int, arg: int = 0) -> Any:
        if command == fcntl.F_SETFL and arg & direct_io._O_DIRECT:
            attempts.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing)
    direct, buffered = _save_both(tmp_path, monkeypatch)
    _same_payload(direct, buffered)
    assert len(attempts) == 1, "the refusal is remembered for the filesystem"
    assert direct_io.refused(os.stat(tmp_path).st_dev)
    _assert_exact(dict(sv.load(direct)), _state())


def test_refused_first_write_falls_back_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_io.enabled():
        pytest.skip("no O_DIRECT on this platform")
    real_write = LocalWriteHandle.write
    refused: list[int] = []

    def write(self: LocalWriteHandle, data: memoryview) -> None:
        assert self.fd is not None
        if fcntl.fcntl(self.fd, fcntl.F_GETFL) & direct_io._O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write(self, data)

    monkeypatch.setattr(statevault.storage.local.LocalWriteHandle, "write", write)
    direct, buffered = _save_both(tmp_path, monkeypatch)
    _same_payload(direct, buffered)
    assert len(refused) == 1, "one refused write, then buffered for good"
    _assert_exact(dict(sv.load(direct)), _state())
    assert sv.verify(direct).ok


def test_other_write_errors_are_raised_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_write = LocalWriteHandle.write

    def failing(self: LocalWriteHandle, data: memoryview) -> None:
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "injected: No space left on device")
        real_write(self, data)

    monkeypatch.setattr(statevault.storage.local.LocalWriteHandle, "write", failing)
    with pytest.raises(OSError, match="injected"):
        sv.save(_state(), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing left behind"


@pytest.mark.parametrize(
    "size",
    [0, 1, direct_io.ALIGN - 1, direct_io.ALIGN, 2 * direct_io.BUFFER_BYTES + 5, 3 << 20],
)
def test_sink_writes_exact_bytes(tmp_path: Path, size: int) -> None:
    if not _accepts_direct(tmp_path):
        pytest.skip("the temporary directory's filesystem refuses O_DIRECT")
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    with LocalWriteHandle(str(path)) as handle:
        sink = direct_io.open_sink(handle)
        assert sink is not None
        with sink:
            view = memoryview(payload)
            for cut in (7, direct_io.BUFFER_BYTES, len(payload)):  # uneven pieces
                sink.write(view[:cut])
                view = view[cut:]
    assert path.read_bytes() == payload


def test_disabled_by_environment_and_for_small_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalWriteHandle(str(tmp_path / "f")) as handle:
        assert direct_io.open_sink(handle, direct_io.MIN_BYTES - 1) is None
        monkeypatch.setenv("STATEVAULT_DIRECT_IO", "0")
        assert direct_io.open_sink(handle, direct_io.MIN_BYTES) is None
        handle.write(memoryview(b"x"))
