"""Checksums: CRC32C, hardware-accelerated by the ``crc32c`` package, which releases the GIL.

A checksum is written as ``"crc32c:%08x"`` so that a later format can add another algorithm.

Content hashes, for incremental saves only (is this tensor the same as in the previous
checkpoint?): XXH3-128 from the ``xxhash`` package, written ``"xxh3_128:<32 hex digits>"``.
128 bits, so that two different tensors of a run never share one by chance (the chance is
2**-128 per pair); XXH3 because it runs at memory speed (10 GB/s from memory, 30 GB/s from the
cache on one core of the development VM; its streaming ``update`` releases the GIL), so that
hashing every tensor of a save costs a fraction of writing it. It is
not a cryptographic hash: it decides reuse among a run's own tensors, never the integrity of a
load, which the CRC32C of every tensor still checks (docs/FORMAT.md section 4.4).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import crc32c
import xxhash

ALGORITHM = "crc32c"
_DIGITS = re.compile(r"[0-9a-f]{8}")
CONTENT_HASH = "xxh3_128"
CONTENT_HASH_PATTERN = re.compile(r"xxh3_128:[0-9a-f]{32}")


def crc32c_of(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value`` for incremental use."""
    return int(crc32c.crc32c(data, value))


def crc32c_of_parts(parts: Iterable[bytes | bytearray | memoryview]) -> int:
    value = 0
    for part in parts:
        value = crc32c_of(part, value)
    return value


def format_checksum(value: int) -> str:
    return f"{ALGORITHM}:{value:08x}"


def parse_checksum(text: object) -> int:
    """The integer of a ``crc32c:xxxxxxxx`` string; ValueError when malformed."""
    if not isinstance(text, str) or not text.startswith(ALGORITHM + ":"):
        raise ValueError(f"unknown checksum {text!r}")
    digits = text[len(ALGORITHM) + 1 :]
    if _DIGITS.fullmatch(digits) is None:  # exactly what writers write: 8 lowercase hex digits
        raise ValueError(f"malformed checksum {text[:40]!r}")
    return int(digits, 16)


def content_hash(data: bytes | bytearray | memoryview) -> str:
    """The content hash of ``data``: ``"xxh3_128:<32 hex digits>"``."""
    return f"{CONTENT_HASH}:{xxhash.xxh3_128_hexdigest(data)}"


class ContentHasher:
    """:func:`content_hash` computed piece by piece (as a tensor is written, chunk by chunk)."""

    def __init__(self) -> None:
        self._state = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._state.update(data)

    def text(self) -> str:
        return f"{CONTENT_HASH}:{self._state.hexdigest()}"
