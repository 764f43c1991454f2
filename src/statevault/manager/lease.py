"""One writer per run on stores without flock (S3, GCS, memory://...): a lease object.

``<run>/.statevault.lock`` holds a JSON record: ``owner`` (a random id per manager), host, pid,
``heartbeat`` (the holder's wall-clock time) and ``lease_seconds``. What it guarantees:

1. **Acquire.** A record whose heartbeat is younger than its ``lease_seconds`` means the run is
   taken (RunLockedError naming the holder), unless it comes from this host and its pid is dead
   (a crashed process here: taken over at once). With no record, the lease is created with a
   *conditional create* (S3 ``If-None-Match: *``): of two managers starting together exactly
   one wins. Where the store has no conditional create, and when a stale record is taken over,
   the record is written, then read back after ``settle_seconds``: the one whose record is
   there holds the run. That excludes a second writer if each contender's write is visible to
   the others within ``settle_seconds`` (S3, GCS and Azure are read-after-write consistent).
2. **Hold.** The holder rewrites its record every ``lease_seconds / 4``, reading it first: if
   another owner's record is there (this process stalled longer than the lease and was taken
   over), the lease is *lost*, and the next ``save`` raises RunLockedError instead of writing
   (:meth:`LeaseLock.check`). A save already running when the lease is lost is not stopped.
3. **Release.** ``close()`` deletes the record if it is still ours. A holder killed without
   closing leaves its record; another host takes over after ``lease_seconds`` without a
   heartbeat (so a pod restarted on another node right after a crash may be refused for up to
   ``lease_seconds``; retry, or lower it). A forked child forgets the leases of its parent:
   it neither beats nor releases them (the parent's death must free the run, not the child's).

Clocks: staleness compares the holder's heartbeat with the reader's clock, so clocks of the
nodes must agree to well within ``lease_seconds`` (NTP does). It is not a consensus lock: a
process paused longer than the lease (e.g. SIGSTOP) and resumed may write one more checkpoint
before its heartbeat notices; checkpoints are still never torn (each save commits on its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any

from statevault.errors import RunLockedError
from statevault.manager.holder import DEFAULT_LEASE_SECONDS, Holder
from statevault.storage.location import Location

DEFAULT_SETTLE_SECONDS = 0.5
_HELD_HERE: set[str] = set()
_HOLDERS: weakref.WeakSet[LeaseLock] = weakref.WeakSet()


class LeaseLock:
    """The writer lease of one run on an object store (see the module docstring)."""

    def __init__(
        self,
        where: Location,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    ) -> None:
        self.where = where
        self.lease_seconds = lease_seconds
        self.settle_seconds = settle_seconds
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.started = time.time()
        self.lost: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        if self.where.url in _HELD_HERE:
            raise RunLockedError(_describe(self.where, {"pid": os.getpid(), "host": self.host}))
        holder = self._read()
        if holder is not None and self._live(holder):
            raise RunLockedError(_describe(self.where, holder))
        created: bool | None = None
        if holder is None:
            try:
                created = self.where.storage.create_exclusive(self.where.path, self._record())
            except NotImplementedError:
                created = None
            if created is False:
                raise RunLockedError(_describe(self.where, self._read()))
        if created is None:  # no conditional create, or taking over a stale record
            self.where.storage.write_bytes(self.where.path, self._record())
            time.sleep(self.settle_seconds)
        back = self._read()
        if back is None or back.get("owner") != self.owner:
            raise RunLockedError(_describe(self.where, back))
        _HELD_HERE.add(self.where.url)
        _HOLDERS.add(self)
        self._heartbeat = threading.Thread(
            target=self._beat, name="statevault-lease-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def check(self) -> None:
        """Raise RunLockedError if another writer took the run over since we acquired it."""
        if self.lost is not None:
            raise RunLockedError(
                f"lost the lease on {self.where.url} to {_who(self.lost)}: this process "
                f"missed its heartbeats for longer than lease_seconds={self.lease_seconds}; "
                "it must stop writing this run"
            )

    def release(self) -> None:
        self._stop.set()
        _HOLDERS.discard(self)
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            _HELD_HERE.discard(self.where.url)
            with contextlib.suppress(OSError):
                holder = self._read()
                if holder is not None and holder.get("owner") == self.owner:
                    self.where.storage.remove_file(self.where.path)

    def _live(self, record: dict[str, Any]) -> bool:
        """The one rule of holder.py (the lock and the command line apply it too)."""
        holder = Holder.from_record(record, self.lease_seconds)
        return holder is not None and holder.live(acquiring=True)

    def _record(self) -> bytes:
        record = {
            "owner": self.owner,
            "host": self.host,
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "lease_seconds": self.lease_seconds,
        }
        return json.dumps(record).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            size = self.where.storage.size(self.where.path)
            data = self.where.storage.read_bytes(self.where.path, 0, min(size, 4096))
            holder = json.loads(data.decode())
        except FileNotFoundError:
            return None
        except (ValueError, EOFError):
            return {}  # unreadable: treated as stale (no heartbeat), taken over
        return holder if isinstance(holder, dict) else {}

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                holder = self._read()
                if holder is not None and holder.get("owner") not in (None, self.owner):
                    self.lost = holder
                    return
                self.where.storage.write_bytes(self.where.path, self._record())
            except OSError:
                continue  # a missed heartbeat; the next one may get through


def _forget_leases_in_child() -> None:
    """In a forked child: the parent's leases are not this process's to beat or release."""
    for lease in list(_HOLDERS):
        lease._stop.set()
        lease._heartbeat = None  # release() then deletes nothing
    _HOLDERS.clear()
    _HELD_HERE.clear()


os.register_at_fork(after_in_child=_forget_leases_in_child)


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')}"


def _describe(where: Location, holder: dict[str, Any] | None) -> str:
    return (
        f"the run at {where.url.rsplit('/', 1)[0]} is being written by {_who(holder)} "
        f"(lease {where.url}); only one CheckpointManager may write a run at a time"
    )
