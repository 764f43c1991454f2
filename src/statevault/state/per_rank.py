"""PerRank: mark state that differs between the processes of a distributed run.

In a distributed save every rank saves the same tree; tensors are either replicated (equal on all
ranks, written once) or sharded (DTensor: each rank writes its piece). Values that differ per
rank, such as a data loader's position or a random stream, are wrapped in ``PerRank`` and saved
once per rank. ``RNGState`` is always per rank. On load, each rank gets back its own values when
the world size is unchanged; when it changed, rank ``r`` gets saved rank ``r % saved_ranks``'s
values and a warning says so. In a single process ``PerRank(x)`` saves ``x`` as it is. Example::

    state = {"model": model, "loader": sv.PerRank(loader), "rng": sv.RNGState()}
"""

from __future__ import annotations

from typing import Any


class PerRank:
    """A subtree whose value is each rank's own (see the module docstring)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def is_per_rank(value: object) -> bool:
    """PerRank wrappers, and RNGState: random streams are each process's own."""
    from statevault.state.rng import RNGState

    return isinstance(value, (PerRank, RNGState))
