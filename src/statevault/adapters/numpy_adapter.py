"""numpy arrays: stored little-endian, C order; they load back as numpy arrays."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from statevault.adapters.base import ArraySpec, Staging
from statevault.adapters.memory import fresh_host_memory
from statevault.errors import UnsupportedValueError
from statevault.format import dtypes
from statevault.format.manifest import TensorEntry


class NumpyAdapter:
    framework = "numpy"

    def recognizes(self, obj: object) -> bool:
        return type(obj) is np.ndarray

    def describe(self, obj: Any, path: str) -> ArraySpec:
        row = dtypes.from_numpy_name(obj.dtype.name) if obj.dtype.fields is None else None
        if row is None:
            raise UnsupportedValueError(
                path,
                f"numpy dtype {obj.dtype} is not supported (object, string and structured "
                "arrays would need pickle); convert it to a numeric or bool array",
            )
        shape = tuple(int(d) for d in obj.shape)
        return ArraySpec(row.name, shape, math.prod(shape) * row.itemsize)

    def identity(self, obj: Any) -> Hashable | None:
        if obj.nbytes == 0:
            return None
        interface = obj.__array_interface__
        return ("numpy", interface["data"][0], obj.shape, obj.strides, obj.dtype.str)

    def stage(self, objs: Sequence[Any]) -> list[memoryview]:
        return [memoryview(_host_bytes(obj)) for obj in objs]

    def stage_into(self, objs: Sequence[Any], arena: Staging) -> list[memoryview]:
        views = []
        for obj in objs:
            view = arena.take(obj.nbytes)
            target = np.frombuffer(view, dtype=obj.dtype.newbyteorder("<")).reshape(obj.shape)
            np.copyto(target, obj, casting="equiv")
            views.append(view)
        return views

    def prepare_staging(self, objs: Sequence[Any], arena: Staging) -> None:
        return None  # plain host memory needs nothing beyond the prewarm

    def allocate(self, entry: TensorEntry) -> Any:
        dtype = _numpy_dtype(entry)
        memory = fresh_host_memory(entry.nbytes)
        if memory is None:
            return np.empty(entry.shape, dtype=dtype)
        return np.frombuffer(memory, dtype=dtype, count=entry.nbytes // dtype.itemsize).reshape(
            entry.shape
        )

    def from_buffer(self, view: memoryview, entry: TensorEntry) -> Any:
        """An array over ``view`` (no copy); it keeps the underlying mapping alive."""
        return np.frombuffer(view, dtype=_numpy_dtype(entry)).reshape(entry.shape)

    def writable_bytes(self, array: Any) -> memoryview:
        return memoryview(array.reshape(-1).view(np.uint8))

    def finalize(self, array: Any, entry: TensorEntry, device: str | None) -> Any:
        return array

    def mismatch(self, target: Any, loaded: Any) -> str | None:
        if type(loaded) is not np.ndarray:
            return f"the checkpoint holds a {type(loaded).__name__} where the target has an array"
        if target.shape != loaded.shape or target.dtype != loaded.dtype:
            return (
                f"{list(loaded.shape)} {loaded.dtype} in the checkpoint, "
                f"{list(target.shape)} {target.dtype} in the target"
            )
        return None

    def copy_into(self, target: Any, loaded: Any) -> None:
        np.copyto(target, loaded)

    def host_copy_bytes(self, target: Any, loaded: Any) -> int:
        same = type(target) is np.ndarray and target.dtype == loaded.dtype
        return int(target.nbytes) if same and target.shape == loaded.shape else 0


def _numpy_dtype(entry: TensorEntry) -> np.dtype[Any]:
    name = dtypes.lookup(entry.dtype).numpy
    if name is None:
        raise ValueError(f"dtype {entry.dtype} has no numpy equivalent")
    return np.dtype(name).newbyteorder("<")


def _host_bytes(obj: Any) -> Any:
    array = obj
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        array = array.astype(array.dtype.newbyteorder("<"))
    elif not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array.reshape(-1).view(np.uint8)
