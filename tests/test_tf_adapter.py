"""The TensorFlow adapter: tf.Tensor, tf.Variable and Keras Variables as array leaves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")
keras = pytest.importorskip("keras")

import statevault as sv  # noqa: E402
from statevault.format import dtypes  # noqa: E402


# Every dtype of the format that TensorFlow has (strings, resources, quantized types excepted).
def _tf_has(name: str) -> bool:
    try:
        tf.as_dtype(name)
    except TypeError:
        return False
    return True


TF_DTYPES = [name for name in dtypes.DTYPES if _tf_has(name)]


def random_array(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random bit patterns of dtype ``name`` (NaN payloads, -0.0, subnormals, inf included)."""
    dtype = np.dtype(tf.as_dtype(name).as_numpy_dtype)
    rng = np.random.default_rng(seed)
    if name == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def raw(value: object) -> bytes:
    array = value.numpy()  # type: ignore[attr-defined]
    return np.ascontiguousarray(array).tobytes()


def test_the_table_covers_the_tf_dtypes() -> None:
    expected = {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"}
    expected |= {"float16", "bfloat16", "float32", "float64", "complex64", "complex128"}
    expected |= {"float8_e4m3fn", "float8_e5m2"}
    assert expected <= set(TF_DTYPES)


def test_every_dtype_round_trips_bit_for_bit(tmp_path: Path) -> None:
    tensors = {n: tf.constant(random_array(n, (3, 5), i)) for i, n in enumerate(TF_DTYPES)}
    variables = {  # TensorFlow has no float8 variables on CPU (no AssignVariableOp kernel)
        n: tf.Variable(random_array(n, (7,), 100 + i), trainable=n.startswith("float"))
        for i, n in enumerate(TF_DTYPES)
        if not n.startswith("float8")
    }
    scalars = {n: tf.constant(random_array(n, (), 200 + i)) for i, n in enumerate(TF_DTYPES)}
    sv.save({"t": tensors, "v": variables, "s": scalars, "empty": tf.zeros((0, 4))}, tmp_path / "c")

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["body"]
    rows = {row["path"]: row for row in manifest["tensors"]}
    assert rows["t/bfloat16"]["dtype"] == "bfloat16" and rows["t/bfloat16"]["shape"] == [3, 5]
    assert {row["framework"] for row in rows.values()} == {"tensorflow"}

    loaded = sv.load(tmp_path / "c")
    for name in TF_DTYPES:
        for group, source in (("t", tensors), ("v", variables), ("s", scalars)):
            if name not in source:
                continue
            value = loaded[group][name]
            assert value.dtype == source[name].dtype, (group, name)
            assert tuple(value.shape) == tuple(source[name].shape)
            assert raw(value) == raw(source[name]), (group, name)
        assert isinstance(loaded["t"][name], tf.Tensor)
        if name in variables:
            assert isinstance(loaded["v"][name], tf.Variable)
            assert loaded["v"][name].trainable == name.startswith("float")
    assert tuple(loaded["empty"].shape) == (0, 4)


def test_load_into_assigns_variables_in_place(tmp_path: Path) -> None:
    saved = {"w": tf.Variable(tf.random.normal((4, 3))), "b": tf.Variable([1, 2, 3], tf.int64)}
    sv.save(saved, tmp_path / "c")
    w, b = tf.Variable(tf.zeros((4, 3))), tf.Variable([0, 0, 0], tf.int64)
    sv.load(tmp_path / "c", into={"w": w, "b": b})
    assert raw(w) == raw(saved["w"]) and b.numpy().tolist() == [1, 2, 3]

    kernel = keras.Variable(np.zeros((4, 3), "float32"))  # a Keras Variable is a target too
    sv.load(tmp_path / "c", into={"w": kernel, "b": tf.Variable([0, 0, 0], tf.int64)})
    assert raw(kernel) == raw(saved["w"])


def test_load_into_refuses_what_does_not_fit(tmp_path: Path) -> None:
    sv.save({"w": tf.Variable(tf.ones((2, 2)))}, tmp_path / "c")
    wrong_dtype = tf.Variable(tf.zeros((2, 2), tf.float64))
    with pytest.raises(sv.StateMismatchError) as caught:
        sv.load(tmp_path / "c", into={"w": wrong_dtype})
    assert caught.value.mismatched == [
        "w: [2, 2] float32 in the checkpoint, [2, 2] float64 in the target"
    ]
    assert wrong_dtype.numpy().sum() == 0  # nothing changed

    constant = tf.zeros((2, 2))
    with pytest.raises(sv.StateMismatchError, match=r"immutable tf\.Tensor"):
        sv.load(tmp_path / "c", into={"w": constant})


def test_strings_are_refused_with_the_key_path(tmp_path: Path) -> None:
    with pytest.raises(sv.UnsupportedValueError, match=r"meta/names.*string"):
        sv.save({"meta": {"names": tf.constant(["a", "b"])}}, tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")


def test_async_save_writes_the_value_of_save_time(tmp_path: Path) -> None:
    variable = tf.Variable(tf.fill((256, 256), 1.0))
    with sv.CheckpointManager(tmp_path / "run", async_save=True) as manager:
        manager.save(1, {"w": variable})
        variable.assign(tf.fill((256, 256), 2.0))  # training goes on while the save is written
        manager.wait()
    assert float(tf.reduce_max(sv.load(tmp_path / "run" / "step_000000001")["w"])) == 1.0


def test_tied_variables_are_stored_once(tmp_path: Path) -> None:
    shared = tf.Variable(tf.ones((3,)))
    sv.save({"a": shared, "b": shared}, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["body"]
    assert len(manifest["tensors"]) == 1
