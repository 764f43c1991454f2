"""The calling process's place in a torch.distributed job, without importing torch.

statevault never imports torch on its own: if the program has not imported
``torch.distributed``, or has not initialized a process group, this is a single process.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any


def distributed_module() -> Any:
    """``torch.distributed`` when a default process group is initialized, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    dist = distributed_module()
    if dist is None:
        return 0, 1
    return int(dist.get_rank()), int(dist.get_world_size())


def rank_picker(where: str) -> Callable[[int], int]:
    """Which branch of a per-rank node this process restores (the policy in per_rank.py):
    its own when the world size is unchanged, else saved rank ``rank % saved``, with a warning
    (once per load) that says so."""
    rank, world = rank_and_world()
    warned: list[bool] = []

    def pick(saved: int) -> int:
        if saved == world:
            return rank
        if not warned:
            warned.append(True)
            warnings.warn(
                f"statevault: {where} was saved by {saved} processes and is loaded by {world}: "
                f"per-rank state (random streams, data positions) of rank {rank} is restored "
                f"from saved rank {rank % saved}",
                stacklevel=4,
            )
        return rank % saved

    return pick
