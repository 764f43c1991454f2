"""The numeric part of ``statevault diff``: read two tensors (checksums verified) and measure
``max |a-b|`` and ``||a-b|| / ||a||`` in float64 (complex128), a slice at a time.

numpy does the arithmetic where it knows the dtype; dtypes it lacks (bfloat16, float8) go
through torch, imported only then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from statevault.checkpoint import OpenCheckpoint
from statevault.errors import CorruptCheckpointError
from statevault.format import dtypes
from statevault.format.manifest import TensorEntry

CHUNK_ELEMENTS = 1 << 22  # float64 temporaries stay at a few tens of MiB whatever the tensor


def read_tensor(checkpoint: OpenCheckpoint, index: int) -> bytearray:
    """The raw bytes of tensor ``index``, checksum verified."""
    outcome = checkpoint.reader.read([index], _scratch, verify=True)
    if outcome.problems:
        where = checkpoint.directory
        raise CorruptCheckpointError(f"{where} is damaged: {outcome.problems[0]}", outcome.problems)
    buffer = outcome.arrays[index]
    assert isinstance(buffer, bytearray)
    return buffer


def _scratch(entry: TensorEntry) -> tuple[object, memoryview]:
    buffer = bytearray(entry.nbytes)
    return buffer, memoryview(buffer)


class NoArithmetic(Exception):
    """These two tensors cannot be compared numerically here (the message says why)."""


@dataclass(frozen=True)
class Arithmetic:
    """An array library: ``flat`` views raw bytes as a flat array, ``wide`` widens a slice."""

    xp: Any
    flat: Callable[[bytearray, TensorEntry], Any]
    wide: Callable[[Any], Any]


def backend_for(a: TensorEntry, b: TensorEntry) -> Arithmetic:
    """numpy when it knows both dtypes; otherwise torch (imported now), or NoArithmetic."""
    if _numpy_dtype(a) is not None and _numpy_dtype(b) is not None:
        return Arithmetic(np, _numpy_flat, _numpy_wide)
    try:
        import torch
    except ImportError:
        raise NoArithmetic(
            f"comparing {a.dtype}/{b.dtype} values needs torch: pip install 'statevault[torch]'"
        ) from None
    return Arithmetic(torch, _torch_flat, _torch_wide)


def _numpy_dtype(entry: TensorEntry) -> np.dtype[Any] | None:
    name = dtypes.lookup(entry.dtype).numpy
    return np.dtype(name).newbyteorder("<") if name is not None else None


def _numpy_flat(buffer: bytearray, entry: TensorEntry) -> Any:
    return np.frombuffer(buffer, dtype=_numpy_dtype(entry))


def _numpy_wide(chunk: Any) -> Any:
    return chunk.astype(np.complex128 if chunk.dtype.kind == "c" else np.float64)


def _torch_flat(buffer: bytearray, entry: TensorEntry) -> Any:
    import torch

    from statevault.adapters.torch_adapter import torch_dtype

    try:
        return torch.frombuffer(buffer, dtype=torch_dtype(entry.dtype))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise NoArithmetic(f"torch cannot read {entry.dtype} values: {exc}") from None


def _torch_wide(chunk: Any) -> Any:
    import torch

    try:
        return chunk.to(torch.complex128 if chunk.is_complex() else torch.float64)
    except (TypeError, RuntimeError) as exc:
        raise NoArithmetic(f"torch cannot widen {chunk.dtype} to float64: {exc}") from None


def distances(
    arithmetic: Arithmetic, bytes_a: bytearray, a: TensorEntry, bytes_b: bytearray, b: TensorEntry
) -> tuple[float, float]:
    """``(max |a-b|, ||a-b|| / ||a||)`` in float64, a slice at a time."""
    flat_a, flat_b = arithmetic.flat(bytes_a, a), arithmetic.flat(bytes_b, b)
    totals = _Totals()
    with np.errstate(all="ignore"):  # inf - inf and NaN are expected: handled in add()
        for start in range(0, len(flat_a), CHUNK_ELEMENTS):
            chunk_a = arithmetic.wide(flat_a[start : start + CHUNK_ELEMENTS])
            chunk_b = arithmetic.wide(flat_b[start : start + CHUNK_ELEMENTS])
            totals.add(arithmetic.xp, chunk_a, chunk_b)
    return totals.max_abs, relative(totals.sum_sq_diff, totals.sum_sq_a)


@dataclass
class _Totals:
    max_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_a: float = 0.0

    def add(self, xp: Any, a: Any, b: Any) -> None:
        """Fold in one slice; positions equal on both sides (NaN and NaN too) differ by 0."""
        magnitude = xp.abs(a - b)
        largest = float(magnitude.max())
        if math.isnan(largest):  # a NaN, or inf - inf: the slow path sorts out which are equal
            equal = (a == b) | (xp.isnan(a) & xp.isnan(b))
            magnitude = xp.where(equal, 0, magnitude)
            largest = float(magnitude.max())
        if math.isnan(largest) or largest > self.max_abs:
            self.max_abs = largest  # a NaN on one side only sticks: nothing compares greater
        self.sum_sq_diff += float(xp.linalg.norm(magnitude)) ** 2
        self.sum_sq_a += float(xp.linalg.norm(a)) ** 2


def relative(sum_sq_diff: float, sum_sq_a: float) -> float:
    if sum_sq_a > 0:
        return math.sqrt(sum_sq_diff) / math.sqrt(sum_sq_a)
    return 0.0 if sum_sq_diff == 0 else math.inf


# ---- output -----------------------------------------------------------------------------------
