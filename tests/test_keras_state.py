"""Keras models and optimizers, tf.Module, random generators and mixed precision as Stateful
state of sv.save / sv.load, restored into objects built again (new auto-generated names)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")
keras = pytest.importorskip("keras")

import statevault as sv  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy() -> Iterator[None]:
    yield
    keras.mixed_precision.set_global_policy("float32")


def sequential() -> Any:
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )


def functional() -> Any:
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    skip = keras.layers.Dense(8)(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Add()([hidden, skip]))
    return keras.Model(inputs, outputs)


class Subclassed(keras.Model):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.encoder = keras.layers.Dense(8, activation="relu")
        self.blocks = [keras.layers.Dense(8), keras.layers.Dense(8)]
        self.head = keras.layers.Dense(2)

    def call(self, x: Any, training: bool = False) -> Any:
        x = self.encoder(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def subclassed() -> Any:
    model = Subclassed()
    model(np.zeros((1, 4), "float32"))  # built
    return model


def train(model: Any, steps: int = 3) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8 * steps, 4)), rng.normal(size=(8 * steps, 2))
    model.fit(x.astype("float32"), y.astype("float32"), batch_size=8, epochs=1, verbose=0)


def values(variables: list[Any]) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in variables]


def assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(values(a), values(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("make", [sequential, functional, subclassed])
def test_model_and_optimizer_round_trip(tmp_path: Path, make: Callable[[], Any]) -> None:
    model = make()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    train(model)
    sv.save({"model": model, "optimizer": model.optimizer, "step": 3}, tmp_path / "c")

    fresh = make()  # same process: Keras gives its layers new names (dense_7, ...)
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    assert not fresh.optimizer.built
    state = sv.load(tmp_path / "c", into={"model": fresh, "optimizer": fresh.optimizer})
    assert state["step"] == 3
    assert fresh.optimizer.built and int(fresh.optimizer.iterations) == 3
    assert_same(model.variables, fresh.variables)
    assert_same(model.optimizer.variables, fresh.optimizer.variables)


def test_keys_are_structural(tmp_path: Path) -> None:
    model = sequential()
    sv.save({"model": model}, tmp_path / "c")
    keys = list(sv.load(tmp_path / "c")["model"])
    assert keys == [
        "0.kernel",
        "0.bias",
        "1.seed_generator_state",
        "2.gamma",
        "2.beta",
        "2.moving_mean",
        "2.moving_variance",
        "3.kernel",
        "3.bias",
    ]
    assert list(sv.load(tmp_path / "c", only="model")) == keys


def test_a_different_architecture_is_refused(tmp_path: Path) -> None:
    sv.save({"model": sequential()}, tmp_path / "c")
    with pytest.raises(sv.StateMismatchError) as caught:
        sv.load(tmp_path / "c", into={"model": functional()})
    assert caught.value.missing or caught.value.mismatched


def test_unbuilt_optimizer_is_built_for_the_model_in_the_same_into(tmp_path: Path) -> None:
    model, optimizer = sequential(), keras.optimizers.SGD(0.1, momentum=0.9)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(np.ones((2, 4), "float32"), training=True))
    optimizer.apply_gradients(
        zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True)
    )
    sv.save({"model": model, "opt": optimizer}, tmp_path / "c")

    fresh_model, fresh_optimizer = sequential(), keras.optimizers.SGD(0.1, momentum=0.9)
    sv.load(tmp_path / "c", into={"model": fresh_model, "opt": fresh_optimizer})
    assert_same(optimizer.variables, fresh_optimizer.variables)


def test_unbuilt_model_is_an_error_not_a_silent_no_op(tmp_path: Path) -> None:
    sv.save({"model": subclassed()}, tmp_path / "c")
    with pytest.raises(sv.CheckpointError, match="build it before restoring"):
        sv.load(tmp_path / "c", into={"model": Subclassed()})


def test_tf_module_by_attribute_path(tmp_path: Path) -> None:
    class Block(tf.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((3, 3), (seed, 0)))
            self.layers = [tf.Variable(float(seed)), tf.Variable([seed, seed], dtype=tf.int32)]

    class Net(tf.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.block = Block(seed)
            self.scale = tf.Variable(tf.cast(seed, tf.bfloat16))

    sv.save({"net": Net(1)}, tmp_path / "c")
    assert sorted(sv.load(tmp_path / "c")["net"]) == [
        "block.layers.0",
        "block.layers.1",
        "block.w",
        "scale",
    ]
    target = Net(2)
    sv.load(tmp_path / "c", into={"net": target})
    assert_same(list(Net(1).variables), list(target.variables))


def test_random_generators_continue_their_streams(tmp_path: Path) -> None:
    generator = tf.random.Generator.from_seed(11)
    seeds = keras.random.SeedGenerator(5)
    generator.normal((3,))
    keras.random.normal((2,), seed=seeds)
    sv.save({"gen": generator, "seeds": seeds}, tmp_path / "c")
    expected = (generator.normal((4,)).numpy(), keras.random.normal((4,), seed=seeds).numpy())

    other_gen, other_seeds = tf.random.Generator.from_seed(99), keras.random.SeedGenerator(1)
    sv.load(tmp_path / "c", into={"gen": other_gen, "seeds": other_seeds})
    assert np.array_equal(other_gen.normal((4,)).numpy(), expected[0])
    assert np.array_equal(keras.random.normal((4,), seed=other_seeds).numpy(), expected[1])


def test_mixed_precision_keeps_dtypes_and_the_loss_scale(tmp_path: Path) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = sequential()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    train(model, steps=4)
    sv.save({"model": model, "optimizer": model.optimizer}, tmp_path / "c")

    fresh = sequential()
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    sv.load(tmp_path / "c", into={"model": fresh, "optimizer": fresh.optimizer})
    assert_same(model.variables, fresh.variables)
    assert_same(model.optimizer.variables, fresh.optimizer.variables)  # scale, counter, slots
    assert float(fresh.optimizer.dynamic_scale) == float(model.optimizer.dynamic_scale)
    assert fresh.layers[0].dtype_policy.name == "mixed_float16"

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["body"]
    dtypes = {row["path"]: row["dtype"] for row in manifest["tensors"]}
    assert dtypes["model/0.kernel"] == "float32"  # variables stay float32 under mixed_float16


def test_model_in_a_manager_with_strict_false(tmp_path: Path) -> None:
    model = sequential()
    with sv.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, {"model": model, "rng": sv.RNGState()})
        bigger = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
        with pytest.warns(UserWarning, match="partial restore"):
            restored = manager.restore(into={"model": bigger}, strict=False)
    assert restored is not None and restored.step == 1


KERAS_RECIPE = """
import random, sys
import numpy as np
import keras
import tensorflow as tf
import statevault as sv
import statevault.keras as svk

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.1), keras.layers.Dense(1)])
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
data = tf.data.Dataset.from_tensor_slices((x, x @ np.ones((4, 1), "float32"))).batch(8)
ckpt = svk.CheckpointCallback(sys.argv[1], state={"rng": sv.RNGState()})
history = model.fit(data, epochs=int(sys.argv[2]), callbacks=[ckpt], verbose=0)
ckpt.close()
print(history.epoch, "torch" in sys.modules)
"""


def test_the_rng_recipe_resumes_in_a_process_without_torch(tmp_path: Path) -> None:
    """The documented Keras recipe, ``CheckpointCallback(run, state={"rng": sv.RNGState()})``,
    restarted in a new process, on a machine where torch is installed: the restart restores
    the checkpoint that the first process (which never imported torch) saved."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(KERAS_RECIPE)
    run = tmp_path / "run"
    outputs = []
    for epochs in (1, 2):
        done = subprocess.run(
            [sys.executable, str(script), str(run), str(epochs)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout.strip().splitlines()[-1])
    assert outputs[0] == "[0] False"
    assert outputs[1].startswith("[1]"), f"the restart resumed after epoch 0: {outputs[1]}"
