"""How a run ends: managers left open are closed by an exit hook, never by ``__del__``.

What CPython does when a program ends (normally, by an uncaught exception or ``sys.exit``):

1. the main thread stops; non-daemon threads are joined (statevault runs none: its background
   saves and copies run on daemon threads, engine/background.py);
2. the atexit hooks run, the last registered first. statevault's hook is registered when the
   first manager opens, so it runs before the hooks registered earlier (``logging``'s among
   them) and while the storage clients still work (fsspec's event loop is a daemon thread that
   runs until step 3). It closes every manager still open: it waits for the save in flight,
   then for the copies to the replica (at most the grace), then releases the run;
3. the runtime is torn down; daemon threads stop wherever they are.

While the hook waits it says so on stderr once the wait passes a second. Ctrl-C meanwhile
abandons what is in flight: the writers stop at their next chunk and remove what they wrote,
the previous checkpoint stays the latest, and the process ends. Copies to the replica that are
still running after ``STATEVAULT_EXIT_GRACE_S`` seconds (default 30) are abandoned the same way.
``__del__`` of a manager never does I/O: a manager its program let go of without closing it is
kept until the exit hook closes it, or until a new manager of the same run (in this process)
closes it first. A forked child inherits no manager: it neither waits for nor closes them.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("statevault")

_GRACE_ENV = "STATEVAULT_EXIT_GRACE_S"
DEFAULT_GRACE_S = 30.0
ANNOUNCE_AFTER_S = 1.0
_POLL_S = 0.05


class Closable(Protocol):
    def _close_at_exit(self) -> None: ...

    def close(self) -> None: ...


_open: weakref.WeakSet[Closable] = weakref.WeakSet()
_dropped: list[Closable] = []  # open managers their program let go of: closed at exit
_registered = False
_lock = threading.Lock()


def exit_grace_s() -> float:
    """How long exit waits for copies to the replica: ``$STATEVAULT_EXIT_GRACE_S`` or 30 s."""
    try:
        return max(0.0, float(os.environ.get(_GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def track(manager: Closable) -> None:
    """An open manager, closed by the exit hook unless it is closed before."""
    global _registered
    with _lock:
        _open.add(manager)
        if not _registered:
            atexit.register(_close_all_at_exit)
            _registered = True


def untrack(manager: Closable) -> None:
    with _lock:
        _open.discard(manager)
        if manager in _dropped:
            _dropped.remove(manager)


def adopt(manager: Closable) -> None:
    """From ``__del__``: keep a manager its program let go of until it is closed (at exit, or
    by the next manager of its run); a finalizer must neither wait for a save nor do I/O."""
    with _lock:
        _dropped.append(manager)


def close_dropped(directory: str) -> None:
    """Close the let-go managers of the run at ``directory`` (a new manager of this process
    opens it: the old one's lock must not refuse it)."""
    with _lock:
        mine = [m for m in _dropped if getattr(m, "directory", None) == directory]
    for manager in mine:
        _close_quietly(manager)


def wait_announced(
    done: Callable[[], bool],
    what: str,
    on_interrupt: Callable[[], None],
    limit_s: float | None = None,
) -> bool:
    """Wait until ``done()``; say so on stderr once the wait passes a second. Ctrl-C calls
    ``on_interrupt`` (which abandons the work) and ends the wait; so does ``limit_s``. True when
    the work ended by itself."""
    started = time.monotonic()
    announced = False
    while not done():
        elapsed = time.monotonic() - started
        if limit_s is not None and elapsed >= limit_s:
            say(f"statevault: abandoning {what}: still running after {limit_s:g} s ({_GRACE_ENV})")
            on_interrupt()
            return False
        if not announced and elapsed >= ANNOUNCE_AFTER_S:
            say(f"statevault: waiting for {what} to finish before exiting (Ctrl-C abandons it)")
            announced = True
        try:
            time.sleep(_POLL_S)
        except KeyboardInterrupt:
            say(f"statevault: Ctrl-C: abandoning {what}")
            on_interrupt()
            return False
    return True


def say(line: str) -> None:
    """One line on stderr, flushed (the process may be about to end)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or gone: nothing more to do
        return


def _close_quietly(manager: Closable) -> None:
    try:
        manager.close()
    except Exception as exc:  # nobody is left to raise it to
        logger.error("statevault: closing a dropped CheckpointManager failed: %r", exc)


def _close_all_at_exit() -> None:
    with _lock:
        managers = list(dict.fromkeys([*_open, *_dropped]))
    for manager in reversed(managers):
        try:
            manager._close_at_exit()
        except KeyboardInterrupt:
            say("statevault: Ctrl-C: the run is left as it is (no checkpoint is torn)")
        except Exception as exc:  # no caller is left to raise it to: say it
            say(f"statevault: {type(exc).__name__}: {exc}")


def _forget_in_child() -> None:
    """A forked child owns none of its parent's managers: it must not wait for or close them
    (and a lock another thread held at the fork would never be released in the child)."""
    global _lock
    _lock = threading.Lock()
    _open.clear()
    _dropped.clear()


os.register_at_fork(after_in_child=_forget_in_child)
