"""Agree: before anything is written, every rank of a save proposes what it is about to save, and
rank 0 where it goes; they go on only if all agree (the same tree, the same shapes, no error).

One small collective (``all_gather`` of a digest per rank) on the calling thread. For a group of
one there is nothing to compare: no digest is computed. Example::

    plan, proposal, error = propose(state, None, target, committer, False, group)
    written = check_agreement(group.all_gather(proposal), target, committer, error, group)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from statevault.checkpoint.commit import LocalCommit, ObjectCommit
from statevault.distributed.coordinator import Group
from statevault.engine.plan import SavePlan, plan_save
from statevault.errors import DistributedSaveError
from statevault.storage.location import Location


@dataclass
class Proposal:
    """What each rank brings to the agreement; rank 0's also says where the save goes."""

    digest: str = ""
    keys: dict[str, str] = field(default_factory=dict)  # top-level key -> digest
    error: str | None = None
    written: str = ""
    tag: str = ""


def propose(
    state: Any,
    metadata: Any,
    target: Location,
    committer: LocalCommit | ObjectCommit,
    overwrite: bool,
    group: Group,
) -> tuple[SavePlan | None, Proposal, BaseException | None]:
    """Plan the state and, on rank 0, check and begin the target; an error is packed into
    the proposal (every rank must still take part in the agreement) and returned."""
    proposal = Proposal()
    try:
        plan = plan_save(state, metadata, per_rank=group.size > 1)
        if group.size > 1:  # a group of one has nobody to agree with
            proposal.digest, proposal.keys = plan_digest(plan)
        if group.rank == 0:
            committer.check_target(target, overwrite)
            written = committer.begin(target)
            proposal.written, proposal.tag = written.path, committer.shard_tag()
        return plan, proposal, None
    except Exception as exc:  # every rank must still take part in the agreement
        proposal.error = f"{type(exc).__name__}: {exc}"
        return None, proposal, exc


def check_agreement(
    replies: list[Proposal],
    target: Location,
    committer: LocalCommit | ObjectCommit,
    own_error: BaseException | None,
    group: Group,
) -> Location:
    """Where every rank writes, once all agree; else the reason, raised on every rank (rank 0
    first removes what it began)."""
    leader = replies[0]
    failed = [(rank, p.error) for rank, p in enumerate(replies) if p.error]
    differing = sorted(
        {key for p in replies for key in set(p.keys) ^ set(leader.keys)}
        | {key for p in replies for key, d in p.keys.items() if leader.keys.get(key, d) != d}
    )
    mismatch = any(p.digest != leader.digest for p in replies)
    if not failed and not mismatch:
        if group.rank != 0 and isinstance(committer, ObjectCommit):
            committer.tag = leader.tag.removeprefix("-")
        if leader.written == target.path:
            return target
        return Location(target.storage, leader.written, leader.written)
    if group.rank == 0 and leader.written:
        committer.abandon(
            target
            if leader.written == target.path
            else Location(target.storage, leader.written, leader.written)
        )
    if own_error is not None:
        raise own_error
    if failed:
        raise DistributedSaveError(
            f"save of {target.url} refused on rank {failed[0][0]}: {failed[0][1]}",
            [rank for rank, _ in failed],
        )
    raise DistributedSaveError(
        f"save of {target.url}: the ranks passed different states (keys {differing or '?'}"
        " differ). Every rank must save the same tree: tensors replicated or DTensors, "
        "plain values equal; wrap values that differ per rank in sv.PerRank(...)"
    )


def plan_digest(plan: SavePlan) -> tuple[str, dict[str, str]]:
    """A digest of what must be equal on every rank: the tree (per-rank branches left out) and
    each shared leaf's dtype, global shape and sharding rule; and one digest per top-level key,
    to name the keys that differ."""
    shapes = [
        (
            leaf.spec.dtype,
            leaf.shard.global_shape if leaf.shard else leaf.spec.shape,
            leaf.shard.rule.to_json() if leaf.shard and leaf.shard.rule else None,
        )
        for leaf in plan.leaves[: plan.shared_count]
    ]
    tree = _without_rank_branches(plan.tree)
    whole = json.dumps([tree, shapes], sort_keys=True, default=str).encode()
    keys = {}
    if type(tree) is dict and type(tree.get("v")) is dict:
        keys = {
            key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for key, value in tree["v"].items()
        }
    return hashlib.sha256(whole).hexdigest(), keys


def _without_rank_branches(node: Any) -> Any:
    if type(node) is list:
        return [_without_rank_branches(v) for v in node]
    if type(node) is not dict:
        return node
    if node.get("$") == "per_rank":
        return {"$": "per_rank"}
    return {k: _without_rank_branches(v) for k, v in node.items()}
