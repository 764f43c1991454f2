"""One worker of a two-worker MultiWorkerMirroredStrategy training loop, for
tests/test_tf_multiworker.py (Keras 3's ``fit`` fails under this strategy upstream,
keras-team/keras#20585, so the workers run a custom loop with ``WorkerCheckpoints``).

    TF_CONFIG=... python tests/tf_worker.py RUN_DIR OUT_JSON [SIGTERM_AT_STEP]

Trains a small model for 12 steps, saving every 4 through ``WorkerCheckpoints(RUN_DIR)`` and
resuming from RUN_DIR's newest checkpoint; with SIGTERM_AT_STEP it sends itself SIGTERM after
that step. Writes what it did (role, restored step, last step, a digest of every model and
optimizer variable) to OUT_JSON.
"""

from __future__ import annotations

import hashlib
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
from statevault.keras import WorkerCheckpoints

STEPS, SAVE_EVERY, BATCH = 12, 4, 8


def digest(variables: list[Any]) -> str:
    hasher = hashlib.sha256()
    for variable in variables:
        hasher.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return hasher.hexdigest()


def main(run_dir: str, out: str, sigterm_at: int | None) -> None:
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
        )
        optimizer = keras.optimizers.Adam(1e-2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")

    @tf.function
    def train_step(xb: tf.Tensor, yb: tf.Tensor) -> None:
        def replica_step(xb: tf.Tensor, yb: tf.Tensor) -> None:
            with tf.GradientTape() as tape:
                per_example = tf.square(model(xb, training=True) - yb)
                loss = tf.reduce_sum(per_example) / (BATCH * strategy.num_replicas_in_sync)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

        strategy.run(replica_step, args=(xb, yb))

    state = {"model": model, "optimizer": optimizer}
    ckpt = WorkerCheckpoints(run_dir, strategy, max_to_keep=3)
    restored = ckpt.restore(into=state)
    start = restored + 1 if restored is not None else 1
    preempted, step = False, start - 1
    for step in range(start, STEPS + 1):
        batch = slice((step - 1) * BATCH, step * BATCH)
        train_step(tf.constant(x[batch]), tf.constant(y[batch]))
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if ckpt.preemption_agreed():
            ckpt.save(step, state, force=True)
            preempted = True
            break
        if step % SAVE_EVERY == 0:
            ckpt.save(step, state)
    ckpt.close()
    result = {
        "chief": ckpt.is_chief,
        "restored": restored,
        "preempted": preempted,
        "step": step,
        "iterations": int(optimizer.iterations.numpy()),
        "digest": digest([*model.variables, *optimizer.variables]),
        "sv": sv.__version__,
    }
    with open(out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
