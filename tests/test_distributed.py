"""Distributed saves and loads on real gloo process groups (2, 3 and 4 spawned ranks).

The resharding matrix: FSDP2 on 4 ranks -> FSDP2 on 2 -> FSDP2 on 3, FSDP2 -> DDP, sharded ->
one process; a 2-D mesh; uneven and empty shards; training continued after a reshard; a rank
that fails or dies mid-save; states that differ between ranks; per-rank state; ranged reads.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import statevault as sv
from statevault.checkpoint import open_checkpoint
from tests import dist_workloads as work
from tests.dist_helpers import run_ranks

pytestmark = pytest.mark.timeout(600)


def assert_same(a: dict[str, Any], b: dict[str, Any], exact: bool = True) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if exact:
            assert np.array_equal(a[key], b[key]), key
        else:
            assert np.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_fsdp_resharding_matrix(tmp_path: Path) -> None:
    four, two = str(tmp_path / "fsdp4"), str(tmp_path / "fsdp2")
    saved4 = run_ranks(work.session, 4, "fsdp", None, 3, four)
    manifest = open_checkpoint(four).manifest
    assert manifest.format_version == 3 and manifest.ranks == 4 and manifest.complete
    # Every rank wrote its own shards; 5 rows over 4 ranks leave an empty chunk, still recorded.
    assert {t.file.split("-")[1] for t in manifest.tensors} == {f"r{r:05d}" for r in range(4)}
    bias = next(s for s in manifest.sharded if s.path == "model/2.bias")
    assert [manifest.tensors[c.tensor].shape[0] for c in bias.chunks] == [2, 2, 2, 1]
    assert bias.rule is not None and bias.rule.mesh == (4,)  # FSDP's dim-0 split, as a rule
    # 4 -> 2 ranks, then training on and saving at 2 ranks.
    loaded2 = run_ranks(work.session, 2, "fsdp", four, 2, two)
    for rank in range(2):
        assert_same(loaded2[rank]["restored"], saved4[0]["final"])
    # 2 -> 3 ranks, 2 -> DDP on 2 ranks: exactly the saved values, optimizer moments included.
    loaded3 = run_ranks(work.session, 3, "fsdp", two, 0, None)
    assert_same(loaded3[2]["restored"], loaded2[0]["final"])
    ddp = run_ranks(work.session, 2, "ddp", two, 0, None)
    assert_same(ddp[1]["restored"], loaded2[0]["final"])
    assert any(key.endswith("exp_avg_sq") for key in ddp[1]["restored"])
    # Sharded -> one process without a process group: full tensors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-rank state of rank 0 is given back: said once
        state = sv.load(two)
    assert state["step"] == 5
    for name, value in state["model"].items():
        assert np.array_equal(value.numpy(), loaded2[0]["final"][f"model/{name}"]), name


def test_training_continues_exactly_after_restore_and_closely_after_reshard(
    tmp_path: Path,
) -> None:
    checkpoint = str(tmp_path / "at3")
    reference = run_ranks(work.session, 2, "fsdp", None, 5, checkpoint, 3)[0]["final"]
    same_layout = run_ranks(work.session, 2, "fsdp", checkpoint, 2, None)[0]["final"]
    assert_same(same_layout, reference, exact=True)
    resharded = run_ranks(work.session, 3, "fsdp", checkpoint, 2, None)[0]["final"]
    assert_same(resharded, reference, exact=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = work.session(0, 1, "plain", checkpoint, 2, None)["final"]
    assert_same(single, reference, exact=False)


def test_two_dimensional_mesh_and_replica_dedup(tmp_path: Path) -> None:
    path = str(tmp_path / "mesh")
    results = run_ranks(work.mesh_2d_save, 4, path)
    # a: sharded over both mesh dims (4 chunks); b: replicated over dim 0 (2 chunks, not 4).
    assert results[0]["chunks"] == {"a": 4, "b": 2}
    assert len(results[0]["writers"]) >= 3
    loaded = sv.load(path)
    for key, full in results[0]["full"].items():
        assert np.array_equal(loaded[key].numpy(), full), key
    # Into another layout: a 1-D mesh of 2 ranks sharding a's columns.
    into = run_ranks(work.load_into_mesh, 2, path, "a", 1)
    assert np.array_equal(into[0]["full"], results[0]["full"]["a"])
    assert np.array_equal(into[1]["local"], results[0]["full"]["a"][:, 4:])


def test_each_rank_reads_only_its_byte_range(tmp_path: Path) -> None:
    path = str(tmp_path / "big")
    rows, cols = 8192, 2048  # 64 MiB of float32, saved as two 32 MiB chunks
    run_ranks(work.big_sharded_save, 2, path, rows, cols)
    results = run_ranks(work.load_into_mesh, 4, path, "w", 0, timeout=300)
    quarter = rows * cols * 4 // 4
    full = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    for rank, result in enumerate(results):
        assert result["bytes"] == quarter, (rank, result["bytes"])  # one verified block each
        assert np.array_equal(result["local"], full[rank * rows // 4 : (rank + 1) * rows // 4])


def test_per_rank_state_goes_back_to_its_rank(tmp_path: Path) -> None:
    path = str(tmp_path / "ranks")
    run_ranks(work.per_rank_save, 2, path)
    same = run_ranks(work.per_rank_load, 2, path)
    assert [r["pos"] for r in same] == [{"batch": 100}, {"batch": 101}]
    assert not any(r["warned"] for r in same)
    grown = run_ranks(work.per_rank_load, 3, path)
    assert [r["pos"]["batch"] for r in grown] == [100, 101, 100]
    assert all("saved by 2 processes and is loaded by 3" in r["warned"][0] for r in grown)


def test_states_that_differ_between_ranks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "differ"
    errors = run_ranks(work.differing_states, 2, str(path))
    assert all("['lr']" in e and "sv.PerRank" in e for e in errors), errors
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing left behind


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_rank_failing_mid_save_commits_nothing_and_every_survivor_raises(
    tmp_path: Path, how: str
) -> None:
    results = run_ranks(
        work.failing_rank,
        3,
        str(tmp_path),
        2,
        how,
        may_die=(2,) if how == "kill" else (),
        env={"STATEVAULT_COLLECTIVE_TIMEOUT_S": "20"},
        timeout=180,
    )
    survivors = results[:2] if how == "kill" else results
    for result in survivors:
        assert result["error"] is not None and "not committed" in result["error"]
        assert result["seconds"] < 60  # no hang: the timeout is 20 s
    if how == "raise":
        assert all(r["ranks"] == [2] for r in results)
        assert all("No space left" in r["error"] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]  # no temporary left
    assert not (tmp_path / "two").exists()
    assert sv.load(tmp_path / "one")["step"] == 1


def test_replicated_state_is_spread_over_ranks(tmp_path: Path) -> None:
    path = str(tmp_path / "ddp")
    run_ranks(work.session, 2, "ddp", None, 1, path)
    manifest = open_checkpoint(path).manifest
    by_rank: dict[str, int] = {}
    for row in manifest.tensors:
        by_rank[row.file.split("-")[1]] = by_rank.get(row.file.split("-")[1], 0) + row.nbytes
    assert set(by_rank) == {"r00000", "r00001"}
    assert max(by_rank.values()) <= 2 * min(by_rank.values())
    assert not manifest.sharded  # replicated tensors are plain rows, stored once
    names = [row.path for row in manifest.tensors]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_agrees_on_preemption_and_resumes_at_another_world_size(
    tmp_path: Path, async_save: bool
) -> None:
    run = str(tmp_path / "run")
    first = run_ranks(work.manager_session, 2, run, 9, 1, 5, async_save)
    # Rank 1 alone was signalled at step 5: both ranks saved step 5 and stopped there.
    assert first[0]["decisions"] == first[1]["decisions"]
    assert first[0]["decisions"][-1] == (5, True)
    assert [r["stopped_at"] for r in first] == [5, 5]
    steps = [name for name in first[0]["steps"] if name.startswith("step_")]
    assert steps == ["step_000000004", "step_000000005"]  # max_to_keep=2, by rank 0 alone
    assert not [name for name in os.listdir(run) if ".tmp-" in name]
    # A new job with 3 ranks resumes from step 5 and runs to the end.
    second = run_ranks(work.manager_session, 3, run, 9, None, None, async_save)
    assert [r["start"] for r in second] == [5, 5, 5]
    assert second[0]["decisions"] == [(6, True), (7, False), (8, True), (9, False)]
    assert sv.load(f"{run}/step_000000008")["step"] == 8


def test_sharded_state_in_a_single_process_job(tmp_path: Path) -> None:
    result = run_ranks(work.solo_dtensor, 1, str(tmp_path))[0]
    # 6 parameters and their 12 Adam moments, each a DTensor
    assert result["sharded"] == 18 and result["version"] == 2
    assert_same(result["restored"], result["saved"])


def test_per_rank_stateful_restores_through_its_wrapper(tmp_path: Path) -> None:
    assert run_ranks(work.per_rank_into, 2, str(tmp_path / "pos")) == [50, 51]


@pytest.mark.s3
def test_distributed_save_to_an_object_store_and_reshard(s3_bucket: Any) -> None:
    from tests.s3_server import objects_under

    url = f"{s3_bucket.url}/run/step_2"
    options = dict(s3_bucket.storage_options)
    saved = run_ranks(work.s3_save_and_reshard, 2, url, options, True)
    names = sorted(objects_under(s3_bucket.fs, url.removeprefix("s3://")))
    assert "manifest.json" in names
    assert not [n for n in names if n.startswith("part-")]  # reports deleted before commit
    assert {n.split("-")[1] for n in names if n.startswith("data-")} == {"r00000", "r00001"}
    loaded = run_ranks(work.s3_save_and_reshard, 3, url, options, False)
    assert_same(loaded[1], saved[0])


def test_saving_on_the_chief_alone_remains_available(tmp_path: Path) -> None:
    assert run_ranks(work.chief_only, 2, str(tmp_path / "chief")) == ["[0.0, 0.0, 0.0, 0.0]"] * 2


def test_format_3_metadata_stays_flat_and_each_rank_reads_its_own_index(tmp_path: Path) -> None:
    """The same FSDP2 model saved by 2 and by 4 ranks: the commit record (manifest.json) grows
    by at most 1.25x, a rank restoring at the same world size reads only its own index, and
    both checkpoints load bit-identically on 1, 2 and 3 ranks."""
    paths = {world: str(tmp_path / f"saved{world}") for world in (2, 4)}
    saved = {world: run_ranks(work.format3_save, world, paths[world]) for world in (2, 4)}
    assert saved[4][0]["manifest"] <= 1.25 * saved[2][0]["manifest"], (
        saved[2][0]["manifest"],
        saved[4][0]["manifest"],
    )
    for world in (2, 4):
        assert saved[world][0]["table"] == 12 * world
        reads = saved[world][0]["manifest"] + saved[world][0]["table"]
        own = max(result["own_index"] for result in saved[world])
        assert reads + own < 64 * 1024  # what a restoring rank reads before any payload
    for load_world in (1, 2, 3):
        loaded = run_ranks(work.format3_load, load_world, [paths[2], paths[4]])
        for rank, results in enumerate(loaded):
            for world, result in zip((2, 4), results, strict=True):
                assert_same(result["full"], saved[world][0]["full"])
                assert result["where"] == rank % world
                if load_world == world:
                    assert result["read"] == [rank], (world, rank, result["read"])
                elif load_world == 1:
                    assert result["read"] == list(range(world))  # whole tensors: every piece
                else:
                    assert len(result["read"]) < world or world == 2, (world, result["read"])
