"""``sv.resumable(loader)``: a torch DataLoader whose position is part of the saved state.

Wrap the loader and put the result in the state like a model::

    data = sv.resumable(DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2))
    state = {"model": model, "optimizer": opt, "data": data, "rng": sv.RNGState()}
    restored = mgr.restore(into=state)
    while data.epoch < epochs:
        for batch in data:          # after a restore: the next batch of the interrupted epoch
            ...

It iterates like the loader (``len``, one pass per ``iter()``, its attributes) and is Stateful:
``state_dict()`` is the data position, a few numbers (``data_position``). After
``load_state_dict()`` (what a restore calls), the next ``iter()`` continues the saved pass at
its next batch, with the same order and the same random augmentation, and then goes on with
the passes that would have followed. How:

- every pass has a seed (``data_seeds``), and the sampler draws from streams seeded by it
  (``isolated_rng``), so the order is a function of a few saved numbers;
- a map-style pass resumes by index: the keys of the consumed batches are skipped, their
  samples never loaded (``index_streams``, ``map_passes``), and a DistributedSampler's pass
  resumes on another number of ranks too (``distributed_split``);
- in workers, random streams are reseeded from the batch's seed before each batch
  (``worker_side``): a batch's augmentation does not depend on the batches loaded before it;
- iterable datasets are positioned by their own state when they are Stateful
  (``iterable_passes``).

The loader itself is never iterated: a resumable loader iterates a DataLoader of its own with
the same options (``inner_loader``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from statevault.state.data_position import Position
from statevault.state.data_seeds import source_seed
from statevault.state.iterable_passes import SKIP, IterablePasses
from statevault.state.map_passes import MapPasses
from statevault.state.stateful import type_name


def resumable(loader: Any) -> ResumableLoader:
    """Wrap a ``torch.utils.data.DataLoader`` so that its position is saved and restored with
    the rest of the state (see the module docstring). Example::

        data = sv.resumable(loader)
        sv.save({"model": model, "data": data, "rng": sv.RNGState()}, path)
    """
    return ResumableLoader(loader)


class ResumableLoader:
    """A DataLoader whose position is Stateful (made by :func:`resumable`)."""

    def __init__(self, loader: Any) -> None:
        _check_loader(loader)
        self._loader = loader
        self._passes: MapPasses | IterablePasses = (
            IterablePasses(loader) if _is_iterable(loader) else MapPasses(loader)
        )
        self._position = Position(0)
        self._total: int | None = None  # batches of the running pass, when known
        self._pending = False  # the position was loaded and no pass has continued it yet
        self._token = 0  # the running pass; iterators of an earlier one are stale
        self._source_seed: int | None = None

    # ---- iterating --------------------------------------------------------------------------

    @property
    def loader(self) -> Any:
        """The wrapped DataLoader."""
        return self._loader

    @property
    def epoch(self) -> int:
        """The number of the pass in progress, or of the next one: the count of passes
        finished (a pass is finished once its last batch was returned)."""
        return self._position.epoch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        # dataset, batch_size, sampler, num_workers...: the wrapped loader's.
        loader = self.__dict__.get("_loader")
        if loader is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(loader, name)

    def __iter__(self) -> Iterator[Any]:
        resume, self._pending = self._pending, False
        if not resume and self._position.started:  # a new iter() abandons the running pass
            self._position = self._passes.carry(self._position)
        if self._source_seed is None:
            self._source_seed = source_seed(self._loader, _samplers_of(self._passes))
        self._token += 1
        self._position, batches, self._total = self._passes.start(
            self._position, resume, self._source_seed
        )
        self._finish_if_complete()
        return _PassIterator(self, self._token, batches)

    def _take(self, token: int, item: Any) -> Any:
        batch = self._passes.take(item)
        if batch is not SKIP and token == self._token:
            self._position.batches += 1
            self._finish_if_complete()
        return batch

    def _end(self, token: int) -> None:
        if token == self._token and self._position.started:
            self._position = self._passes.carry(self._position)

    def _finish_if_complete(self) -> None:
        if self._total is not None and self._position.batches >= self._total:
            self._position = self._passes.carry(self._position)

    def _is_current(self, token: int) -> bool:
        return token == self._token

    # ---- Stateful ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The data position: a few numbers (and an iterable dataset's own state)."""
        position = self._position if self._pending else self._passes.live(self._position)
        return position.to_state()

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> None:
        """Make the next ``iter()`` continue the position ``state_dict`` describes."""
        position = Position.from_state(dict(state_dict))
        self._passes.on_load(position)
        self._passes.reset()
        self._token += 1  # an iterator of the pass running until now stops
        self._position, self._pending, self._total = position, True, None
        self._source_seed = None  # read again at the next iter(), after the RNG is restored too

    def restorable_state(self, saved: Any) -> Any:
        """The fit check of ``load(into=)``: any data position fits (``load_state_dict``
        checks it and says what is wrong); anything else is compared with this loader's."""
        if isinstance(saved, Mapping) and "version" in saved and "epoch" in saved:
            return saved
        return self.state_dict()

    def __repr__(self) -> str:
        return f"sv.resumable({type_name(self._loader)}, epoch={self.epoch})"


class _PassIterator:
    """The iterator of one pass; it stops once another pass started or a position was
    loaded."""

    def __init__(self, owner: ResumableLoader, token: int, batches: Iterator[Any]) -> None:
        self._owner, self._token, self._batches = owner, token, batches

    def __iter__(self) -> _PassIterator:
        return self

    def __len__(self) -> int:
        return len(self._owner)

    def __next__(self) -> Any:
        while True:
            if not self._owner._is_current(self._token):
                raise StopIteration
            try:
                item = next(self._batches)
            except StopIteration:
                self._owner._end(self._token)
                raise
            batch = self._owner._take(self._token, item)
            if batch is not SKIP:
                return batch


def _samplers_of(passes: MapPasses | IterablePasses) -> list[Any]:
    return passes.layout.samplers if isinstance(passes, MapPasses) else []


def _is_iterable(loader: Any) -> bool:
    from torch.utils.data import IterableDataset

    return isinstance(loader.dataset, IterableDataset)


def _check_loader(loader: Any) -> None:
    from torch.utils.data import DataLoader

    if type_name(loader).startswith("torchdata.stateful_dataloader."):
        raise TypeError(
            "sv.resumable: torchdata's StatefulDataLoader is Stateful already; put it in the "
            "state as it is (state = {..., 'data': loader}) instead of wrapping it"
        )
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"sv.resumable takes a torch.utils.data.DataLoader, got {type_name(loader)}"
        )
    if loader.num_workers > 0 and not getattr(loader, "in_order", True):
        raise ValueError(
            "sv.resumable: a DataLoader with in_order=False returns batches in the order its "
            "workers finish them, which no position can reproduce; use in_order=True"
        )
