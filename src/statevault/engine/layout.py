"""Which leaf goes into which payload file.

Big states are spread over several files so that they can be written (and read) in parallel;
small states stay in one file. Tiny tensors are packed together, never one file each. Within a
file leaves keep their order in the state, so a file reads like the state it came from.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from statevault.engine.plan import SavePlan
from statevault.format import dtypes

MIN_FILE_BYTES = 64 << 20
MAX_FILES = 8


def assign_files(
    sizes: Sequence[int],
    max_files: int = MAX_FILES,
    min_file_bytes: int = MIN_FILE_BYTES,
    max_file_bytes: int | None = None,
) -> list[list[int]]:
    """Leaf indices per file, balanced by bytes (largest first onto the lightest file).

    ``max_file_bytes`` (a staging budget) asks for enough files that each can be staged alone.
    """
    if not sizes:
        return []
    total = sum(sizes)
    count = min(max_files, math.ceil(total / min_file_bytes))
    if max_file_bytes:
        count = max(count, math.ceil(total / max_file_bytes))
    count = max(1, min(count, len(sizes)))
    heap = [(0, slot) for slot in range(count)]
    files: list[list[int]] = [[] for _ in range(count)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, slot = heapq.heappop(heap)
        files[slot].append(index)
        heapq.heappush(heap, (load + sizes[index], slot))
    return [sorted(members) for members in files if members]


def group_files(
    plan: SavePlan, leaves: Sequence[int], max_file_bytes: int | None
) -> list[list[int]]:
    """``leaves`` (leaf indices) grouped into shard files of at most ``max_file_bytes`` (None: as
    the layout rule has it), each file's leaves ordered for alignment."""
    groups = assign_files(
        [plan.leaves[i].spec.nbytes for i in leaves], max_file_bytes=max_file_bytes
    )
    return _aligned(plan, [[leaves[j] for j in members] for members in groups])


def _aligned(plan: SavePlan, files: list[list[int]]) -> list[list[int]]:
    """Order each file's leaves by item size, largest first: every size is a multiple of its
    (power of two) item size, so each tensor starts aligned to it, and views need no copy."""
    itemsize = {i: dtypes.lookup(leaf.spec.dtype).itemsize for i, leaf in enumerate(plan.leaves)}
    return [sorted(members, key=lambda i: (-itemsize[i], i)) for members in files]
