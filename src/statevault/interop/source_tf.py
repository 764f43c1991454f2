"""Read a TensorFlow checkpoint for import: ``tf.train.load_checkpoint`` (no pickle).

Every variable becomes an array under its checkpoint name as key
(``model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`` for object-based
checkpoints, the variable name for name-based ones). The serialized object graph
(``_CHECKPOINTABLE_OBJECT_GRAPH``) and string tensors are not arrays and are skipped. Arrays
are numpy arrays, or ``tf.Tensor``s for dtypes numpy lacks (bfloat16).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from statevault.errors import CheckpointError
from statevault.format import dtypes
from statevault.interop.progress import ByteProgress, Capped

OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def resolve_prefix(path: str) -> str | None:
    """The checkpoint prefix ``path`` names: itself when ``path.index`` exists, the prefix of
    ``ckpt-1.index`` itself, or the latest checkpoint of a directory with a ``checkpoint``
    file; None when none of these."""
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    if os.path.isfile(path + ".index"):
        return path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "checkpoint")):
        import tensorflow as tf

        latest: str | None = tf.train.latest_checkpoint(path)
        return latest
    return None


def read(path: str, progress: ByteProgress) -> tuple[dict[str, Any], list[str]]:
    """``({variable name: array}, skipped names)`` of the TensorFlow checkpoint at ``path``;
    ``progress`` is told the bytes of the variables, then each one's as it is read."""
    prefix = resolve_prefix(path)
    if prefix is None:
        raise CheckpointError(
            f"{path} is not a TensorFlow checkpoint: no {path}.index, and not a directory with "
            "a 'checkpoint' file"
        )
    try:
        import tensorflow as tf
    except ImportError:
        raise CheckpointError(
            "importing a TensorFlow checkpoint needs tensorflow: pip install "
            "'statevault[tensorflow]'"
        ) from None
    try:
        reader = tf.train.load_checkpoint(prefix)
        kinds = reader.get_variable_to_dtype_map()
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as exc:
        raise CheckpointError(f"cannot read the TensorFlow checkpoint {prefix}: {exc}") from None
    skipped = sorted(name for name in kinds if name == OBJECT_GRAPH or kinds[name] == tf.string)
    wanted = sorted(set(kinds) - set(skipped))
    sizes = {name: math.prod(shapes.get(name) or ()) * kinds[name].size for name in wanted}
    counter = Capped(progress, sum(sizes.values()))
    arrays: dict[str, Any] = {}
    for name in wanted:
        arrays[name] = _variable(tf, reader, prefix, name, kinds[name])
        counter.advance(sizes[name])
    return arrays, skipped


def _variable(tf: Any, reader: Any, prefix: str, name: str, kind: Any) -> Any:
    try:
        value = reader.get_tensor(name)
    except (tf.errors.OpError, ValueError) as exc:
        raise CheckpointError(f"{prefix}: cannot read variable {name}: {exc}") from None
    if isinstance(value, np.generic):  # a 0-d variable: keep it an array, not a scalar
        value = np.asarray(value)
    if dtypes.from_numpy_name(str(value.dtype)) is None:  # bfloat16 and friends: keep TF's
        value = tf.constant(value, dtype=kind)
    return value
