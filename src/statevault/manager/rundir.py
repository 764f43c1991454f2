"""A run directory on any storage: a local path (the fast path) or any fsspec URL.

What the manager does to a run, once per kind of store: take the writer lock, delete a
checkpoint (uncommit first), sweep the leftovers of dead saves, move a damaged checkpoint out of
the way, write the small side files (``run.json``, annotations).

- **Local** (rename): deletion renames the checkpoint to a temporary name, then deletes it;
  saves run under temporary names, so a temporary or a manifest-less ``step_*`` directory of
  statevault's (its marker says so) is a leftover, swept at once (the flock guarantees that no
  other writer is live).
- **Object stores** (no rename): deletion removes the manifest first, then the other objects,
  the marker last. A save writes its shards under the final prefix and its manifest last, so a
  manifest-less ``step_*`` prefix may be a save *in flight* by another writer that ignored the
  lease (or the remains of a dead one). It is swept only once its newest object is older than
  ``stale_after_seconds`` (default one hour, far beyond any single save), and never loaded.

Only what is provably statevault's is ever deleted (manager/leftovers.py); another tool's
directories in a run are left alone with a warning.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

from statevault.checkpoint import commit
from statevault.format.names import MANIFEST_NAME
from statevault.manager.config import DEFAULT_STALE_AFTER_SECONDS
from statevault.manager.holder import DEFAULT_LEASE_SECONDS
from statevault.manager.index import RunScan, scan_run
from statevault.manager.lease import LeaseLock
from statevault.manager.leftovers import is_statevault_upload, survey
from statevault.manager.lock import RunLock
from statevault.manager.naming import LOCK_FILE, step_dir_name
from statevault.storage.local import LocalStorage, fsync_dir
from statevault.storage.location import Location, resolve

logger = logging.getLogger("statevault")


class WriterLock(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...


class RunDir:
    """One run directory (see the module docstring). ``url`` is what messages show."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | Location,
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
        """Delete the checkpoint at ``path`` (a path or URL of this run): :meth:`remove`."""
        self.remove(path.rstrip("/").rsplit("/", 1)[-1])

    def remove(self, name: str) -> None:
        """Delete ``name`` of this run by the rules every deletion follows (the manager's
        retention and sweep, ``statevault rm`` and ``gc``): a committed checkpoint stops being
        one first (locally renamed to a temporary in one atomic step, on a store its manifest
        goes first), the marker goes last (commit.remove_checkpoint), and a small file of the
        run (a ``run.json`` temporary) is unlinked. Deciding *whether* something may be
        deleted is the caller's (leftovers.py, commit.ownership)."""
        where = self.location.join(name)
        if not self.local:
            commit.remove_checkpoint(where)
        elif not os.path.isdir(where.path) or os.path.islink(where.path):
            where.storage.remove_file(where.path)
        elif os.path.isfile(os.path.join(where.path, MANIFEST_NAME)) and not commit.is_temporary(
            name
        ):
            commit.delete_committed(where.path)
        else:
            commit.remove_checkpoint(where)

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
        """Remove the leftovers of statevault's own dead saves and deletions, and nothing else
        (manager/leftovers.py); warn about what is left alone as another tool's."""
        stale = None if self.local else self.stale_after_seconds
        found = survey(self.location, self.scan(), stale)
        for name in found.restore:  # an overwrite died between its renames: put the old back
            original = name.split(commit.TMP_MARKER)[0]
            os.rename(
                os.path.join(self.location.path, name), os.path.join(self.location.path, original)
            )
            fsync_dir(self.location.path)
        for note in found.young:
            logger.info("statevault: %s: leaving %s", self.url, note)
        for item in found.garbage:
            logger.info(
                "statevault: removing leftover of an interrupted save: %s",
                self.location.join(item.name).url,
            )
            self.remove(item.name)
        foreign = found.foreign_note()
        if foreign is not None:
            warnings.warn(f"statevault: {self.url}: {foreign}", stacklevel=4)
        abort = getattr(self.location.storage, "abort_stale_uploads", None)
        if not self.local and callable(abort):  # uploads a killed writer began: invisible, billed
            count = abort(self.location.path, self.stale_after_seconds, is_statevault_upload)
            if count:
                logger.info("statevault: aborted %d stale multipart uploads", count)

    def _child(self, path: str) -> Location:
        return self.location.join(path.rstrip("/").rsplit("/", 1)[-1])
