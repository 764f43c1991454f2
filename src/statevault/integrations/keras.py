"""A Keras callback that checkpoints ``fit`` through a CheckpointManager and resumes it at the
exact epoch and batch (see docs/tensorflow.md). Imported as ``statevault.keras``. Example::

    import statevault as sv
    import statevault.keras as svk

    ckpt = svk.CheckpointCallback("runs/exp1", save_freq=100, max_to_keep=3)
    ckpt.fit(model, train_ds, epochs=10)  # model.fit(..., callbacks=[ckpt]), resumed

What a checkpoint holds: the model, its optimizer (``model.optimizer``), the callback's own
state (epoch, batch within the epoch, global step, best monitored value) and whatever ``state=``
adds (``{"rng": sv.RNGState()}``). Its step is the number of batches trained so far.

Multi-worker (``tf.distribute.MultiWorkerMirroredStrategy``): every worker runs the callback;
only the chief (``strategy.extended.should_checkpoint``) opens the manager (its lock) and writes;
the others take part in reading the state (a sync-on-read variable is all-reduced when read)
and restore from the same directory read-only. A preemption signal (SIGTERM / SIGUSR1) on any
worker is agreed on at the next batch end by an all-reduce of a flag, so that every worker
stops after the same batch and the chief saves that step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import keras
import tensorflow as tf

from statevault.integrations.tf_workers import WorkerCheckpoints
from statevault.manager import CheckpointManager

__all__ = ["CheckpointCallback", "Resume"]


@dataclass(frozen=True)
class Resume:
    """Where a restored ``fit`` continues: ``epoch``, after ``batch`` batches of it."""

    epoch: int
    batch: int
    step: int


class CheckpointCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Checkpoint ``fit`` every epoch or every ``save_freq`` batches, and resume it exactly.

    ``manager``: a CheckpointManager, or a run directory (then only the chief worker opens a
    manager on it, with ``manager_options`` such as ``max_to_keep=3``: the form to use under
    MultiWorkerMirroredStrategy). ``monitor``: a logged metric (``"val_loss"``) recorded with
    each save (pass ``best_metric=monitor`` to the manager to keep the best); the best value so
    far is part of the callback's state; ``save_best_only`` then skips epoch saves that do not
    improve on it. ``state``: more Stateful objects to save and restore (``{"rng":
    sv.RNGState()}``).
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        *,
        save_freq: Literal["epoch"] | int = "epoch",
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_best_only: bool = False,
        state: Mapping[str, Any] | None = None,
        **manager_options: Any,
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise ValueError(f"save_freq must be 'epoch' or a positive int, not {save_freq!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self._manager_arg = manager
        self._manager_options = manager_options
        self._workers: WorkerCheckpoints | None = None
        self.save_freq = save_freq
        self.monitor = monitor
        self.mode = mode
        self.save_best_only = save_best_only
        self.extra_state = dict(state or {})
        self.epoch = 0  # the epoch in progress
        self.batch = 0  # batches of it already trained
        self.step = 0  # batches trained in all
        self.best: float | None = None
        self.preempted = False  # the last fit stopped for a preemption (after saving)
        self._restored = False

    # ---- the callback's own state (saved as a Stateful) ---------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        best = state.get("best")
        self.best = float(best) if best is not None else None

    # ---- resume ------------------------------------------------------------------------------

    def restore(self, model: keras.Model) -> Resume | None:
        """Restore the newest valid checkpoint into ``model``, its optimizer and this callback
        (once per callback); None when the run has none. Every worker calls it."""
        self.set_model(model)
        if self._restored:
            return self._resume()
        self._restored = True
        found = self._roles().restore(into=self._state()) is not None
        return self._resume() if found else None

    def fit(self, model: keras.Model, x: Any = None, **kwargs: Any) -> Any:
        """``model.fit(x, callbacks=[self, ...], **kwargs)`` resumed from the newest checkpoint:
        a partly trained epoch first runs the batches it has left (``x.skip(batch)``: ``x``
        must be a finite tf.data.Dataset, the same order as before), then the later epochs.
        Returns the History of the last ``fit`` call."""
        callbacks = [self, *[c for c in kwargs.pop("callbacks", []) if c is not self]]
        epochs = int(kwargs.pop("epochs", 1))
        resume = self.restore(model)
        start = resume.epoch if resume is not None else int(kwargs.pop("initial_epoch", 0))
        kwargs.pop("initial_epoch", None)
        history = None
        if resume is not None and resume.batch > 0 and start < epochs:
            if not isinstance(x, tf.data.Dataset):
                raise TypeError(
                    "resuming in the middle of an epoch needs x to be a tf.data.Dataset (its "
                    "consumed batches are skipped); save with save_freq='epoch' otherwise"
                )
            if 0 <= int(x.cardinality()) <= resume.batch:  # saved after its last batch
                self.epoch, self.batch = start + 1, 0
                return self.fit(model, x, epochs=epochs, callbacks=callbacks, **kwargs)
            remaining = x.skip(resume.batch)
            history = model.fit(
                remaining, epochs=start + 1, initial_epoch=start, callbacks=callbacks, **kwargs
            )
            start += 1
            if self.preempted:
                return history
        if start < epochs or history is None:
            history = model.fit(
                x, epochs=epochs, initial_epoch=start, callbacks=callbacks, **kwargs
            )
        return history

    def close(self) -> None:
        """Close the manager this callback opened from a directory (waits for a save in
        flight); a manager passed in is the caller's to close."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _resume(self) -> Resume:
        return Resume(self.epoch, self.batch, self.step)

    # ---- Keras hooks -------------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self.preempted = False
        if not self._restored:
            resume = self.restore(self.model)
            if resume is not None and resume.batch > 0:
                raise RuntimeError(
                    f"the newest checkpoint of {self._roles().directory} was taken in the "
                    f"middle of epoch {resume.epoch} (after batch {resume.batch}): resume with "
                    "callback.fit(model, dataset, ...), which skips the consumed batches"
                )
            if resume is not None:
                self.model._initial_epoch = resume.epoch  # read by fit after on_train_begin

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self.model._initial_epoch = None
        self._roles().wait()

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.batch += 1
        self.step += 1
        if self._roles().preemption_agreed():
            self._save(logs, force=True)
            self.preempted = True
            self.model.stop_training = True
        elif isinstance(self.save_freq, int) and self.step % self.save_freq == 0:
            self._save(logs)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self.preempted:
            return  # stopped mid-epoch: the preemption checkpoint is the resume point
        steps = (self.params or {}).get("steps")
        if self.model.stop_training and isinstance(steps, int) and self.batch < steps:
            return  # another callback stopped fit mid-epoch: this epoch is not complete
        self.epoch, self.batch = epoch + 1, 0
        improved = self._track_best(logs)
        if self.save_freq == "epoch" and (improved or not self.save_best_only):
            self._save(logs, force=True)

    # ---- saving ------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model, "callback": self}
        if self.model.optimizer is not None:
            state["optimizer"] = self.model.optimizer
        state.update(self.extra_state)
        return state

    def _save(self, logs: Mapping[str, Any] | None, force: bool = False) -> None:
        self._roles().save(self.step, self._state(), metrics=_finite_metrics(logs), force=force)

    def _track_best(self, logs: Mapping[str, Any] | None) -> bool:
        if self.monitor is None or logs is None or self.monitor not in logs:
            return self.monitor is None
        value = float(logs[self.monitor])
        better = self.best is None or (
            value < self.best if self.mode == "min" else value > self.best
        )
        if better:
            self.best = value
        return better

    # ---- roles ----------------------------------------------------------------------------

    def _roles(self) -> WorkerCheckpoints:
        """Who writes (the chief) and who only reads, decided once the model's strategy is
        known (see :mod:`statevault.integrations.tf_workers`)."""
        if self._workers is None:
            strategy = getattr(getattr(self, "_model", None), "distribute_strategy", None)
            self._workers = WorkerCheckpoints(self._manager_arg, strategy, **self._manager_options)
        return self._workers


def _finite_metrics(logs: Mapping[str, Any] | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            metrics[key] = number
    return metrics
