"""The manager's part in a distributed job: rank 0 keeps the run, every rank saves.

Inside a ``torch.distributed`` job every rank creates the same ``CheckpointManager`` and calls
the same methods. Rank 0 (the *leader*) alone takes the writer lock, writes ``run.json``, sweeps,
applies retention, replicates and chooses the checkpoint to resume from; the others follow its
decisions. The agreements are small collective calls on the calling thread (the saver's gloo
group), made at points every rank reaches alike:

- construction: the leader's setup error, if any, is raised on every rank; its run id is shared;
- ``should_save``: every rank's answer and preemption flag are gathered; rank 0's answer wins,
  and a preemption signal on any rank becomes a preemption save on all of them, at the same step;
- ``restore``: the leader picks the newest valid checkpoint; every rank loads that one.

Outside a job (or with one rank) nothing is exchanged.
"""

from __future__ import annotations

from typing import Any

from statevault.checkpoint.save import Saver
from statevault.distributed.coordinator import Group
from statevault.errors import CheckpointError


class Role:
    """This process's role in the run: leader or follower, and the group to agree in."""

    def __init__(self, saver: Saver) -> None:
        self.group: Group = saver.group
        self.leader = self.group.rank == 0
        self.distributed = self.group.size > 1

    def share(self, value: Any) -> Any:
        """The leader's ``value``, on every rank."""
        if not self.distributed:
            return value
        return self.group.all_gather(value if self.leader else None)[0]

    def raise_leader_error(self, error: BaseException | None) -> None:
        """Raise the leader's setup error on every rank (the leader re-raises its own)."""
        text = self.share(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if text is not None:
            raise CheckpointError(f"rank 0 could not open the run: {text}")

    def agree_to_save(self, wanted: bool, preempting: bool) -> tuple[bool, bool]:
        """(save now, preemption requested) as the ranks agree (see the module docstring)."""
        if not self.distributed:
            return wanted, preempting
        replies = self.group.all_gather((wanted, preempting))
        preempted = any(flag for _, flag in replies)
        return replies[0][0] or preempted, preempted
