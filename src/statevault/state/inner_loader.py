"""The DataLoader a resumable loader iterates in place of the user's.

It has every option of the user's loader (workers, persistent workers, prefetching, pinning,
collate_fn, worker_init_fn, multiprocessing context, timeout, in_order) with three changes:

- its batches of keys come from an :class:`IndexSource`, which the resumable loader loads with
  the keys of each pass before iterating (map-style datasets);
- its workers read the dataset through the wrappers of ``worker_side`` (reseeding per batch);
- it draws its workers' base seed from a generator of its own, never from torch's global one:
  creating an iterator must not consume the training's random stream, or a resumed run, which
  creates one more iterator than the run it continues, would diverge from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from statevault.state.worker_side import SeededMapDataset


class IndexSource:
    """The inner loader's batch sampler: the batches of keys of the pass being started."""

    def __init__(self) -> None:
        self._batches: Iterator[Any] = iter(())
        self._length = 0

    def load(self, batches: Iterator[Any], length: int | None) -> None:
        self._batches, self._length = batches, length or 0

    def __iter__(self) -> Iterator[Any]:
        # The same iterator each time: a multi-worker DataLoader iterator asks twice at creation.
        return self._batches

    def __len__(self) -> int:
        return self._length


def _options(loader: Any, generator: Any) -> dict[str, Any]:
    return {
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": getattr(loader, "in_order", True),
    }


def map_loader(loader: Any, source: IndexSource, generator: Any) -> Any:
    """The inner loader of a map-style dataset."""
    from torch.utils.data import DataLoader

    dataset: Any = SeededMapDataset(loader.dataset) if loader.num_workers > 0 else loader.dataset
    options = _options(loader, generator)
    if loader.batch_sampler is None:  # no automatic batching: one key, one item
        return DataLoader(
            dataset, batch_size=None, sampler=source, collate_fn=loader.collate_fn, **options
        )
    return DataLoader(dataset, batch_sampler=source, collate_fn=loader.collate_fn, **options)


def iterable_loader(
    loader: Any, dataset: Any, collate_fn: Callable[[Any], Any], generator: Any
) -> Any:
    """The inner loader of an iterable dataset (``dataset`` as its workers should see it)."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        collate_fn=collate_fn,
        **_options(loader, generator),
    )
