"""TensorFlow tensors and variables: tf.Tensor, tf.Variable (ResourceVariable, distributed
variables) and Keras 3 Variables of the TensorFlow backend.

Staging always copies values out (``read_value`` then host bytes): training assigns to
variables, so a save never views their buffers in place. Loading fills numpy buffers and turns
them into ``tf.Tensor`` (or ``tf.Variable`` where a variable was saved); ``into=`` assigns into
the target variable (``Variable.assign``), which keeps the variable's identity, its device and
its distribution (a MirroredVariable is assigned on every replica).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from statevault.adapters.base import ArraySpec, Staging
from statevault.errors import UnsupportedValueError
from statevault.format import dtypes
from statevault.format.manifest import TensorEntry


def _keras_variable_type() -> type | None:
    try:
        from keras import Variable
    except ImportError:  # keras is not installed: only tf types exist
        return None
    return Variable  # type: ignore[no-any-return]


_KERAS_VARIABLE = _keras_variable_type()


def is_tf_array(obj: object) -> bool:
    """A tf.Tensor (eager), a tf.Variable or a Keras Variable of the TensorFlow backend."""
    if isinstance(obj, (tf.Variable, tf.Tensor)):
        return True
    return _KERAS_VARIABLE is not None and isinstance(obj, _KERAS_VARIABLE)


def _is_variable(obj: object) -> bool:
    if isinstance(obj, tf.Variable):
        return True
    return _KERAS_VARIABLE is not None and isinstance(obj, _KERAS_VARIABLE)


class TensorFlowAdapter:
    framework = "tensorflow"

    def recognizes(self, obj: object) -> bool:
        return is_tf_array(obj)

    def describe(self, obj: Any, path: str) -> ArraySpec:
        name = _dtype_name(obj, path)
        shape = tuple(int(d) for d in obj.shape)
        attrs: dict[str, Any] = {}
        if _is_variable(obj):
            attrs["variable"] = True
            if getattr(obj, "trainable", False):
                attrs["trainable"] = True
        return ArraySpec(name, shape, math.prod(shape) * dtypes.lookup(name).itemsize, attrs)

    def identity(self, obj: Any) -> Hashable | None:
        # A variable reached twice (a tied weight) is one leaf; tensors are values, never tied.
        return ("tensorflow", id(obj)) if _is_variable(obj) else None

    def stage(self, objs: Sequence[Any]) -> list[memoryview]:
        return [memoryview(_host_bytes(obj)) for obj in objs]

    def stage_into(self, objs: Sequence[Any], arena: Staging) -> list[memoryview]:
        views = []
        for obj in objs:
            source = _host_bytes(obj)
            view = arena.take(source.nbytes)
            np.copyto(np.frombuffer(view, dtype=np.uint8), source)
            views.append(view)
        return views

    def prepare_staging(self, objs: Sequence[Any], arena: Staging) -> None:
        return None  # values are read to host memory first: nothing to pin

    def allocate(self, entry: TensorEntry) -> Any:
        return np.empty(entry.shape, dtype=numpy_dtype(entry.dtype))

    def writable_bytes(self, array: Any) -> memoryview:
        return memoryview(array.reshape(-1).view(np.uint8))

    def from_buffer(self, view: memoryview, entry: TensorEntry) -> Any:
        return np.frombuffer(view, dtype=numpy_dtype(entry.dtype)).reshape(entry.shape)

    def finalize(self, array: Any, entry: TensorEntry, device: str | None) -> Any:
        with tf.device(device) if device is not None else _no_scope():
            tensor = tf.constant(array, dtype=tf.as_dtype(entry.dtype))
            if entry.attrs.get("variable") is True and not entry.dtype.startswith("float8"):
                # (TensorFlow has no float8 variables on the CPU: such a row loads as a tensor)
                return tf.Variable(tensor, trainable=entry.attrs.get("trainable") is True)
        return tensor

    def mismatch(self, target: Any, loaded: Any) -> str | None:
        if not is_tf_array(loaded):
            return f"the checkpoint holds a {type(loaded).__name__} where the target has a tensor"
        target_shape = tuple(int(d) for d in target.shape)
        loaded_shape = tuple(int(d) for d in loaded.shape)
        target_dtype, loaded_dtype = _dtype_of(target).name, _dtype_of(loaded).name
        if target_shape != loaded_shape or target_dtype != loaded_dtype:
            return (
                f"{list(loaded_shape)} {loaded_dtype} in the checkpoint, "
                f"{list(target_shape)} {target_dtype} in the target"
            )
        if not _is_variable(target):
            return "the target is an immutable tf.Tensor; restore into a tf.Variable"
        return None

    def copy_into(self, target: Any, loaded: Any) -> None:
        target.assign(loaded.read_value() if isinstance(loaded, tf.Variable) else loaded)

    def host_copy_bytes(self, target: Any, loaded: Any) -> int:
        return 0  # an assign goes through TensorFlow's runtime, in order


class _no_scope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy (or ml_dtypes) dtype TensorFlow uses for the format's dtype ``name``."""
    try:
        dtype: np.dtype[Any] = np.dtype(tf.as_dtype(name).as_numpy_dtype)
    except TypeError:
        raise ValueError(f"this TensorFlow has no dtype {name}") from None
    return dtype


def _dtype_of(obj: Any) -> tf.DType:
    return tf.as_dtype(obj.dtype)


def _dtype_name(obj: Any, path: str) -> str:
    dtype = _dtype_of(obj)
    if dtype.name not in dtypes.DTYPES or dtype in (tf.string, tf.resource, tf.variant):
        raise UnsupportedValueError(
            path,
            f"TensorFlow dtype {dtype.name} is not supported (strings, resources, variants and "
            "quantized types have no byte layout in the format); cast it to a numeric dtype",
        )
    return str(dtype.name)


def _host_bytes(obj: Any) -> Any:
    """The value's bytes as a C-contiguous uint8 array that training cannot change (a variable
    is read first: the tensor read is a snapshot, later assignments do not reach it)."""
    if _KERAS_VARIABLE is not None and isinstance(obj, _KERAS_VARIABLE):
        obj = obj.value  # type: ignore[attr-defined]
    value = obj.read_value() if isinstance(obj, tf.Variable) else obj
    return np.ascontiguousarray(value.numpy()).reshape(-1).view(np.uint8)
