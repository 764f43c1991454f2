"""``sv.resumable``: a DataLoader's position saved and restored exactly, skipped by index.

Each exactness test runs a loader twice over 2 epochs: once uninterrupted (the reference), once
stopped after ``k`` batches, saved with ``sv.save`` and continued by a fresh loader (fresh
dataset, other random streams) after ``sv.load(into=...)``. The batches before plus the batches
after must be the reference's, bit for bit: every sample carries the random draws of its
augmentation (``resumable_helpers``), so the same order is not enough, the random streams must
match too. The resumed run must load only the samples of the batches it returns.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    WeightedRandomSampler,
)

import statevault as sv
from statevault.state.distributed_split import fresh_split, rank_keys
from statevault.state.index_streams import _direct_keys, _isolated_keys
from tests.resumable_helpers import (
    Augmented,
    GlobalShuffle,
    OwnGenerator,
    PairBatches,
    PlainStream,
    StatefulStream,
    seed_everything,
    take,
)

SIZE, EPOCHS = 14, 2
MakeLoader = Callable[[Any], DataLoader[Any]]

LOADERS: dict[str, MakeLoader] = {
    "shuffle, loader generator, no workers": lambda ds: DataLoader(
        ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7)
    ),
    "shuffle, global RNG, 2 workers": lambda ds: DataLoader(
        ds, batch_size=3, shuffle=True, num_workers=2
    ),
    "shuffle, global RNG, 2 persistent workers": lambda ds: DataLoader(
        ds, batch_size=3, shuffle=True, num_workers=2, persistent_workers=True
    ),
    "own sampler on the global RNG, 2 workers": lambda ds: DataLoader(
        ds, batch_size=3, sampler=GlobalShuffle(len(ds)), num_workers=2
    ),
    "own sampler with its own generator": lambda ds: DataLoader(
        ds, batch_size=4, sampler=OwnGenerator(len(ds), seed=5), drop_last=True
    ),
    "weighted sampler with replacement": lambda ds: DataLoader(
        ds, batch_size=3, sampler=WeightedRandomSampler([1.0] * len(ds), 17, replacement=True)
    ),
    "own batch sampler, 2 workers": lambda ds: DataLoader(
        ds, batch_sampler=PairBatches(len(ds)), num_workers=2
    ),
    "no automatic batching, 1 worker": lambda ds: DataLoader(
        ds, batch_size=None, shuffle=True, num_workers=1
    ),
    "DistributedSampler rank 1 of 2, set_epoch, 1 worker": lambda ds: DataLoader(
        ds,
        batch_size=3,
        sampler=DistributedSampler(ds, num_replicas=2, rank=1, seed=4),
        num_workers=1,
    ),
}


def keys_of(batch: Any) -> list[int]:
    """The dataset keys of a batch as ``take`` returns it (a list of samples, or one)."""
    return [row[0] for row in batch] if isinstance(batch[0], list) else [batch[0]]


def interrupt_and_resume(make: MakeLoader, stop: int, path: Path) -> dict[str, Any]:
    seed_everything(0)
    reference = take(sv.resumable(make(Augmented(SIZE))), EPOCHS)
    seed_everything(0)
    data = sv.resumable(make(Augmented(SIZE)))
    before = take(data, EPOCHS, stop=stop)
    saved = data.state_dict()
    sv.save({"data": data, "rng": sv.RNGState()}, path)
    del data
    gc.collect()  # its workers are gone: none loads a sample of the resumed run
    seed_everything(1234)  # a new process has other random streams; restoring replaces them
    dataset = Augmented(SIZE)
    resumed = sv.resumable(make(dataset))
    sv.load(path, into={"data": resumed, "rng": sv.RNGState()})
    after = take(resumed, EPOCHS)
    return {
        "reference": reference,
        "before": before,
        "after": after,
        "saved": saved,
        "loads": dataset.load_counts(),
        "per_epoch": len(make(Augmented(SIZE))),
    }


@pytest.mark.parametrize("name", list(LOADERS))
@pytest.mark.parametrize("where", ["mid-epoch", "last batch of an epoch", "second epoch"])
def test_resumes_at_the_exact_next_batch(name: str, where: str, tmp_path: Path) -> None:
    per_epoch = len(LOADERS[name](Augmented(SIZE)))
    stop = {"mid-epoch": 2, "last batch of an epoch": per_epoch, "second epoch": per_epoch + 2}
    run = interrupt_and_resume(LOADERS[name], stop[where], tmp_path / "ckpt")
    assert run["before"] + run["after"] == run["reference"]
    # Skipped by index: the resumed run loaded exactly the samples of the batches it returned.
    wanted = Counter(key for batch in run["after"] for key in keys_of(batch))
    assert Counter({k: n for k, n in enumerate(run["loads"]) if n}) == wanted
    if where == "last batch of an epoch":  # the position is the start of the next epoch
        assert (run["saved"]["epoch"], run["saved"]["seed"], run["saved"]["batches"]) == (
            1,
            None,
            0,
        )


def test_without_the_position_the_run_differs(tmp_path: Path) -> None:
    """The negative control: the comparison above would catch a resume that lost the position
    or the random streams."""
    make = LOADERS["shuffle, global RNG, 2 workers"]
    seed_everything(0)
    reference = take(sv.resumable(make(Augmented(SIZE))), EPOCHS)
    seed_everything(0)
    fresh = take(sv.resumable(make(Augmented(SIZE))), EPOCHS)
    assert fresh == reference  # the same seed gives the same run...
    seed_everything(1)
    other = take(sv.resumable(make(Augmented(SIZE))), EPOCHS)
    assert [keys_of(b) for b in other] != [keys_of(b) for b in reference]  # ...another, not


def test_the_number_of_workers_may_change_between_runs() -> None:
    """A batch's augmentation depends on its seed, not on the worker that loads it."""

    def make(workers: int) -> DataLoader[Any]:
        return DataLoader(
            Augmented(SIZE),
            batch_size=3,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers == 1,
        )

    seed_everything(0)
    reference = take(sv.resumable(make(2)), EPOCHS)
    data = sv.resumable(make(2))
    before = take(data, EPOCHS, stop=3)
    resumed = sv.resumable(make(1))
    resumed.load_state_dict(data.state_dict())
    assert before + take(resumed, EPOCHS) == reference


def test_the_position_is_a_few_bytes_and_plain() -> None:
    data = sv.resumable(DataLoader(Augmented(1_000_000), batch_size=64, shuffle=True))
    batches = iter(data)
    for _ in range(3):
        next(batches)
    state = data.state_dict()
    assert len(json.dumps(state)) < 200, state
    assert state["epoch"] == 0 and state["batches"] == 3


def test_behaves_like_the_loader() -> None:
    loader = DataLoader(Augmented(SIZE), batch_size=4, shuffle=True)
    data = sv.resumable(loader)
    assert len(data) == len(loader) == 4
    assert data.batch_size == 4 and data.dataset is loader.dataset and data.loader is loader
    assert [len(b) for b in data] == [4, 4, 4, 2] and data.epoch == 1
    assert sorted(k for b in data for k in keys_of(b.tolist())) == list(range(SIZE))
    assert data.epoch == 2
    first = iter(data)
    next(first)
    second = iter(data)  # a new iter() abandons the running pass, as a DataLoader does
    assert data.epoch == 3 and next(first, None) is None
    assert len(list(second)) == 4


# ---- the fast paths are the samplers' own orders ------------------------------------------------


@pytest.mark.parametrize("with_generator", [False, True])
@pytest.mark.parametrize("num_samples", [None, 5, 30])
def test_random_sampler_shortcut_matches_the_sampler(
    with_generator: bool, num_samples: int | None
) -> None:
    generator = torch.Generator().manual_seed(3) if with_generator else None
    sampler = RandomSampler(range(11), num_samples=num_samples, generator=generator)
    direct = _direct_keys(sampler, seed=42, skip=4)
    assert direct is not None
    assert list(direct) == list(_isolated_keys(sampler, seed=42, skip=4))


