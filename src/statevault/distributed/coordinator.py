"""The collective calls a distributed save makes, on statevault's own gloo group.

Two small all-gathers per save, both on the calling (main) thread, never in a background thread:

1. *agree* (at the start): every rank's plan digest and any planning error; rank 0 adds where
   the save goes (its temporary directory or object tag). O(1) bytes per rank.
2. *settle* (when the save is collected: at once for a synchronous save, at the next
   ``save``/``wait``/``close`` for an asynchronous one): every rank's outcome, and rank 0's
   manifest. A failure anywhere is raised on every rank.

The group is created with the gloo backend whatever the default group uses (NCCL has no CPU
collectives; DCP's async save fails there), with its own timeout, so a dead rank surfaces as an
error on the survivors instead of a hang.
"""

from __future__ import annotations

import datetime
from typing import Any, Protocol

from statevault.distributed.group import distributed_module
from statevault.errors import DistributedSaveError

DEFAULT_TIMEOUT_S = 600.0
_GROUPS: dict[tuple[int, float], Any] = {}


class Group(Protocol):
    """The processes taking part in a save. Call order: every rank calls ``all_gather`` the same
    number of times, in the same order (the saver guarantees it)."""

    rank: int
    size: int

    def all_gather(self, value: Any) -> list[Any]: ...


class SoloGroup:
    """A single process: a sharded state (a DTensor on a one-rank mesh) saved outside a job."""

    rank = 0
    size = 1

    def all_gather(self, value: Any) -> list[Any]:
        return [value]


class TorchGroup:
    """All ranks of the default process group, talking over statevault's own gloo group."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        dist = distributed_module()
        if dist is None:
            raise DistributedSaveError("torch.distributed has no initialized process group")
        self._dist = dist
        self.rank = int(dist.get_rank())
        self.size = int(dist.get_world_size())
        self.timeout_s = timeout_s
        key = (id(dist.group.WORLD), timeout_s)
        if key not in _GROUPS:  # new_group is itself collective: every rank creates it here
            _GROUPS[key] = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)
            )
        self._group = _GROUPS[key]

    def all_gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.size
        try:
            self._dist.all_gather_object(gathered, value, group=self._group)
        except Exception as exc:  # gloo raises RuntimeError/DistBackendError on a dead peer
            raise DistributedSaveError(
                f"rank {self.rank}: another rank did not answer within {self.timeout_s:.0f} s "
                f"(it may have died): {str(exc).splitlines()[0][:300]}"
            ) from None
        return gathered
