"""Incremental saves of a 2-rank FSDP2 run (gloo) with a frozen, sharded body: every rank
decides for its own shards; the replicated tensor is written by one rank and shared the same
way; a change to one rank's shard of the frozen body rewrites that rank's file only; every
checkpoint loads whole into one process."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import statevault as sv
from statevault.checkpoint import open_checkpoint
from statevault.manager.naming import step_dir_name
from tests import incremental_workloads as work
from tests.dist_helpers import run_ranks


def _files_of(checkpoint: Path, tensor: str) -> dict[str, int]:
    """The shard files holding (a shard of) ``tensor``, with their inode."""
    with open_checkpoint(checkpoint) as opened:  # every rank's rows
        names = {row.file for row in opened.manifest.tensors if row.path == tensor}
    return {name: os.stat(checkpoint / name).st_ino for name in sorted(names)}


def _rank_of(name: str) -> int:
    return int(name.split("-")[1][1:])  # data-r00001-00000.safetensors -> 1


def test_fsdp2_ranks_share_their_frozen_shards_and_rewrite_what_changed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    steps, nudged_rank, nudged_step = 4, 1, 4
    finals = run_ranks(
        work.frozen_body_session, 2, str(run), steps, nudged_rank, nudged_step, timeout=180
    )
    checkpoints = {step: run / step_dir_name(step) for step in (2, 3, 4)}  # max_to_keep=3

    body = {step: _files_of(path, "model/0.weight") for step, path in checkpoints.items()}
    assert {_rank_of(name) for name in body[4]} == {0, 1}, "each rank writes its own shard"
    head = {step: _files_of(path, "model/2.weight") for step, path in checkpoints.items()}
    # Steps 2 -> 3: nothing of the body changed; every rank links its body file.
    assert set(body[3].values()) == set(body[2].values()), body
    assert not set(head[3].values()) & set(head[2].values()), "the trained head is written"
    # Step 4: rank 1 changed its shard in place; rank 0's body file stays shared.
    shared = {_rank_of(n) for n, inode in body[4].items() if inode in set(body[3].values())}
    assert shared == {0}, body

    table = {step: _files_of(path, "table") for step, path in checkpoints.items()}
    assert len(table[4]) == 1, "the replicated tensor is written by one rank"
    assert set(table[4].values()) == set(table[3].values()), "and shared like a frozen one"

    for path in checkpoints.values():
        assert sv.verify(path).ok
    model = work.frozen_body_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    table = torch.zeros(4096)
    sv.load(checkpoints[4], into={"model": model, "optimizer": opt, "table": table})
    assert torch.equal(table, torch.arange(4096, dtype=torch.float32))
    assert len(opt.state) == 2, "the head's moments are restored"
    for name, value in model.state_dict().items():
        assert torch.equal(value, torch.from_numpy(finals[0][name])), name
    assert not torch.equal(model[0].weight, work.frozen_body_model()[0].weight), "the nudge"