@pytest.mark.parametrize("size", [10, 11])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_arithmetic_matches_the_sampler(
    size: int, world: int, shuffle: bool, drop_last: bool
) -> None:
    for rank in range(world):
        sampler = DistributedSampler(
            range(size), world, rank, shuffle=shuffle, seed=9, drop_last=drop_last
        )
        sampler.set_epoch(2)
        assert rank_keys(fresh_split(sampler), rank, skip=1) == list(sampler)[1:]


# ---- DistributedSampler: set_epoch, and another number of ranks ------------------------------


def distributed_loader(dataset: Any, world: int, rank: int) -> DataLoader[Any]:
    return DataLoader(
        dataset, batch_size=2, sampler=DistributedSampler(dataset, world, rank, seed=1)
    )


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 3), (3, 2), (2, 1)])
def test_another_number_of_ranks_covers_the_rest_once(
    saved_on: int, resumed_on: int, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = Augmented(23)
    consumed: list[int] = []
    for rank in range(saved_on):  # ranks step together: each consumes 2 batches of epoch 1
        data = sv.resumable(distributed_loader(dataset, saved_on, rank))
        data.sampler.set_epoch(1)
        batches = iter(data)
        consumed += [k for _ in range(2) for k in keys_of(next(batches).tolist())]
        position = data.state_dict()
    dataset.forget_loads()
    rest: list[int] = []
    with caplog.at_level(logging.WARNING, logger="statevault"):
        for rank in range(resumed_on):
            data = sv.resumable(distributed_loader(dataset, resumed_on, rank))
            data.load_state_dict(position)
            rest += [k for batch in data for k in keys_of(batch.tolist())]
            assert data.epoch == position["epoch"] + 1  # that pass is over; the next follows
    assert sorted(consumed + rest) == list(range(23))  # each sample once, padding dropped
    assert sum(dataset.load_counts()) == len(rest) == 23 - 2 * 2 * saved_on
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == resumed_on
    assert f"saved by {saved_on} ranks" in lines[0] and f"resumed by {resumed_on}" in lines[0]
    assert "each exactly once" in lines[0]


def test_resuming_another_sampler_epoch_is_refused() -> None:
    data = sv.resumable(distributed_loader(Augmented(SIZE), 2, 0))
    data.sampler.set_epoch(3)
    next(iter(data))
    position = data.state_dict()
    resumed = sv.resumable(distributed_loader(Augmented(SIZE), 2, 0))
    resumed.load_state_dict(position)
    assert resumed.sampler.epoch == 3  # restoring the position set the sampler's epoch
    resumed.sampler.set_epoch(4)
    with pytest.raises(sv.CheckpointError, match=r"epoch 3 of the sampler.*set to epoch 4"):
        iter(resumed)


# ---- iterable datasets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "persistent"), [(0, False), (2, False), (2, True)], ids=["0", "2", "2-persistent"]
)
@pytest.mark.parametrize("stop", [1, 4, 6])
def test_stateful_iterable_dataset_resumes_exactly(
    workers: int, persistent: bool, stop: int, tmp_path: Path
) -> None:
    def make(dataset: StatefulStream) -> DataLoader[Any]:
        return DataLoader(dataset, batch_size=3, num_workers=workers, persistent_workers=persistent)

    seed_everything(0)
    reference = take(sv.resumable(make(StatefulStream(13))), EPOCHS)
    seed_everything(0)
    data = sv.resumable(make(StatefulStream(13)))
    before = take(data, EPOCHS, stop=stop)
    sv.save({"data": data, "rng": sv.RNGState()}, tmp_path / "ckpt")
    del data
    gc.collect()
    seed_everything(77)
    dataset = StatefulStream(13)
    resumed = sv.resumable(make(dataset))
    sv.load(tmp_path / "ckpt", into={"data": resumed, "rng": sv.RNGState()})
    after = take(resumed, EPOCHS)
    assert before + after == reference
    # Nothing read twice: the resumed run read exactly the samples it returned.
    assert dataset.produced.value == sum(len(batch) for batch in after)


