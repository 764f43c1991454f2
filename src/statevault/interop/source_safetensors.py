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


def read(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: array}, __metadata__)`` of the safetensors file ``path``, in file order."""
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

    try:
        with safe_open(path, framework=framework) as handle:
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    order = sorted(arrays, key=lambda n: header[n]["data_offsets"][0] if n in header else 0)
    return {name: arrays[name] for name in order}, {str(k): str(v) for k, v in metadata.items()}
