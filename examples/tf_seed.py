"""The TensorFlow checkpoint guide's training loop, checkpointed with statevault.

TensorFlow's own version of the checkpointing in this script is::

    checkpoint = tf.train.Checkpoint(optimizer=optimizer, model=model)
    manager = tf.train.CheckpointManager(checkpoint, "./checkpoints", max_to_keep=3)
    manager.save(); checkpoint.restore(tf.train.latest_checkpoint("./checkpoints"))

With statevault the same three lines become a state dict and a CheckpointManager: the latest
valid checkpoint is restored (its checksums checked), the three newest are kept, a save is
atomic, and SIGTERM makes the loop save at its next step and stop.

Usage::

    python examples/tf_seed.py [--dir checkpoints] [--steps 50] [--save-every 10]

Run it twice: the second run continues from the latest checkpoint of the first.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import tensorflow as tf

import statevault as sv


class Net(keras.Model):  # type: ignore[misc]
    """A simple linear model (the one of TensorFlow's checkpoint guide)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = keras.layers.Dense(5)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self.l1(x)


def toy_dataset() -> tf.data.Dataset:
    inputs = tf.range(10.0)[:, None]
    labels = inputs * 5.0 + tf.range(5.0)[None, :]
    return tf.data.Dataset.from_tensor_slices({"x": inputs, "y": labels}).repeat().batch(2)


def train_step(model: Net, example: dict[str, tf.Tensor], optimizer: keras.Optimizer) -> float:
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.abs(model(example["x"]) - example["y"]))
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    return float(loss)


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="checkpoints")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    model, optimizer = Net(), keras.optimizers.Adam(0.1)
    model(tf.zeros((1, 1)))  # build the model: its variables must exist to be restored
    state = {"model": model, "optimizer": optimizer}

    with sv.CheckpointManager(args.dir, max_to_keep=3, save_interval_steps=args.save_every) as mgr:
        restored = mgr.restore(into=state)  # the latest valid checkpoint, or None
        start = restored.step + 1 if restored else 1
        print(f"restored from step {restored.step}" if restored else "initializing from scratch")
        iterator = iter(toy_dataset().skip(start - 1))  # the data position: batches consumed
        for step in range(start, args.steps + 1):
            loss = train_step(model, next(iterator), optimizer)
            if mgr.should_save(step):
                mgr.save(step, state, metrics={"loss": loss})
                print(f"saved step {step}: loss {loss:.2f}")
            if mgr.preempted:
                break
        return mgr.all_steps()


if __name__ == "__main__":
    kept = main(sys.argv[1:])
    print("checkpoints kept:", kept)
