"""Passes of a resumable loader over a map-style dataset: skipped by index, never loaded.

:meth:`MapPasses.start` turns a position into the batches of keys left in its pass
(``index_streams``), hands them to the inner DataLoader (``inner_loader``) and iterates it. A
``DistributedSampler``'s pass resumed on another number of ranks is dealt out anew over them
(``distributed_split``), and a log line says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from statevault.errors import CheckpointError
from statevault.state.data_position import Position
from statevault.state.data_seeds import derive_seed
from statevault.state.distributed_split import (
    Split,
    fresh_split,
    is_distributed_sampler,
    mismatch,
    remainder,
    resplit_message,
)
from statevault.state.index_streams import Layout, pass_keys
from statevault.state.inner_loader import IndexSource, map_loader
from statevault.state.worker_side import seeded

logger = logging.getLogger("statevault")


class MapPasses:
    """Starts and resumes the passes of one map-style DataLoader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.layout = Layout.of(loader)
        self.source = IndexSource()
        self._inner: Any = None
        self._generator: Any = None

    def start(
        self, position: Position, resume: bool, source_seed: int
    ) -> tuple[Position, Iterator[Any], int | None]:
        """The started pass's position, its batches, and how many it has in all (if known).
        ``resume``: continue ``position``'s pass where it stopped (if it had started)."""
        continuing = resume and position.started
        if continuing:
            self._check_sampler_epoch(position)
        seed = position.seed if continuing else None  # continuing: the pass has its seed
        if seed is None:
            seed = derive_seed(source_seed, position.epoch)
        skip = position.batches if continuing else 0
        rank = self._rank()
        split, skip = self._split(position if continuing else None, skip, rank)
        keys = pass_keys(self.layout, seed, skip, split, rank)
        batches = keys.batches
        if self.loader.num_workers > 0:
            batched = self.layout.batch_size is not None or self.layout.batch_sampler is not None
            batches = seeded(batches, skip, seed, rank, batched)
        self.source.load(batches, keys.remaining)
        started = Position(position.epoch, seed, skip, self._sampler_epoch(), split, self._world())
        total = None if keys.remaining is None else skip + keys.remaining
        return started, iter(self._inner_loader(seed)), total

    def take(self, item: Any) -> Any:
        return item

    def carry(self, position: Position) -> Position:
        return Position(position.epoch + 1)

    def live(self, position: Position) -> Position:
        return position

    def reset(self) -> None:
        """Drop the inner loader (and its persistent workers): the next pass makes a new one."""
        self._inner = None

    def on_load(self, position: Position) -> None:
        """Check that this loader can continue ``position``, and set its sampler's epoch."""
        if not position.started:
            return
        self._check_world(position)
        holder = self._epoch_holder()
        if holder is not None and position.sampler_epoch is not None:
            setter = getattr(holder, "set_epoch", None)
            if callable(setter):
                setter(position.sampler_epoch)
            else:
                holder.epoch = position.sampler_epoch

    # ---- the sampler: its epoch, its world, its rank ------------------------------------------

    def _epoch_holder(self) -> Any:
        for sampler in self.layout.samplers:
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                return sampler
        return None

    def _sampler_epoch(self) -> int | None:
        holder = self._epoch_holder()
        return None if holder is None else int(holder.epoch)

    def _world(self) -> int | None:
        for sampler in self.layout.samplers:
            world = getattr(sampler, "num_replicas", None)
            if isinstance(world, int):
                return world
        return None

    def _rank(self) -> int:
        for sampler in self.layout.samplers:
            rank = getattr(sampler, "rank", None)
            if isinstance(rank, int) and not isinstance(rank, bool):
                return rank
        return process_rank()

    def _check_sampler_epoch(self, position: Position) -> None:
        now = self._sampler_epoch()
        if position.sampler_epoch is None or now == position.sampler_epoch:
            return
        raise CheckpointError(
            f"sv.resumable: the saved data position is in epoch {position.sampler_epoch} of the "
            f"sampler (after {position.batches} batches), but the sampler was set to epoch "
            f"{now} before iterating: resuming there would skip or repeat data. Restoring the "
            f"position set the sampler's epoch to {position.sampler_epoch}; call set_epoch() "
            "with the epoch of the restored position (start the epoch loop at it)"
        )

    def _check_world(self, position: Position) -> None:
        now = self._world()
        if position.world is None or now == position.world:
            return
        if is_distributed_sampler(self.layout.sampler) and self.layout.batch_sampler is None:
            return  # dealt out anew over the new ranks (see _split)
        raise CheckpointError(
            f"sv.resumable: the data position was saved with a sampler over {position.world} "
            f"ranks and the sampler now has {now}; only torch's DistributedSampler (used as the "
            "loader's sampler) can be resumed on another number of ranks. Resume on "
            f"{position.world} ranks, or restart the epoch"
        )

    def _split(self, saved: Position | None, skip: int, rank: int) -> tuple[Split | None, int]:
        """The part of a DistributedSampler's epoch this pass covers, and the batches to skip
        in it: the saved split on the same number of ranks, its remainder on another."""
        sampler: Any = self.layout.sampler
        if self.layout.batch_sampler is not None or not is_distributed_sampler(sampler):
            return None, skip
        if saved is None or saved.split is None:
            return fresh_split(sampler), skip
        problem = mismatch(saved.split, sampler)
        if problem is not None:
            raise CheckpointError(
                f"sv.resumable: cannot continue the saved epoch: {problem}; build the sampler "
                "as it was built when the position was saved"
            )
        world = int(sampler.num_replicas)
        if world == saved.split.world:
            return saved.split, skip
        consumed = skip * self.layout.keys_per_batch
        rest = remainder(saved.split, consumed, world)
        logger.warning(resplit_message(saved.split, rest, consumed, rank))
        return rest, 0

    def _inner_loader(self, seed: int) -> Any:
        import torch

        if self._inner is None:
            self._generator = torch.Generator()
            self._inner = map_loader(self.loader, self.source, self._generator)
        self._generator.manual_seed(derive_seed(seed, "base"))
        return self._inner


def process_rank() -> int:
    """This process's rank in torch.distributed's default group, or 0 outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0
