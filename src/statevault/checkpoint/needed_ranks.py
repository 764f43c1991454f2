"""Which ranks' indexes a load of a format-3 checkpoint reads (format/indexed.py).

A rank of a job restoring its own pieces needs: its own per-rank branch (the index of the rank
it restores from), and for every sharded tensor it loads, the indexes of the ranks whose pieces
overlap the box it holds, which the tensor's rule gives without reading anything. A tensor
loaded whole, or one without a rule, needs every rank that wrote a piece of it. So a restart at
the same world size reads the manifest, the table and about one index per rank: metadata that
grows with the tensors, not with the job.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from statevault.checkpoint.open import OpenCheckpoint
from statevault.distributed.group import rank_and_world
from statevault.format import tree_paths
from statevault.format.geometry import Box


def read_needed_ranks(
    checkpoint: OpenCheckpoint,
    node: Any,
    into: Mapping[str, Any] | None,
    pick_rank: Callable[[int], int],
) -> None:
    """Expand ``checkpoint``'s manifest with the indexes a load of ``node`` needs (see the
    module docstring); nothing to do for a complete manifest."""
    manifest = checkpoint.manifest
    if manifest.complete:
        return
    ranks: set[int] = set()
    numbers = sorted(tree_paths.tensor_ids(node, tag="sharded"))
    boxes = _target_boxes(node, into, pick_rank) if numbers else {}
    for number in numbers:
        if not 0 <= number < len(manifest.sharded):
            continue  # the decoder names the bad reference
        entry = manifest.sharded[number]
        if entry.rule is None:
            checkpoint.read_ranks(None)  # its pieces may lie anywhere
            return
        box = boxes.get(number)
        if box is None:
            ranks.update(rank for _, rank in entry.rule.written())
        else:
            ranks.update(rank for _, rank, _ in entry.rule.overlapping(entry.shape, box))
    checkpoint.read_ranks(sorted(ranks))


def own_branch_rank(checkpoint: OpenCheckpoint) -> list[int]:
    """The rank whose per-rank branches this process restores: its own, or ``rank % saved``
    when the world size changed (distributed/group.rank_picker, which warns when it decodes)."""
    return [rank_and_world()[0] % checkpoint.manifest.ranks]


def _target_boxes(
    node: Any, into: Mapping[str, Any] | None, pick_rank: Callable[[int], int]
) -> dict[int, Box]:
    """The box each DTensor destination of ``into`` holds, by sharded row."""
    boxes: dict[int, Box] = {}
    if into is not None and "torch.distributed.tensor" in sys.modules:
        from statevault.adapters.torch_dtensor import dtensor_class, local_box

        if dtensor_class() is not None:
            from statevault.distributed.targets import find_targets

            for (kind, number), target in find_targets(into, node, pick_rank).items():
                if kind == "sharded":
                    boxes[number] = local_box(target)
    return boxes
