"""Abandoning a save or a copy in flight, cleanly.

The writer checks a :class:`Cancel` before each chunk it writes; once it is set, the next check
raises :class:`SaveAbandoned`, the file being written is aborted, and the save's own cleanup
(the temporary directory, or the objects tagged with the save) runs as for any failed save. The
previous checkpoint stays the latest. Used when the user presses Ctrl-C while statevault waits
for a save at exit (manager/closing.py), and when a synchronous save is interrupted. Example::

    cancel = Cancel()
    write_files(storage, directory, files, metadata, cancel)  # in a thread
    cancel.set("Ctrl-C at exit")                               # from another
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from statevault.errors import CheckpointError


class SaveAbandoned(CheckpointError):
    """A save (or a copy to the replica) was abandoned before its commit; nothing of it stays."""


class Cancel:
    """A flag set from any thread, checked by the writer between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise SaveAbandoned once the flag is set."""
        if self._event.is_set():
            raise SaveAbandoned(f"abandoned: {self.reason}")


def shielded(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` to its end even if Ctrl-C is pressed meanwhile: an interrupt restarts it
    (cleanups are idempotent) and is raised once it is done, so that an impatient second Ctrl-C
    never leaves a half-removed temporary behind."""
    interrupt: KeyboardInterrupt | None = None
    while True:
        try:
            cleanup()
            break
        except KeyboardInterrupt as exc:
            interrupt = exc
    if interrupt is not None:
        raise interrupt
