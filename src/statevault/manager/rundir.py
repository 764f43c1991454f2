"""A run directory on any storage: a local path (the fast path) or any fsspec URL.

What the manager does to a run, once per kind of store: take the writer lock, delete a
checkpoint (uncommit first), sweep the leftovers of dead saves, move a damaged checkpoint out of
the way, write the small side files (``run.json``, annotations).

- **Local** (rename): deletion renames the checkpoint to a temporary name, then deletes it;
  saves run under temporary names, so any temporary or manifest-less ``step_*`` directory is a
  leftover, swept at once (the flock guarantees no other writer is live).
- **Object stores** (no rename): deletion removes the manifest first, then the other objects.
  A save writes its shards under the final prefix and its manifest last, so a manifest-less
  ``step_*`` prefix may be a save *in flight* by another writer that ignored the lease (or the
  remains of a dead one). It is swept only once its newest object is older than
  ``stale_after_seconds`` (default one hour, far beyond any single save), and never loaded.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

from statevault import commit
from statevault.manager.index import RunScan, scan_run
from statevault.manager.lease import LeaseLock
from statevault.manager.lock import DEFAULT_LEASE_SECONDS, RunLock
from statevault.manager.naming import LOCK_FILE, RUN_FILE, step_dir_name
from statevault.storage.local import LocalStorage, fsync_dir
from statevault.storage.location import Location, resolve

logger = logging.getLogger("statevault")

DEFAULT_STALE_AFTER_SECONDS = 3600.0


class WriterLock(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...


class RunDir:
    """One run directory (see the module docstring). ``url`` is what messages show."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        stale_after_seconds: float = DEFAULT_STALE_AFTER_SECONDS,
    ) -> None:
        self.location = resolve(directory, storage_options)
        self.storage_options = dict(storage_options or {})
        self.stale_after_seconds = stale_after_seconds
        self.local = self.location.local
        self.url = self.location.url
        self.lock: LeaseLock | RunLock | None = None

    def create(self) -> None:
        if self.local:
            os.makedirs(self.location.path, exist_ok=True)
        else:
            self.location.storage.make_dir(self.location.path)

    def path(self, step: int) -> str:
        """The checkpoint of ``step``: a local path, or a URL."""
        return self.checkpoint(step).url

    def checkpoint(self, step: int) -> Location:
        return self.location.join(step_dir_name(step))

    def target(self, step: int) -> str | Location:
        """What the saver writes to: a plain path locally, the Location elsewhere."""
        return self.checkpoint(step).path if self.local else self.checkpoint(step)

    def scan(self) -> RunScan:
        return scan_run(self.location.path if self.local else self.location)

    # ---- the writer lock -------------------------------------------------------------------

    def acquire(self, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        if self.local:
            self.lock = RunLock(os.path.join(self.location.path, LOCK_FILE), lease_seconds)
        else:
            self.lock = LeaseLock(self.location.join(LOCK_FILE), lease_seconds)
        self.lock.acquire()

    def check_lock(self) -> None:
        """Raise RunLockedError when an object-store lease was lost to another writer."""
        if isinstance(self.lock, LeaseLock):
            self.lock.check()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- changes ---------------------------------------------------------------------------

    def delete(self, path: str) -> None:
        """Delete a committed checkpoint; it stops being committed first (no half of it stays
        committed)."""
        if self.local:
            commit.delete_committed(path)
        else:
            self.location.storage.remove_tree(self._child(path).path)

    def write_side_file(self, checkpoint_path: str, name: str, data: bytes) -> None:
        """Write a small file beside a checkpoint's manifest, atomically."""
        if self.local:
            target = os.path.join(checkpoint_path, name)
            tmp = f"{target}{commit.TMP_MARKER}{uuid.uuid4().hex[:8]}"
            with LocalStorage().open_write(tmp) as handle:
                handle.write(memoryview(data))
            os.replace(tmp, target)
            fsync_dir(checkpoint_path)
        else:
            self.location.storage.write_bytes(self._child(checkpoint_path).join(name).path, data)

    def move_aside(self, path: str) -> str | None:
        """Move a damaged checkpoint out of the way of a new save (local disks only: an object
        store has no rename, and the save there replaces the damaged objects itself)."""
        if not self.local:
            return None
        aside = f"{path}.corrupt-{uuid.uuid4().hex[:8]}"
        os.rename(path, aside)
        fsync_dir(self.location.path)
        warnings.warn(f"statevault: moved damaged {path} aside to {aside}", stacklevel=4)
        return aside

    def sweep(self) -> None:
        """Remove the leftovers of dead saves and deletions (see the module docstring)."""
        if self.local:
            self._sweep_local()
        else:
            self._sweep_remote()

    def _child(self, path: str) -> Location:
        return self.location.join(path.rstrip("/").rsplit("/", 1)[-1])

    def _sweep_local(self) -> None:
        """Safe without an age: holding the flock, no other save into this run is live.

        A committed checkpoint moved aside by an overwrite that died between its two renames
        (platforms without an atomic exchange) is put back first, never swept.
        """
        directory = self.location.path
        scan = scan_run(directory)
        leftovers = list(scan.temporaries)
        for name in scan.set_aside:
            original = os.path.join(directory, name.split(commit.TMP_MARKER)[0])
            if os.path.lexists(original):
                leftovers.append(name)  # the overwrite finished: the old copy is garbage
            else:
                os.rename(os.path.join(directory, name), original)
                fsync_dir(directory)
        # A step directory without a manifest was never a save in flight (saves run under
        # temporary names): it is what a deletion killed halfway left behind.
        leftovers += [
            os.path.basename(r.path) for r in scan.records.values() if r.status == "incomplete"
        ]
        leftovers += [n for n in os.listdir(directory) if n.startswith(RUN_FILE + ".tmp-")]
        for name in leftovers:
            path = os.path.join(directory, name)
            logger.info("statevault: removing leftover of an interrupted save: %s", path)
            if os.path.isdir(path) and not os.path.islink(path):
                LocalStorage().remove_tree(path)
            else:
                LocalStorage().remove_file(path)

    def _sweep_remote(self) -> None:
        scan = scan_run(self.location)
        names = [
            r.path.rsplit("/", 1)[-1] for r in scan.records.values() if r.status == "incomplete"
        ]
        now = time.time()
        for name in names + scan.temporaries:
            prefix = self.location.join(name)
            modified = self.location.storage.modified(prefix.path)
            if modified is None:
                continue
            if now - modified < self.stale_after_seconds:
                logger.info(
                    "statevault: leaving %s: no manifest, but written %.0f s ago (a save in "
                    "flight?); swept once older than %.0f s",
                    prefix.url,
                    now - modified,
                    self.stale_after_seconds,
                )
                continue
            logger.info("statevault: removing leftover of an interrupted save: %s", prefix.url)
            self.location.storage.remove_tree(prefix.path)
        abort = getattr(self.location.storage, "abort_stale_uploads", None)
        if callable(abort):  # uploads a killed writer began: invisible, but billed
            count = abort(self.location.path, self.stale_after_seconds)
            if count:
                logger.info("statevault: aborted %d stale multipart uploads", count)
