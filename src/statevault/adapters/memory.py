"""Host memory for loaded arrays: what an adapter allocates a large array in."""

from __future__ import annotations

import mmap

HUGE_PAGE_THRESHOLD = 1 << 20


def fresh_host_memory(nbytes: int) -> mmap.mmap | None:
    """Anonymous memory for one large loaded array, with transparent huge pages requested.

    Reading a checkpoint into freshly allocated memory is dominated by page faults; huge pages
    cut them by 512x (measured: fresh malloc'd buffers read 4x slower than huge-page ones, which
    read as fast as buffers touched beforehand). None for small arrays: malloc serves them.
    """
    if nbytes < HUGE_PAGE_THRESHOLD:
        return None
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory
