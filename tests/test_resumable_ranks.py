"""``sv.resumable`` with a DistributedSampler on real gloo process groups: a position saved by
N ranks and resumed by M covers each remaining sample of the interrupted epoch exactly once
across the new ranks, says so in a log line, and the next epoch is the M-rank sampler's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from tests.dist_helpers import run_ranks
from tests.resumable_helpers import consume_and_save, restore_and_finish

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    ("saved_on", "resumed_on", "size"),
    [(2, 1, 31), (1, 2, 29)],
    ids=["2 ranks -> 1", "1 rank -> 2"],
)
def test_a_changed_world_size_covers_the_rest_once(
    saved_on: int, resumed_on: int, size: int, tmp_path: Path
) -> None:
    path = str(tmp_path / "ckpt")
    consumed = run_ranks(consume_and_save, saved_on, path, size, 2)
    resumed = run_ranks(restore_and_finish, resumed_on, path, size)
    rest = [key for result in resumed for key in result["rest"]]
    done = [key for keys in consumed for key in keys]
    assert len(done) == saved_on * 2 * 4
    # Each sample of the epoch exactly once: the padding 2 ranks add to 31 samples is dropped.
    assert sorted(done + rest) == list(range(size))
    for rank, result in enumerate(resumed):
        assert result["loads"] == len(result["rest"])  # skipped by index: nothing else loaded
        assert result["finished"] == (1, 1)  # pass 0 (the sampler's epoch 1) is over
        expected = DistributedSampler(range(size), resumed_on, rank, seed=3)
        expected.set_epoch(2)
        assert result["next"] == list(expected)[:4]  # epoch 2: the M-rank sampler's own order
        (line,) = result["log"]
        assert f"saved by {saved_on} ranks" in line and f"resumed by {resumed_on}" in line
        assert "each exactly once" in line and f"rank {rank} takes {len(result['rest'])}" in line
