"""The end of a manager's life: waiting for what is in flight, closing, and closing at exit
(manager/closing.py says how a run ends). Mixed into
:class:`statevault.manager.manager.CheckpointManager`; the attributes are the manager's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from statevault.checkpoint.save import SaveFuture, Saver
from statevault.manager import closing
from statevault.manager.preemption import PreemptionWatcher
from statevault.manager.replication import Replicator
from statevault.manager.role import Role


class RunLifecycle:
    """wait, prepare, close, and the close at interpreter exit (closing.py)."""

    directory: str
    _closed: bool
    _pending: tuple[int, SaveFuture] | None
    _replicator: Replicator | None
    _role: Role
    _saver: Saver
    _preemption: PreemptionWatcher

    def path(self, step: int) -> str:
        raise NotImplementedError

    def _collect(self, block: bool) -> None:
        raise NotImplementedError

    def _apply_retention(self) -> None:
        raise NotImplementedError

    def _release_locks(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def wait(self) -> None:
        """Block until the save in flight is durable and every replication it started is
        committed; raises a background failure."""
        self._check_open()
        self._settle_in_flight()

    def _settle_in_flight(self) -> None:
        """The save in flight collected, then the copies to the replica waited for (even when
        the save failed), then retention of what was kept only while it was being copied."""
        try:
            self._collect(block=True)
        finally:
            if self._replicator is not None:
                self._replicator.wait()
                self._apply_retention()

    def prepare(self, state: Mapping[str, Any]) -> None:
        """Make async staging memory ready for ``state`` in the background (restore does it)."""
        self._saver.prepare(state)

    def close(self) -> None:
        """Wait for the save in flight and for replication, then release the run. Raises a
        background failure. Interrupted by Ctrl-C, the manager stays open: the exit hook then
        finishes or abandons what is in flight (closing.py)."""
        if getattr(self, "_closed", True):
            return
        try:
            self._settle_in_flight()
        except KeyboardInterrupt:
            raise
        except BaseException:
            self._release()
            raise
        self._release()

    def _close_at_exit(self) -> None:
        """Close at interpreter exit, or when a ``with`` block is left by Ctrl-C: say so when
        the save in flight takes a while, give the copies to the replica at most the exit
        grace, and abandon what is in flight on (another) Ctrl-C (closing.py)."""
        if self._closed:
            return
        if not self._saver.idle():
            where = self.path(self._pending[0]) if self._pending else self.directory
            closing.wait_announced(
                self._saver.idle, f"the save to {where}", lambda: self._saver.abandon("Ctrl-C")
            )
        try:
            if self._role.distributed:
                # No collective at exit: the ranks may be out of step (one raised, one was
                # interrupted elsewhere). Rank 0 commits on its own once every share is written.
                self._pending = None
                self._saver.settle_alone()
            else:
                self._collect(block=True)
        finally:
            replicator = self._replicator
            if replicator is not None:
                closing.wait_announced(
                    replicator.idle,
                    f"the copy to {replicator.replica.url}",
                    lambda: replicator.abandon("exit"),
                    closing.exit_grace_s(),
                )
            self.close()

    def _release(self) -> None:
        self._closed = True
        closing.untrack(self)
        try:
            if self._replicator is not None:
                self._replicator.close()
        finally:
            self._saver.close()
            self._preemption.uninstall()
            if self._role.leader:
                self._release_locks()
