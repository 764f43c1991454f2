"""The safetensors container: an 8-byte little-endian header length, a JSON header, the data.

statevault writes its payload shards in this layout so that the stock ``safetensors`` library (and
so the whole HF ecosystem) opens them. The data section is written by the engine; this module only
lays out and encodes the header. Offsets in the header are relative to the data section and must
cover it without holes, which the layout guarantees by packing tensors back to back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

ALIGNMENT = 64  # the data section starts on a cache line (safetensors itself pads to 8)
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    code: str
    shape: tuple[int, ...]
    begin: int  # relative to the data section
    end: int


def encode_header(entries: Sequence[HeaderEntry], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included), padded with spaces to ALIGNMENT."""
    header: dict[str, object] = {"__metadata__": metadata}
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.code,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    padded = len(text) + (-(len(text) + _LENGTH.size) % ALIGNMENT)
    return _LENGTH.pack(padded) + text.ljust(padded, b" ")