def test_iterable_dataset_without_state_warns_and_reads_again(tmp_path: Path) -> None:
    def make() -> DataLoader[Any]:
        return DataLoader(PlainStream(13), batch_size=3, num_workers=2)

    seed_everything(0)
    reference = take(sv.resumable(make()), EPOCHS)
    seed_everything(0)
    data = sv.resumable(make())
    before = take(data, EPOCHS, stop=3)
    position = data.state_dict()
    resumed = sv.resumable(make())
    with pytest.warns(UserWarning) as caught:
        resumed.load_state_dict(position)
    message = str(caught[0].message)
    assert "tests.resumable_helpers.PlainStream" in message
    assert "reads its first 3 batches again and discards them" in message
    assert before + take(resumed, EPOCHS) == reference  # exact here: the stream repeats itself


def test_iterable_position_needs_the_same_workers() -> None:
    data = sv.resumable(DataLoader(StatefulStream(13), batch_size=3, num_workers=2))
    next(iter(data))
    position = data.state_dict()
    other = sv.resumable(DataLoader(StatefulStream(13), batch_size=3, num_workers=1))
    with pytest.raises(sv.CheckpointError, match="num_workers=2"):
        other.load_state_dict(position)


# ---- what it refuses --------------------------------------------------------------------------


def test_refusals() -> None:
    with pytest.raises(TypeError, match=r"takes a torch\.utils\.data\.DataLoader"):
        sv.resumable([1, 2, 3])
    with pytest.raises(ValueError, match="in_order=False"):
        sv.resumable(DataLoader(Augmented(4), num_workers=1, in_order=False))
    data = sv.resumable(DataLoader(Augmented(4)))
    with pytest.raises(sv.CheckpointError, match="not one this statevault can read"):
        data.load_state_dict({"version": 1, "epoch": -1})


# ---- torchdata's StatefulDataLoader, saved as any Stateful ------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_torchdata_stateful_dataloader_is_saved_as_stateful(workers: int, tmp_path: Path) -> None:
    """statevault saves and restores a StatefulDataLoader like any Stateful. What it then does
    is torchdata's (0.11, observed here): the rest of the interrupted epoch comes in the exact
    order, but neither its random augmentation nor the next epoch's order is the uninterrupted
    run's. (Without workers, the resumed iterator draws its seeds from the global stream that
    RNGState restored, which shifts it; with workers, each worker's stream starts again from
    its seed; and the next epoch's shuffle draws from that shifted stream.) sv.resumable
    resumes all three (the tests above)."""
    pytest.importorskip("torchdata", reason="torchdata is not installed (the test extra has it)")
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> Any:
        return StatefulDataLoader(Augmented(SIZE), batch_size=3, shuffle=True, num_workers=workers)

    with pytest.raises(TypeError, match="Stateful already"):
        sv.resumable(make())
    seed_everything(0)
    want = [b.tolist() for _ in range(EPOCHS) for b in make()]
    seed_everything(0)
    loader, got = make(), []
    for batch in loader:
        got.append(batch.tolist())
        if len(got) == 2:
            break
    sv.save({"data": loader, "rng": sv.RNGState()}, tmp_path / "ckpt")
    del loader
    seed_everything(1234)
    resumed = make()
    sv.load(tmp_path / "ckpt", into={"data": resumed, "rng": sv.RNGState()})
    got += [b.tolist() for _ in range(EPOCHS) for b in resumed]
    epoch = len(make())
    assert len(got) == len(want) == 2 * epoch
    assert [keys_of(b) for b in got[:epoch]] == [keys_of(b) for b in want[:epoch]]
    assert got[2:epoch] != want[2:epoch]  # the augmentation of the resumed batches
    assert [keys_of(b) for b in got[epoch:]] != [keys_of(b) for b in want[epoch:]]
