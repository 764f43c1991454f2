"""Saves to paths a framework chooses (Lightning's ``epoch=0-step=10.ckpt``, Accelerate's
``checkpoint_3``), synchronously or in the background, with no lock for the caller to hold.

Each save is staged (copied) before :meth:`PathSaves.save` returns, so training may change its
state at once; the bytes are written, checksummed and committed by a background thread. At most
``max_in_flight`` saves are in flight, each with its own staging memory: a framework that saves
twice at one step (a top-k checkpoint, then ``last``) does not wait for the first. Rules:

- a save, load or deletion of a path first waits for the save of that same path in flight;
- a background failure is raised by the next ``save``, ``settle``, ``wait`` or ``close``;
- at interpreter exit the saves in flight are waited for (a daemon thread would otherwise stop
  halfway, leaving the previous checkpoint at that path, never a torn one).

Inside a process group (``collective=True``) every rank calls the same methods in the same
order and one save is in flight at a time (settling it is a collective). Example::

    saves = PathSaves(asynchronous=True)
    saves.save(state, "ckpt/epoch=0-step=10.ckpt")  # returns once staged
    saves.wait()                                     # every save durable
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint.save import Saver
from statevault.checkpoint.stage import default_staging_budget
from statevault.distributed.coordinator import SoloGroup
from statevault.storage.location import Location, resolve

logger = logging.getLogger("statevault")
_ORDER = itertools.count()


@dataclass
class _Slot:
    saver: Saver
    url: str | None = None  # the path of the save in flight in this slot
    order: int = field(default_factory=lambda: next(_ORDER))


class PathSaves:
    """Saves to arbitrary paths (see the module docstring).

    ``asynchronous``: return once staged (else once durable). ``max_in_flight``: background
    saves at once (each stages a full copy of its state). ``collective``: save together with
    every rank of the default process group (else this process alone: Lightning's rank 0).
    ``staging_budget_bytes``: staging memory of all the slots together (default: half of RAM).
    """

    def __init__(
        self,
        *,
        asynchronous: bool,
        max_in_flight: int = 2,
        collective: bool = False,
        staging_budget_bytes: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.asynchronous = asynchronous
        self.collective = collective
        self.max_in_flight = max_in_flight if asynchronous and not collective else 1
        budget = staging_budget_bytes or default_staging_budget()
        self._budget = max(budget // self.max_in_flight, 1 << 20)
        self._storage_options = dict(storage_options or {})
        self._slots: list[_Slot] = []
        reference = weakref.ref(self)
        atexit.register(_wait_at_exit, reference)

    def location(self, path: str | os.PathLike[str]) -> Location:
        return resolve(path, self._storage_options)

    def save(self, state: Any, path: str | os.PathLike[str], *, metadata: Any = None) -> Location:
        """Save ``state`` at ``path``, replacing a checkpoint of statevault's there (never
        another tool's file); returns once staged (asynchronous) or durable."""
        target = self.location(path)
        self.settle(target.url)
        slot = self._free_slot()
        slot.url, slot.order = target.url, next(_ORDER)
        try:
            slot.saver.save(state, target, metadata=metadata, overwrite=True)
        except BaseException:
            slot.url = None
            raise
        if not self.asynchronous:
            slot.url = None  # a synchronous save is settled when it returns
        return target

    def settle(self, url: str) -> None:
        """Wait for the save of ``url`` in flight, if any; raise its failure, or an earlier
        background failure. Collective: every save in flight (each rank decides alike)."""
        for slot in self._busy():
            if self.collective or slot.url == url or slot.saver.idle():
                self._finish(slot)

    def in_flight(self) -> list[str]:
        return [slot.url for slot in self._busy() if slot.url is not None]

    def wait(self) -> None:
        """Every save durable; raises the first background failure (after waiting for all)."""
        error: BaseException | None = None
        for slot in self._busy():
            try:
                self._finish(slot)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for every save, then free the staging memory (it is allocated again on the
        next save)."""
        try:
            self.wait()
        finally:
            for slot in self._slots:
                slot.saver.close()
            self._slots.clear()

    def _busy(self) -> list[_Slot]:
        return sorted((s for s in self._slots if s.url is not None), key=lambda s: s.order)

    def _free_slot(self) -> _Slot:
        for slot in self._busy():
            if not self.collective and slot.saver.idle():  # idle() is this rank's own view
                self._finish(slot)  # raises a background failure at once
        free = [s for s in self._slots if s.url is None]
        if free:
            return free[0]
        if len(self._slots) < self.max_in_flight:
            group = None if self.collective else SoloGroup()
            saver = Saver(
                asynchronous=self.asynchronous, staging_budget_bytes=self._budget, group=group
            )
            self._slots.append(_Slot(saver))
            return self._slots[-1]
        oldest = self._busy()[0]
        self._finish(oldest)
        return oldest

    def _finish(self, slot: _Slot) -> None:
        try:
            slot.saver.wait()
        finally:
            slot.url = None

    def _wait_alone(self) -> None:
        for slot in self._busy():
            try:
                slot.saver.settle_alone()
            except BaseException as exc:  # at exit: say it, the process is ending anyway
                logger.error("statevault: the save of %s failed: %r", slot.url, exc)
            slot.url = None


def _wait_at_exit(reference: weakref.ref[PathSaves]) -> None:
    saves = reference()
    if saves is not None:
        saves._wait_alone()
