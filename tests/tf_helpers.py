"""Deterministic TensorFlow / Keras training runs for the resume tests, run as subprocesses.

    python tests/tf_helpers.py loop-full OUT.npz
    python tests/tf_helpers.py loop-part1 CKPT            # 7 steps, then sv.save
    python tests/tf_helpers.py loop-part2 CKPT OUT.npz    # fresh objects, sv.load, finish
    python tests/tf_helpers.py fit-full OUT.npz
    python tests/tf_helpers.py fit-preempt RUN            # SIGTERM to itself mid-epoch
    python tests/tf_helpers.py fit-resume RUN OUT.npz     # a new process resumes and finishes

Every run prints one JSON line on stdout; OUT.npz holds every model and optimizer variable.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import statevault as sv

LOOP_STEPS, LOOP_SPLIT = 12, 7
EPOCHS, BATCH = 3, 8  # 48 samples: 6 batches per epoch
KILL_AT = 10  # the preempted fit gets SIGTERM after this global batch (epoch 1, batch 4)


def deterministic() -> None:
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )


def dump(path: str, model: keras.Model, optimizer: Any) -> None:
    arrays = {f"m{i}": v.numpy() for i, v in enumerate(model.variables)}
    arrays |= {f"o{i}": v.numpy() for i, v in enumerate(optimizer.variables)}
    np.savez(path, **arrays)


# ---- a custom training loop: sv.save / sv.load -----------------------------------------------


def loop_objects() -> tuple[keras.Model, Any, tf.random.Generator]:
    deterministic()
    return mlp(), keras.optimizers.Adam(1e-2), tf.random.Generator.from_seed(7)


def loop_train(model: keras.Model, optimizer: Any, gen: tf.random.Generator, steps: range) -> None:
    x, y = data()
    for step in steps:
        xb, yb = x[(step % 6) * 8 : (step % 6 + 1) * 8], y[(step % 6) * 8 : (step % 6 + 1) * 8]
        noise = gen.normal(xb.shape) * 0.01
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb + noise, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def loop(mode: str, args: list[str]) -> dict[str, Any]:
    model, optimizer, gen = loop_objects()
    if mode == "loop-full":
        loop_train(model, optimizer, gen, range(LOOP_STEPS))
        dump(args[0], model, optimizer)
        return {}
    if mode == "loop-part1":
        loop_train(model, optimizer, gen, range(LOOP_SPLIT))
        state = {"model": model, "optimizer": optimizer, "gen": gen, "step": LOOP_SPLIT}
        sv.save(state, args[0])
        return {}
    assert not optimizer.built  # a fresh optimizer: the restore must build it
    into = {"model": model, "optimizer": optimizer, "gen": gen}
    restored = sv.load(args[0], into=into)
    loop_train(model, optimizer, gen, range(restored["step"], LOOP_STEPS))
    dump(args[1], model, optimizer)
    return {"iterations": int(optimizer.iterations)}


# ---- model.fit with the callback, mixed precision --------------------------------------------


class SigtermAt(keras.callbacks.Callback):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(mode: str, args: list[str]) -> dict[str, Any]:
    import statevault.keras as svk

    deterministic()
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    if mode == "fit-full":
        model.fit(dataset, epochs=EPOCHS, verbose=0, shuffle=False)
        dump(args[0], model, model.optimizer)
        return {}
    ckpt = svk.CheckpointCallback(args[0], save_freq=4, monitor="loss", max_to_keep=3)
    extra = [SigtermAt(KILL_AT)] if mode == "fit-preempt" else []
    resume = ckpt.restore(model)
    restored_best = ckpt.best
    ckpt.fit(model, dataset, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=extra)
    if mode == "fit-resume":
        dump(args[1], model, model.optimizer)
    return {
        "resumed_at": None if resume is None else [resume.epoch, resume.batch, resume.step],
        "restored_best": restored_best,
        "preempted": ckpt.preempted,
        "epoch": ckpt.epoch,
        "batch": ckpt.batch,
        "step": ckpt.step,
        "best": ckpt.best,
        "optimizer": type(model.optimizer).__name__,
    }


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    result = loop(mode, args) if mode.startswith("loop") else fit(mode, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
