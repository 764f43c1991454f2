"""Optional dtype conversion of floating-point arrays on export (``--dtype``), numpy only.

``keep`` (the default) writes every array bit for bit. ``float32``, ``float16`` and
``bfloat16`` convert arrays of the floating types ``float16``, ``bfloat16``, ``float32`` and
``float64`` (round to nearest even; ``float64 -> bfloat16`` rounds through ``float32``) and keep
every other dtype (integers, booleans, float8) as it is.
"""

from __future__ import annotations

import numpy as np

from statevault.errors import CheckpointError

TARGETS = ("keep", "float32", "float16", "bfloat16")
_CONVERTIBLE = ("float16", "bfloat16", "float32", "float64")


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise CheckpointError(f"dtype {target!r} is not one of {', '.join(TARGETS)}")


def output_dtype(source: str, target: str) -> str:
    """The dtype an array of ``source`` is written as."""
    if target == "keep" or source not in _CONVERTIBLE:
        return source
    return target


def convert(data: memoryview, source: str, target: str) -> memoryview:
    """The bytes of ``data`` (elements of ``source``) as elements of ``target``."""
    if source == target:
        return data
    values = _to_float(np.frombuffer(data, dtype=np.uint8), source)
    if target == "bfloat16":
        return memoryview(_to_bfloat16_bits(values.astype(np.float32)).tobytes())
    return memoryview(values.astype(np.dtype(target).newbyteorder("<")).tobytes())


def _to_float(raw: np.ndarray, source: str) -> np.ndarray:
    if source == "bfloat16":
        bits = raw.view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return raw.view(np.dtype(source).newbyteorder("<"))


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    bits = values.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(values), 0x7FC0, rounded)
    return rounded.astype("<u2")
