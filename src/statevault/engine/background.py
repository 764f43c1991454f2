"""One daemon thread that runs submitted calls in order: where a save's (or a replication's)
background phase runs.

A daemon thread, not a ``ThreadPoolExecutor``: CPython joins an executor's threads at exit
*before* the atexit hooks run, silently and beyond the reach of a second Ctrl-C, which then
leaves the save half-written. statevault's own exit hook (manager/closing.py) waits for this
work instead: it says so on stderr when the wait is long, and a Ctrl-C abandons the save
cleanly. Daemon threads keep running while atexit hooks run; they stop only after. Example::

    worker = BackgroundWorker("statevault-persist")
    future = worker.submit(write_everything, job)
    future.result()
    worker.shutdown()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_STOP = None


class BackgroundWorker:
    """Runs calls one after the other on a daemon thread started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, call: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, lambda: call(*args)))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        return future

    def shutdown(self) -> None:
        """Let the thread end once the calls submitted so far have run (it is not joined: a
        caller that needs their results waits on their futures)."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # raised where the future is waited for
                future.set_exception(exc)
