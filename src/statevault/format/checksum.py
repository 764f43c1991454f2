"""Checksums: CRC32C, hardware-accelerated by the ``crc32c`` package, which releases the GIL.

A checksum is written as ``"crc32c:%08x"`` so that a later format can add another algorithm.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import crc32c

ALGORITHM = "crc32c"
_DIGITS = re.compile(r"[0-9a-f]{8}")


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
