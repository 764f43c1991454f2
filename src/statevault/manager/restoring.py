"""Restore for :class:`~statevault.manager.manager.CheckpointManager`: the newest valid
checkpoint of the run (either tier), a fork from another run, and in a distributed job the
leader's choice followed by every rank (role.py). Mixed into the manager."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from statevault.checkpoint.load import load
from statevault.checkpoint.save import Saver
from statevault.errors import CheckpointError
from statevault.manager import options
from statevault.manager.index import CheckpointRecord, RunScan
from statevault.manager.replication import Replicator
from statevault.manager.resume import candidates, load_newest
from statevault.manager.role import Role
from statevault.manager.run import read_run
from statevault.manager.rundir import RunDir

logger = logging.getLogger("statevault")


@dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` restored: the step, its path (or URL), the tier
    it came from (``"local"``, ``"replica"`` or ``"source"`` for a fork) and the loaded tree."""

    step: int
    path: str
    state: Any
    tier: str = "local"


class RunRestore:
    """The restore half of the manager (attributes are the manager's)."""

    _dir: RunDir
    _replica: RunDir | None
    _replicator: Replicator | None
    _scan: RunScan
    _role: Role
    _saver: Saver
    _session: dict[str, Any]
    _resumed_step: int | None

    @property
    def run_id(self) -> str:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def _collect(self, block: bool) -> None:
        raise NotImplementedError

    def _write_run(self) -> None:
        raise NotImplementedError

    def restore(
        self,
        into: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        source: str | os.PathLike[str] | None = None,
        source_storage_options: Mapping[str, Any] | None = None,
        device: str | None = None,
        strict: bool = True,
    ) -> Restored | None:
        """Restore the newest valid checkpoint (or ``step``); None when the run has none.

        With ``replicate_to``, both tiers are searched: the newest step of either wins (the
        local copy first when both hold it), so a new node whose local tier is empty resumes
        from the replica. A checkpoint that fails verification is skipped with a warning
        naming it, and the next one is tried; damaged checkpoints are kept for inspection,
        never deleted here. ``source``: fork from another run directory or URL (its newest
        valid checkpoint, or ``step``) instead; the fork is recorded in this run's lineage.
        """
        self._check_open()
        step = options.as_step(step) if step is not None else None
        if self._role.leader:
            try:
                if source is not None:
                    restored = self._fork(
                        source, source_storage_options, into, step, device, strict
                    )
                else:
                    restored = self._restore_own(into, step, device, strict)
            except BaseException as exc:
                self._role.share(("error", f"{type(exc).__name__}: {exc}"))
                raise
            self._role.share(
                None if restored is None else (restored.path, restored.step, restored.tier)
            )
        else:
            restored = self._follow_restore(into, device, strict, source_storage_options)
        if into is not None:
            # Staging memory for async saves is made ready now, in the background.
            self._saver.prepare(into, reserve_optimizer_moments=True)
        return restored

    def _follow_restore(
        self,
        into: Mapping[str, Any] | None,
        device: str | None,
        strict: bool,
        source_storage_options: Mapping[str, Any] | None,
    ) -> Restored | None:
        """Load the checkpoint the leader chose (every rank restores the same step)."""
        choice = self._role.share(None)
        if choice is None:
            return None
        if choice[0] == "error":
            raise CheckpointError(f"rank 0 could not restore: {choice[1]}")
        path, step, tier = choice
        options = {
            "local": self._dir.storage_options,
            "replica": self._replica.storage_options if self._replica is not None else None,
            "source": source_storage_options,
        }[tier]
        state = load(path, into=into, device=device, strict=strict, storage_options=options)
        if tier == "local":
            self._resumed_step = step
        return Restored(step, path, state, tier)

    def _restore_own(
        self,
        into: Mapping[str, Any] | None,
        step: int | None,
        device: str | None,
        strict: bool,
    ) -> Restored | None:
        self._collect(block=False)
        tiers: list[tuple[str, Mapping[int, CheckpointRecord], Mapping[str, Any]]] = [
            ("local", self._scan.records, self._dir.storage_options)
        ]
        if self._replicator is not None and self._replica is not None:
            tiers.append(("replica", self._replicator.records(), self._replica.storage_options))
        loaded, damaged = load_newest(
            candidates(tiers, step), into, device, strict, step is not None
        )
        for bad_step, copy, problem in damaged:
            record = CheckpointRecord(bad_step, copy.url, "corrupt", problem)
            if copy.tier == "local":
                self._scan.records[bad_step] = record
            elif self._replicator is not None:
                self._replicator.forget(bad_step, record)
        if loaded is None:
            return None
        if loaded.copy.tier == "local":
            self._resumed_step = loaded.step
        resumed: dict[str, Any] = {"run_id": self.run_id, "step": loaded.step}
        if loaded.copy.tier != "local":
            resumed["tier"] = loaded.copy.tier
        self._session["resumed_from"] = resumed
        self._write_run()
        logger.info("statevault: resumed from %s", loaded.copy.url)
        return Restored(loaded.step, loaded.copy.url, loaded.state, loaded.copy.tier)

    def _fork(
        self,
        source: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None,
        into: Mapping[str, Any] | None,
        step: int | None,
        device: str | None,
        strict: bool,
    ) -> Restored | None:
        origin = RunDir(source, storage_options)
        records = origin.scan().records
        committed = {s: r for s, r in records.items() if r.status == "committed"}
        tiers = [("source", committed if step is None else records, origin.storage_options)]
        loaded, _ = load_newest(candidates(tiers, step), into, device, strict, False)
        if loaded is None:
            return None
        source_run = read_run(origin.location)
        self._session["forked_from"] = {
            "path": origin.url,
            "run_id": source_run["run_id"] if source_run else None,
            "step": loaded.step,
        }
        self._write_run()
        return Restored(loaded.step, loaded.copy.url, loaded.state, "source")
