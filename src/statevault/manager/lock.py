"""One writer per run: an OS lock where the filesystem has one, a heartbeat lease everywhere.

Rule (documented in the README):

1. The writer holds ``flock(LOCK_EX)`` on ``<run>/.statevault.lock``. The kernel releases it the
   moment the process dies (SIGKILL, OOM), so on a local disk a restarted job never waits.
2. The file also records the holder (host, pid, start) and a heartbeat the holder rewrites every
   ``lease_seconds / 4``. A filesystem whose flock is not shared between nodes (some NFS, CIFS
   and Lustre mounts) cannot see another node's lock; there the record decides, by the one rule
   of holder.py (which the lease and the command line apply too): a record from another host
   whose heartbeat is younger than its ``lease_seconds`` means the run is taken; a record whose
   heartbeat is older, or from this host whose pid is no longer alive, is stale and is taken
   over.
3. The lock dies with its holder, not with its holder's children. The descriptor is opened
   ``O_CLOEXEC`` (a program started with exec never inherits it), and a fork hook closes the
   child's copy of it (a ``multiprocessing`` fork or a DataLoader worker would otherwise keep
   the flock alive after its parent is killed, and the restarted job would be refused). The
   child closes its copy only: it never unlocks or rewrites the file, which stay its parent's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import weakref

from statevault.errors import RunLockedError
from statevault.manager.holder import (
    DEFAULT_LEASE_SECONDS,
    RECORD_LIMIT,
    Holder,
    parse_record,
    pid_alive,
)

__all__ = ["DEFAULT_LEASE_SECONDS", "RunLock", "pid_alive"]

# Lock files held by this process: without flock, a record naming our own pid is ours only if
# we still hold it, and a second manager of this process must be refused like any other.
_HELD_HERE: set[str] = set()
# Locks this process holds, for the fork hook (rule 3).
_HOLDERS: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """The writer lock of one run directory. ``acquire`` raises RunLockedError when taken."""

    def __init__(self, path: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.path = path
        self.lease_seconds = lease_seconds
        self.host = socket.gethostname()
        self.fd: int | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _HELD_HERE:
            here = Holder(self.host, os.getpid(), time.time(), self.lease_seconds)
            raise RunLockedError(_describe(self.path, here))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            flocked = self._flock(fd)
            holder = _read_holder(fd, self.lease_seconds)
            if holder is not None and holder.live(flocked=flocked, acquiring=True):
                raise RunLockedError(_describe(self.path, holder))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD_HERE.add(key)
        _HOLDERS.add(self)
        self._write_holder()
        self._heartbeat = threading.Thread(
            target=self._beat, name="statevault-lock-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        _HOLDERS.discard(self)
        _HELD_HERE.discard(os.path.realpath(self.path))
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def _flock(self, fd: int) -> bool:
        """Take the OS lock; False where the filesystem has none."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                _describe(self.path, _read_holder(fd, self.lease_seconds))
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return False  # no flock here: the heartbeat lease alone protects the run
        return True

    def _write_holder(self) -> None:
        if self.fd is None:
            return
        record = {
            "host": self.host,
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "lease_seconds": self.lease_seconds,
        }
        data = json.dumps(record).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            with contextlib.suppress(OSError):
                self._write_holder()

    def forget_in_child(self) -> None:
        """In a forked child: drop the inherited descriptor without touching the lock."""
        self._stop.set()  # the heartbeat thread was not forked; nothing may start it again
        self._heartbeat = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)  # the last close in the parent (or its death) drops the flock


def _forget_locks_in_child() -> None:
    for lock in list(_HOLDERS):
        lock.forget_in_child()
    _HOLDERS.clear()
    _HELD_HERE.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _read_holder(fd: int, default_lease_seconds: float) -> Holder | None:
    try:
        return parse_record(os.pread(fd, RECORD_LIMIT, 0), default_lease_seconds)
    except OSError:
        return None


def _describe(path: str, holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "another process"
    return (
        f"the run at {os.path.dirname(path)} is being written by {who} "
        f"(lock {path}); only one CheckpointManager may write a run at a time"
    )
