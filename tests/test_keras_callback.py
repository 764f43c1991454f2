"""statevault.keras.CheckpointCallback in one process: epoch saves, monitor / mode /
save_best_only, the best value restored, resuming a plain model.fit at an epoch boundary, and
the refusal to re-train a partly trained epoch. (The kill-and-resume test in a new process is
in test_tf_resume.py.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (CI installs it)")
keras = pytest.importorskip("keras")

import statevault as sv  # noqa: E402
import statevault.keras as svk  # noqa: E402


def build() -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def data() -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x @ np.ones((4, 1))).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 4 batches per epoch


def steps(run: Path) -> list[int]:
    return sorted(int(name[5:]) for name in os.listdir(run) if name.startswith("step_"))


def test_epoch_saves_track_the_best_and_resume_a_plain_fit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = build()
    ckpt = svk.CheckpointCallback(run, monitor="val_loss", mode="min", max_to_keep=2)
    history = model.fit(
        data(), validation_data=data(), epochs=3, callbacks=[ckpt], verbose=0, shuffle=False
    )
    ckpt.close()
    assert steps(run) == [8, 12]  # one save per epoch (4 batches each), the newest two kept
    assert ckpt.best == min(history.history["val_loss"])
    with sv.CheckpointManager(run) as manager:
        metrics = manager.checkpoints()[-1].metrics
    assert metrics["val_loss"] == pytest.approx(history.history["val_loss"][-1])

    again = build()
    resumed = svk.CheckpointCallback(run, monitor="val_loss", mode="min", max_to_keep=2)
    more = again.fit(
        data(), validation_data=data(), epochs=4, callbacks=[resumed], verbose=0, shuffle=False
    )
    resumed.close()
    assert more.epoch == [3]  # epochs 0-2 were restored, not trained again
    assert resumed.best is not None and resumed.best <= ckpt.best  # "best so far" came back
    assert (resumed.epoch, resumed.batch, resumed.step) == (4, 0, 16)
    assert int(again.optimizer.iterations) == 16


def test_save_best_only_skips_epochs_that_do_not_improve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = svk.CheckpointCallback(run, monitor="loss", mode="max", save_best_only=True)
    build().fit(
        data(), epochs=3, callbacks=[ckpt], verbose=0, shuffle=False
    )  # the loss only goes down
    ckpt.close()
    assert steps(run) == [4]


def test_plain_fit_refuses_to_retrain_a_partial_epoch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = build()
    ckpt = svk.CheckpointCallback(run, save_freq=3)
    model.fit(data(), epochs=1, callbacks=[ckpt], verbose=0, shuffle=False)
    ckpt.close()
    assert steps(run) == [3]  # after batch 3 of the 4 of epoch 0

    again = svk.CheckpointCallback(run, save_freq=3)
    with pytest.raises(RuntimeError, match=r"callback\.fit"):
        build().fit(data(), epochs=2, callbacks=[again], verbose=0, shuffle=False)
    again.close()

    resumed = svk.CheckpointCallback(run, save_freq=3)
    model = build()
    resumed.fit(model, data(), epochs=2, verbose=0, shuffle=False)
    resumed.close()
    assert (resumed.epoch, resumed.step) == (2, 8)  # 1 batch left of epoch 0, then epoch 1
    assert int(model.optimizer.iterations) == 8


def test_a_callers_manager_and_extra_state(tmp_path: Path) -> None:
    generator = tf.random.Generator.from_seed(3)
    with sv.CheckpointManager(tmp_path / "run", max_to_keep=1) as manager:
        ckpt = svk.CheckpointCallback(manager, state={"gen": generator})
        build().fit(data(), epochs=2, callbacks=[ckpt], verbose=0, shuffle=False)
        ckpt.close()  # the manager is the caller's: still open
        assert manager.all_steps() == [8]
        saved = generator.normal((3,)).numpy()
    other = tf.random.Generator.from_seed(9)
    restored = svk.CheckpointCallback(tmp_path / "run", state={"gen": other})
    assert restored.restore(build()) == svk.Resume(epoch=2, batch=0, step=8)
    restored.close()
    assert np.array_equal(other.normal((3,)).numpy(), saved)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="save_freq"):
        svk.CheckpointCallback("unused", save_freq=0)
    with pytest.raises(ValueError, match="mode"):
        svk.CheckpointCallback("unused", mode="best")  # type: ignore[arg-type]
