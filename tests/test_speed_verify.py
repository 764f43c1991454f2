"""Block-parallel checksum verification (engine/verify): it finds every damaged tensor, whether
the damage lies in its first, a middle or its last block, with or without block checksums."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from statevault.engine import verify
from statevault.format.checksum import crc32c_of, format_checksum
from statevault.format.manifest import BLOCK_BYTES, TensorEntry


def _entry(data: np.ndarray, with_blocks: bool = True) -> TensorEntry:
    blocks = tuple(
        format_checksum(crc32c_of(memoryview(data[:end])))
        for end in range(BLOCK_BYTES, len(data), BLOCK_BYTES)
    )
    return TensorEntry(
        path="t",
        framework="numpy",
        dtype="uint8",
        shape=(len(data),),
        file="f",
        offset=0,
        nbytes=len(data),
        checksum=format_checksum(crc32c_of(memoryview(data))),
        blocks=blocks if with_blocks else (),
    )


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, 2 * BLOCK_BYTES + 5, dtype=np.uint8)


def test_pieces_follow_the_blocks(data: np.ndarray) -> None:
    pieces = verify.pieces_of(0, _entry(data), memoryview(data))
    assert [len(p.view) for p in pieces] == [BLOCK_BYTES, BLOCK_BYTES, 5]
    assert len(verify.pieces_of(0, _entry(data, with_blocks=False), memoryview(data))) == 1


@pytest.mark.parametrize("with_blocks", [True, False])
@pytest.mark.parametrize("where", [0, BLOCK_BYTES + 3, 2 * BLOCK_BYTES + 4])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_damage_anywhere_is_found(
    data: np.ndarray, where: int, with_blocks: bool, threads: int
) -> None:
    entry = _entry(data, with_blocks)
    small = data[:100].copy()
    items = [(0, entry, memoryview(data)), (1, _entry(small), memoryview(small))]
    assert verify.failed(items, threads) == set()
    damaged = data.copy()
    damaged[where] ^= 1
    items[0] = (0, entry, memoryview(damaged))
    assert verify.failed(items, threads) == {0}


def test_wrong_block_checksum_is_a_failure(data: np.ndarray) -> None:
    entry = _entry(data)
    bad = dataclasses.replace(entry, blocks=(entry.blocks[0], format_checksum(0)))
    assert verify.failed([(7, bad, memoryview(data))]) == {7}


def test_nothing_to_check() -> None:
    assert verify.failed([]) == set()
    empty = np.zeros(0, dtype=np.uint8)
    assert verify.failed([(0, _entry(empty), memoryview(empty))]) == set()


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="the kernel has no transparent huge pages to ask for",
)
def test_loaded_shards_are_mapped_with_huge_page_advice(tmp_path: Path) -> None:
    """A local load maps each shard with MADV_HUGEPAGE (smaps flag "hg"), so that a cold load's
    page faults read the file in 2 MiB folios."""
    import torch

    import statevault as sv

    sv.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "ck")
    loaded = sv.load(tmp_path / "ck")
    address = loaded["w"].data_ptr()
    flags = _vm_flags_of(address)
    assert flags is not None, "the loaded tensor does not live in a mapping"
    assert "hg" in flags.split(), flags


def _vm_flags_of(address: int) -> str | None:
    """The VmFlags line of the mapping holding ``address`` in this process."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("VmFlags:"):
                return line.split(":", 1)[1]
    return None
