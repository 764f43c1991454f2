"""Who holds a run: the holder record of its writer lock, and the one rule that says whether it is
live. The lock (lock.py), the lease (lease.py) and the command line (``ls``, ``rm``, ``gc``)
all judge a holder by :meth:`Holder.live`, so that they can never disagree.

The record (``<run>/.statevault.lock``: a file held with flock on a local disk, an object on a
store) is JSON: ``host``, ``pid``, ``heartbeat`` (the holder's clock, rewritten every
``lease_seconds / 4``), ``lease_seconds``, and on a store the lease's ``owner``. The rule:

1. no heartbeat: not live (a released lock leaves the file empty, a released lease is deleted);
2. a record from this host: not live when we hold the host's OS lock (flock is authoritative on
   one host), nor when its pid is dead, nor when it names this very process and the caller is
   acquiring (a previous holder with the same pid: pids are reused, in containers at once);
   otherwise live while its heartbeat is fresh;
3. a record from another host: live while its heartbeat is younger than its ``lease_seconds``.

Example::

    holder = live_holder(resolve("runs/exp1"))
    if holder is not None:
        print("written by", holder.describe())
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from statevault.errors import RunLockedError
from statevault.manager.naming import LOCK_FILE
from statevault.storage.location import Location

DEFAULT_LEASE_SECONDS = 60.0
RECORD_LIMIT = 4096


@dataclass(frozen=True)
class Holder:
    host: str | None
    pid: int | None
    heartbeat: float | None
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    owner: str | None = None  # a lease's random id (object stores)

    @classmethod
    def from_record(
        cls, record: Any, default_lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> Holder | None:
        """The holder a parsed record describes; None for anything but a JSON object. A
        record that does not say its ``lease_seconds`` is judged by ``default_lease_seconds``."""
        if not isinstance(record, dict):
            return None
        lease = _number(record.get("lease_seconds"))
        return cls(
            host=record.get("host") if isinstance(record.get("host"), str) else None,
            pid=record.get("pid") if type(record.get("pid")) is int else None,
            heartbeat=_number(record.get("heartbeat")),
            lease_seconds=lease if lease is not None and lease > 0 else default_lease_seconds,
            owner=record.get("owner") if isinstance(record.get("owner"), str) else None,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    def live(self, *, flocked: bool = False, acquiring: bool = False) -> bool:
        """The rule of the module docstring. ``flocked``: the caller holds this host's OS lock
        of the run; ``acquiring``: the caller is taking the lock (its own pid is then stale)."""
        if self.heartbeat is None:
            return False
        if self.host == socket.gethostname():
            if flocked:
                return False  # on one host the OS lock the caller holds is authoritative
            if self.pid == os.getpid():
                if acquiring:
                    return False  # an earlier process with our pid (one of ours is refused first)
            elif self.pid is not None and not pid_alive(self.pid):
                return False  # a dead process's record: taken over at once
        return self._fresh()

    def _fresh(self) -> bool:
        return self.heartbeat is not None and time.time() - self.heartbeat < self.lease_seconds


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_record(
    data: bytes, default_lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> Holder | None:
    """The holder in a lock file's or lease object's bytes; None when empty or unreadable."""
    try:
        record = json.loads(data.decode()) if data.strip() else None
    except (ValueError, UnicodeDecodeError):
        return None
    return Holder.from_record(record, default_lease_seconds)


def read_holder(run: Location) -> Holder | None:
    """The holder recorded for the run at ``run`` (takes no lock); None when nobody is."""
    lock = run.join(LOCK_FILE)
    try:
        size = run.storage.size(lock.path)
        return parse_record(run.storage.read_bytes(lock.path, 0, min(size, RECORD_LIMIT)))
    except (OSError, EOFError):
        return None


def live_holder(run: Location) -> Holder | None:
    """Who writes the run now, judged from its holder record alone (takes no lock)."""
    holder = read_holder(run)
    return holder if holder is not None and holder.live() else None


def refuse_if_held(run: Location, force: bool) -> None:
    """RunLockedError naming the holder when a live manager writes the run (unless ``force``)."""
    holder = live_holder(run)
    if holder is not None and not force:
        raise _held(run.url, holder)


@contextlib.contextmanager
def maintenance(run: Location, *, force: bool) -> Iterator[None]:
    """Hold a local run's OS lock while the block runs (``statevault rm`` and ``gc`` delete
    meanwhile), so that no manager starts; on an object store (no OS lock), refuse a live
    lease. RunLockedError names the holder; ``force`` skips the check and the lock."""
    path = run.join(LOCK_FILE).path
    if force:
        yield
        return
    if not run.local or not os.path.isfile(path):
        refuse_if_held(run, force)
        yield
        return
    # Read-write, as the manager opens it: NFS emulates flock with POSIX locks, and an
    # exclusive POSIX lock needs a descriptor open for writing. Nothing is written.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        flocked = _try_flock(fd, run)
        holder = read_holder(run)
        if holder is not None and holder.live(flocked=flocked):
            raise _held(run.url, holder)
        yield
    finally:
        os.close(fd)  # drops the lock


def _try_flock(fd: int, run: Location) -> bool:
    """Take the OS lock; False where the filesystem has none; RunLockedError when held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _held(run.url, read_holder(run)) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return False
    return True


def _held(url: str, holder: Holder | None) -> RunLockedError:
    who = holder.describe() if holder is not None else "another process"
    return RunLockedError(
        f"the run at {url} is held by a live CheckpointManager ({who}); stop it first, or "
        "pass --force if you are sure that nothing writes the run"
    )
