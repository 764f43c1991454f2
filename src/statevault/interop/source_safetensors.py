"""Read a safetensors file for import: every array by name, and the header's ``__metadata__``.

Arrays come back as numpy arrays when numpy has every dtype of the file, else as torch tensors
(bfloat16, float8: the ``torch`` extra is then needed). Nothing is executed: safetensors is a
JSON header and raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from statevault.errors import CheckpointError
from statevault.format import dtypes
from statevault.interop.progress import ByteProgress, Capped

_MAX_HEADER = 100 << 20  # what the safetensors library itself accepts


def read_header(path: str) -> dict[str, Any]:
    """The JSON header of the safetensors file ``path`` (CheckpointError when it is not one)."""
    try:
        with open(path, "rb") as source:
            prefix = source.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_MAX_HEADER, os.fstat(source.fileno()).st_size - 8):
                raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(source.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not an object)")
    return header


def looks_like_safetensors(path: str) -> bool:
    try:
        with open(path, "rb") as source:
            prefix = source.read(9)
    except OSError:
        return False
    return len(prefix) == 9 and prefix[8:9] == b"{"


def read(path: str, progress: ByteProgress) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: array}, __metadata__)`` of the safetensors file ``path``, in file order;
    ``progress`` is told the bytes of the arrays, then each array's as it is read."""
    header = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    numpy_codes = {row.safetensors for row in dtypes.DTYPES.values() if row.numpy is not None}
    codes = {info.get("dtype") for info in header.values() if isinstance(info, dict)}
    framework = "np" if codes <= numpy_codes else "pt"
    if framework == "pt":
        try:
            import torch  # noqa: F401
        except ImportError:
            lacking = ", ".join(sorted(map(str, codes - numpy_codes)))
            raise CheckpointError(
                f"{path} holds dtypes numpy lacks ({lacking}):"
                " install the torch extra (pip install 'statevault[torch]') to import it"
            ) from None
    from safetensors import SafetensorError, safe_open

    spans = {name: _span(info) for name, info in header.items()}
    order = sorted(spans, key=lambda name: spans[name][0])
    counter = Capped(progress, sum(stop - start for start, stop in spans.values()))
    arrays: dict[str, Any] = {}
    try:
        with safe_open(path, framework=framework) as handle:
            for name in order:
                arrays[name] = handle.get_tensor(name)
                counter.advance(spans[name][1] - spans[name][0])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    return arrays, {str(k): str(v) for k, v in metadata.items()}


def _span(info: Any) -> tuple[int, int]:
    """``data_offsets`` of a header entry; (0, 0) when malformed (safe_open then refuses it)."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
        return max(0, offsets[0]), max(offsets)
    return 0, 0
