"""Who writes what: pure functions every rank evaluates alike, so no rank has to be told.

Replicated tensors (equal on every rank) are stored once. Rather than funnel them through rank 0,
they are dealt out largest first to the rank with the fewest bytes so far (a greedy
longest-processing-time schedule, within 4/3 of the best balance). A DTensor chunk held by
several ranks (replicated over some mesh dimensions) is written by the holder whose coordinate on
each such dimension equals the leaf's number modulo the dimension's size, which spreads the
chunks of different tensors over the replicas.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from statevault.engine.plan import SavePlan


def deal_replicated(sizes: Sequence[int], world: int) -> list[int]:
    """The rank that writes each replicated leaf, balancing bytes (ties go to lower ranks)."""
    owners = [0] * len(sizes)
    # Only the first len(sizes) ranks can ever be chosen (ties go to lower ranks and each leaf
    # lands on an empty rank while there is one): O(leaves), not O(world), per rank.
    loads = [(0, rank) for rank in range(min(world, len(sizes)))]
    heapq.heapify(loads)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return owners


def writer_coordinate(leaf_index: int, size: int) -> int:
    """On a mesh dimension of ``size`` that replicates sharded leaf ``leaf_index``, the
    coordinate of the holder that writes the chunk (see module doc)."""
    return leaf_index % size


def writes_chunk(leaf_index: int, replicas: Sequence[tuple[int, int]]) -> bool:
    """Whether this rank stores its chunk of sharded leaf ``leaf_index`` (see module doc)."""
    return all(coordinate == writer_coordinate(leaf_index, size) for coordinate, size in replicas)


def is_replicated(plan: SavePlan, index: int) -> bool:
    """Whether leaf ``index`` of ``plan`` is a replicated tensor: shared, not a shard."""
    return index < plan.shared_count and plan.leaves[index].shard is None


def leaves_to_write(plan: SavePlan, rank: int, world: int) -> list[int]:
    """The leaves of ``plan`` this rank writes: its share of the replicated ones, the chunks it
    is the chosen holder of, and all of its per-rank leaves."""
    replicated = [i for i in range(plan.shared_count) if is_replicated(plan, i)]
    owners = deal_replicated([plan.leaves[i].spec.nbytes for i in replicated], world)
    mine = {i for i, owner in zip(replicated, owners, strict=True) if owner == rank}
    for index, leaf in enumerate(plan.leaves):
        if leaf.shard is not None:
            if writes_chunk(index, leaf.shard.replicas):
                mine.add(index)
        elif index >= plan.shared_count:  # a per-rank leaf
            mine.add(index)
    return sorted(mine)
