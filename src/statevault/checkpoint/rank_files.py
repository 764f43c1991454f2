"""Which shard files one rank writes in a save: the leaves it is dealt (engine/assignment.py,
remembered per plan since dealing them is the costly part at scale), grouped into files as
reuse.py lays out an incremental save, and the baseline an incremental save may share from."""

from __future__ import annotations

import logging

from statevault.checkpoint.open import open_checkpoint
from statevault.checkpoint.reuse import Baseline, Layout, plan_layout
from statevault.distributed.coordinator import Group
from statevault.engine.assignment import leaves_to_write
from statevault.engine.plan import SavePlan
from statevault.errors import CheckpointError
from statevault.storage.location import Location

logger = logging.getLogger("statevault")
_REMEMBERED_PLANS = 8


class RankFiles:
    """The file layout of this rank's saves and the baseline of the next incremental one.

    ``max_file_bytes``: the most one file may hold (an asynchronous save stages a file whole),
    or None. ``incremental``: lay unchanged tensors apart and remember what was committed."""

    def __init__(self, max_file_bytes: int | None, incremental: bool) -> None:
        self.max_file_bytes = max_file_bytes
        self.incremental = incremental
        self.baseline: Baseline | None = None  # the own files of the last committed save
        self._assignments: dict[tuple[str, int, int], list[int]] = {}

    def layout(
        self, plan: SavePlan, digest: str, group: Group, baseline: Baseline | None
    ) -> Layout:
        """This rank's leaves grouped into shard files."""
        if group.size == 1:
            mine = list(range(len(plan.leaves)))  # a group of one writes everything
        else:
            key = (digest, group.rank, group.size)
            if key not in self._assignments:
                if len(self._assignments) > _REMEMBERED_PLANS:
                    self._assignments.clear()
                self._assignments[key] = leaves_to_write(plan, group.rank, group.size)
            mine = self._assignments[key]
        return plan_layout(plan, mine, baseline, self.max_file_bytes, self.incremental)

    def files(self, plan: SavePlan, digest: str, group: Group) -> list[list[int]]:
        """This rank's leaves grouped into shard files, as a full save lays them out."""
        return self.layout(plan, digest, group, None).files

    def baseline_for(self, reuse: Location | None, rank: int) -> Baseline | None:
        """What an incremental save may share: the remembered own files of the last save when
        ``reuse`` is that checkpoint, else those the manifest of ``reuse`` lists for this rank
        (after a restart); nothing when it cannot be read (the save is then a full one)."""
        if not self.incremental or reuse is None:
            return None
        known = self.baseline
        if known is not None and known.location.url == reuse.url:
            return known
        try:
            with open_checkpoint(reuse, ranks=[rank]) as previous:  # its own index only
                return Baseline.of(reuse, previous.manifest, rank)
        except CheckpointError as exc:
            logger.warning("statevault: %s cannot be reused (%s): a full save", reuse.url, exc)
            return None
