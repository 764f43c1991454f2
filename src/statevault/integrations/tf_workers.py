"""Checkpoint roles of the workers of a ``tf.distribute`` strategy (MultiWorkerMirroredStrategy).

Every worker creates the same ``WorkerCheckpoints(directory, strategy)`` and makes the same
calls in the same order; the roles are decided here:

- the chief (``strategy.extended.should_checkpoint``) opens the run's ``CheckpointManager`` (it
  alone holds the run lock) and writes; the other workers never write and never take the lock;
- ``save`` on a non-chief worker reads the state as the chief does (reading a sync-on-read
  variable is a collective every worker must join) and writes nothing, so nothing of it can be
  left behind;
- ``restore`` on the chief goes through its manager, on the others read-only through the same
  choice (the newest checkpoint that verifies, a damaged one skipped);
- ``preemption_agreed()`` is a tiny all-reduce of each worker's "a preemption signal arrived"
  flag (SIGTERM / SIGUSR1, watched on every worker): called by every worker after every step, it
  is True on all of them at the same step as soon as any one was signalled; they then save that
  step together and stop. Example (a custom training loop)::

      ckpt = WorkerCheckpoints("runs/exp1", strategy, max_to_keep=3)
      restored = ckpt.restore(into=state)                     # every worker
      for step in range(restored + 1 if restored is not None else 0, total):
          strategy.run(train_step, ...)
          if ckpt.preemption_agreed():
              ckpt.save(step, state, force=True)               # one coordinated save
              break
          if step % 100 == 0:
              ckpt.save(step, state)
      ckpt.close()

With the default (single-process) strategy it is a plain manager: the chief is the process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from statevault.checkpoint.load import load
from statevault.engine.plan import plan_save
from statevault.engine.staging import stage
from statevault.errors import CorruptCheckpointError
from statevault.manager import CheckpointManager
from statevault.manager.index import scan_run
from statevault.manager.preemption import PreemptionWatcher
from statevault.storage.location import resolve


class WorkerCheckpoints:
    """One run's checkpoints seen from one worker of a strategy (see the module docstring).

    ``manager``: a CheckpointManager (single worker only: it already holds the lock) or the run
    directory; ``manager_options`` (``max_to_keep=3``, ...) go to the chief's manager.
    """

    def __init__(
        self,
        manager: CheckpointManager | str | os.PathLike[str],
        strategy: tf.distribute.Strategy | None = None,
        **manager_options: Any,
    ) -> None:
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        if isinstance(manager, CheckpointManager):
            self._manager: CheckpointManager | None = manager
            self.directory = manager.directory
        else:
            self._manager, self.directory = None, os.fspath(manager)
        self._owns_manager = self._manager is None
        self._manager_options = manager_options
        self._watcher: PreemptionWatcher | None = None
        self._agree: Any = None
        if self._manager is not None and self.multi_worker:
            raise ValueError(
                "under a multi-worker strategy pass the run directory, not a CheckpointManager: "
                "only the chief may open a manager (it takes the run's lock)"
            )
        if self.is_chief:
            self.manager  # noqa: B018 -- the chief opens its manager (and its signal watcher)
        else:
            self._watcher = PreemptionWatcher()
            self._watcher.install()

    @property
    def is_chief(self) -> bool:
        return bool(self.strategy.extended.should_checkpoint)

    @property
    def multi_worker(self) -> bool:
        return isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)

    @property
    def manager(self) -> CheckpointManager:
        """The run's manager: the chief's alone (a RuntimeError on any other worker)."""
        if not self.is_chief:
            raise RuntimeError("only the chief worker has a CheckpointManager")
        if self._manager is None:
            self._manager = CheckpointManager(self.directory, **self._manager_options)
        return self._manager

    def restore(self, into: Mapping[str, Any]) -> int | None:
        """Restore the newest valid checkpoint into ``into`` on every worker; its step, or None
        when the run has none."""
        if self.is_chief:
            restored = self.manager.restore(into=into)
            return restored.step if restored is not None else None
        for record in reversed(scan_run(resolve(self.directory)).committed()):
            try:
                load(record.path, into=into)
            except CorruptCheckpointError:
                continue  # the chief's manager skips it the same way
            return record.step
        return None

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``step`` (every worker calls it): the chief writes, the others only read."""
        if self.is_chief:
            return self.manager.save(step, state, metrics=metrics, force=force)
        stage(plan_save(state))
        return False

    def preemption_requested(self) -> bool:
        """Whether a preemption signal reached *this* worker."""
        if self._watcher is not None and self._watcher.requested:
            return True
        return self._manager is not None and self._manager.preemption_requested

    def preemption_agreed(self) -> bool:
        """Whether a preemption signal reached *any* worker: an all-reduce of one flag, so every
        worker must call it at the same point (after every step)."""
        local = self.preemption_requested()
        if not self.multi_worker:
            return local
        if self._agree is None:
            self._agree = _agreement(self.strategy)
        return bool(self._agree(tf.constant(1.0 if local else 0.0)).numpy() > 0)

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait()

    def close(self) -> None:
        """Close the manager opened here (waits for a save in flight) and the signal watcher."""
        if self._manager is not None and self._owns_manager:
            self._manager.close()
            self._manager = None
        if self._watcher is not None:
            self._watcher.uninstall()
            self._watcher = None


def _agreement(strategy: tf.distribute.Strategy) -> Any:
    @tf.function  # type: ignore[untyped-decorator]
    def agree(flag: tf.Tensor) -> tf.Tensor:
        per_replica = strategy.run(tf.identity, args=(flag,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return agree
