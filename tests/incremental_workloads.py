"""Run on each rank by tests/test_incremental_distributed.py (importable by spawned processes):
an FSDP2 model with a frozen, sharded body and a trainable head, saved by the manager at every
step with incremental saves on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import statevault as sv

BODY_IN, BODY_OUT, HEAD_OUT = 32, 96, 5


def frozen_body_model() -> torch.nn.Sequential:
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(BODY_IN, BODY_OUT), torch.nn.Tanh(), torch.nn.Linear(BODY_OUT, HEAD_OUT)
    )
    model[0].requires_grad_(False)  # the frozen body: sharded by FSDP2, never trained
    return model


def frozen_body_session(
    rank: int, world: int, run: str, steps: int, nudge_rank: int, nudge_step: int
) -> dict[str, Any]:
    """Train the head ``steps`` steps, saving at each; at ``nudge_step`` rank ``nudge_rank``
    changes its own shard of the frozen body in place (no optimizer, no version bump), as
    loading new weights into it would. Returns the full state at the end, as numpy."""
    from torch.distributed.fsdp import fully_shard

    model = frozen_body_model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    # A plain tensor every rank holds the same: replicated, written once (by one rank).
    table = torch.arange(4096, dtype=torch.float32)
    generator = torch.Generator().manual_seed(10 + rank)
    with sv.CheckpointManager(run, max_to_keep=3) as mgr:
        for step in range(1, steps + 1):
            x = torch.randn(6, BODY_IN, generator=generator)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if step == nudge_step and rank == nudge_rank:
                with torch.no_grad():
                    model[0].weight.to_local()[0, 0] += 1.0
            mgr.save(step, {"model": model, "optimizer": opt, "table": table})
    state = {name: _full(value) for name, value in model.state_dict().items()}
    return state


def _full(value: Any) -> np.ndarray:
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return np.asarray(value.detach().clone().numpy())
